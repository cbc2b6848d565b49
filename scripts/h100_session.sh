#!/usr/bin/env bash
# One single-GPU lease (H100): the kernels benchmark (issue 2), then the quality tables (issue 5) on real
# models whose GGUF pieces arrive one device call at a time (scripts/devgpu_models.sh). Run it in the
# background from a copy of the repo on the GPU machine, with the package installed into /tmp/site:
#
#   cp -r . /tmp/repo && cd /tmp/repo && python3 -m pip install -q --no-deps --no-build-isolation \
#       --target /tmp/site . && setsid nohup bash scripts/h100_session.sh /tmp/res > /tmp/res.log 2>&1 &
#   # then, one call per piece: bash scripts/devgpu_models.sh stash .devgpu/s00 (s01, q00 .. q07)
#
# Writes under RES: kernels-h100.json + kernels-bench.log, quality-smollm2.json, quality-qwen2.5-coder-0.5b.json,
# eval-*.log, assemble.log, DONE. Env: STEPS (default "bench smollm2 qwen"; also "selbench": benchmarks/select_bench.py),
# run in the order given; SWEEPS (passed to eval/h100.sh: "beta sw" runs the quest_beta and sink/window sweeps).
set -uo pipefail
RES=${1:-/tmp/res}
mkdir -p "$RES"
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log() { echo "[h100_session $(date +%T)] $*"; }
wait_pieces() {  # model n  (no grep -q: with pipefail its early exit would fail the pipeline)
  until bash scripts/devgpu_models.sh status 2>/dev/null | grep "^$1: $2/$2 pieces" >/dev/null; do sleep 3; done
}
quality() {  # model pieces dir-variable: wait for the GGUF pieces, convert, run eval/h100.sh on that model
  log "waiting for the $1 pieces"
  wait_pieces "$1" "$2"
  local dir; dir=$(bash scripts/devgpu_models.sh assemble "$1" 2>>"$RES/assemble.log" | tail -1)
  log "$1 at $dir; quality run"
  env RESULTS="$RES" "$3=$dir" MODELS="$1" bash eval/h100.sh > "$RES/eval-$1.log" 2>&1
  log "$1 quality rc=$?"
}
for step in ${STEPS:-bench smollm2 qwen}; do
  case $step in
    bench)
      log "kernels bench"
      python3 benchmarks/kernels_bench.py --out "$RES/kernels-h100.json" > "$RES/kernels-bench.log" 2>&1
      log "bench rc=$?" ;;
    selbench)
      log "query-aware selection bench"
      timeout 300 python3 benchmarks/select_bench.py --out "$RES/select-bench.json" > "$RES/select-bench.log" 2>&1
      log "selbench rc=$?" ;;
    smollm2) quality smollm2 2 SMOLLM2_DIR ;;
    qwen) quality qwen 8 QWEN_DIR ;;
    *) log "unknown step $step" ;;
  esac
done
touch "$RES/DONE"
log done
