#!/usr/bin/env bash
# Start the session-7 GPU jobs detached, from a private copy of the repo (later calls re-sync the checkout).
#   call 1 (carry .devgpu/c00): bash .devgpu/c00/unpack; bash scripts/gpu_session7_start.sh probe
#   call 2 (carry .devgpu/c01 .gpu_old): eval "$(bash .devgpu/c01/unpack)"; bash scripts/gpu_session7_start.sh s7
#   (never pipe that eval: a pipe runs it in a subshell and the jobs lose vLLM's PYTHONPATH; session 7 lost a
#   lease that way.) .gpu_old (optional, git-ignored): a tree the PRESCORE e2e falls back to if it fails
#   then: bash /tmp/devgpu/bg wait s7 540 '/tmp/res/*.json' ...
set -u
what=$1
[ -d /tmp/repo ] || { mkdir -p /tmp/repo && tar --exclude=./.devgpu --exclude=./.gpu_old -cf - . | tar -xf - -C /tmp/repo; }
mkdir -p /tmp/res /tmp/tools
[ -f .devgpu/c01/tools/dummy_model.py ] && cp .devgpu/c01/tools/dummy_model.py /tmp/tools/
[ -d .gpu_old ] && [ ! -d /tmp/old ] && cp -r .gpu_old /tmp/old  # fallback tree (carried, ignored)
cd /tmp/repo
case $what in
  probe) bash /tmp/devgpu/bg start probe -- bash -c 'python3 benchmarks/probe_select_variants.py > /tmp/res/probe.log 2>&1' ;;
  s7) bash /tmp/devgpu/bg start s7 -- bash -c 'while pgrep -f "[p]robe_select_variants" >/dev/null; do sleep 2; done;
        bash scripts/gpu_session7.sh /tmp/res' ;;
esac
