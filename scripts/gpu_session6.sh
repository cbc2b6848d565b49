#!/usr/bin/env bash
# Session 6 GPU lease (issue 14): the query-aware selection bench, then the default mode end to end vs FA3 in
# the same lease (CUDA graphs, Llama-3-8B-shaped dummy weights). Run detached from the repo root on the GPU
# machine after the devgpu bundle is unpacked (eval "$(bash /tmp/devgpu/unpack)"):
#   bash /tmp/devgpu/bg start s6 -- bash scripts/gpu_session6.sh /tmp/res
set -uo pipefail
RES=${1:-/tmp/res}
mkdir -p "$RES"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . > "$RES/install.log" 2>&1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
log() { echo "[s6 $(date +%T)] $*"; }
[ -d /tmp/llama3-8b-dummy ] || python3 "${DUMMY:-/tmp/tools/dummy_model.py}" /tmp/llama3-8b-dummy
COMMON=(--graphs --workloads "${WORKLOADS:-8x32768,1x130816}" --max-model-len 131072 --budgets "${BUDGETS:-2048}")
for step in ${STEPS:-sel e2e serve profile}; do
  case $step in
    sel)
      log "select bench"
      python3 benchmarks/select_bench.py --out "$RES/select-bench.json" > "$RES/select-bench.log" 2>&1
      log "select bench rc=$?" ;;
    e2e)
      for run in ${RUNS:-PRESCORE:hybrid FLASH_ATTN:none}; do
        be=${run%%:*}; mode=${run#*:}
        log "e2e $be $mode"
        python3 scripts/e2e_h100.py --backend "$be" --mode "$mode" "${COMMON[@]}" --out "$RES/e2e-$be-$mode.json" \
          > "$RES/e2e-$be-$mode.log" 2>&1
        log "e2e $be rc=$?"; grep "^ROW" "$RES/e2e-$be-$mode.log"
      done ;;
    profile)
      log "profile (in-graph, torch profiler)"
      VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 scripts/profile_h100.py --backend PRESCORE --mode hybrid --budgets 2048 \
        --profile-budget 2048 --max-model-len 33024 --out "$RES/profile-hybrid.json" > "$RES/profile-hybrid.log" 2>&1
      log "profile rc=$?" ;;
    serve)
      log "serve bench"
      bash scripts/serve_bench.sh "$RES/serve"
      log "serve bench rc=$?" ;;
  esac
done
touch "$RES/DONE"
log done
