#!/usr/bin/env bash
# Start the session-6 GPU jobs detached, from a private copy of the repo (later calls re-sync the checkout).
#   call 1: bash .devgpu/c00/unpack; bash scripts/gpu_session6_start.sh sel
#   call 2: eval "$(bash .devgpu/c01/unpack)"; bash scripts/gpu_session6_start.sh s6   (waits for sel to end)
set -u
what=$1
if [ ! -d /tmp/repo ]; then
  mkdir -p /tmp/repo && tar --exclude=./.devgpu -cf - . | tar -xf - -C /tmp/repo
fi
mkdir -p /tmp/res /tmp/tools
[ -f .devgpu/c01/tools/dummy_model.py ] && cp .devgpu/c01/tools/dummy_model.py /tmp/tools/
cd /tmp/repo
case $what in
  sel) bash /tmp/devgpu/bg start sel -- python3 benchmarks/select_bench.py --modes "${MODES:-hybrid}" \
         --out /tmp/res/select-bench.json ;;
  s6) bash /tmp/devgpu/bg start s6 -- bash -c 'while pgrep -f "[s]elect_bench[.]py" >/dev/null; do sleep 2; done;
         STEPS="${STEPS:-e2e serve}" bash scripts/gpu_session6.sh /tmp/res' ;;
esac
