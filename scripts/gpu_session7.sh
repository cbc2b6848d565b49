#!/usr/bin/env bash
# Session 7 GPU lease (issue 14): selection probe + bench, the default mode end to end vs FA3 (8 x 32k and
# 1 x 131k in one engine each, max_model_len 131072, budgets 512/2048/4096), then `vllm bench serve`
# (STEPS="probe sel e2e serve defaults" picks; defaults = issue 15's start check).
# Run detached from a copy of the repo on the GPU machine after the devgpu bundle is unpacked:
#   bash /tmp/devgpu/bg start s7 -- bash scripts/gpu_session7.sh /tmp/res
set -uo pipefail
RES=${1:-/tmp/res}
mkdir -p "$RES"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . > "$RES/install.log" 2>&1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
log() { echo "[s7 $(date +%T)] $*"; }
[ -d /tmp/llama3-8b-dummy ] || python3 "${DUMMY:-/tmp/tools/dummy_model.py}" /tmp/llama3-8b-dummy
for step in ${STEPS:-sel e2e serve}; do
  case $step in
    probe)
      log "probe"; python3 benchmarks/probe_select_variants.py > "$RES/probe.log" 2>&1; log "probe rc=$?" ;;
    sel)
      log "select bench"
      python3 benchmarks/select_bench.py --modes hybrid --every 4 \
        --shapes "${SEL_SHAPES:-1x32768,8x32768,32x32768,1x131072,8x131072}" --out "$RES/select-bench.json" > "$RES/select-bench.log" 2>&1
      log "select bench rc=$?" ;;
    e2e)
      for run in ${RUNS:-PRESCORE:hybrid FLASH_ATTN:none}; do
        be=${run%%:*}; mode=${run#*:}
        log "e2e $be $mode"
        python3 scripts/e2e_h100.py --backend "$be" --mode "$mode" --graphs --workloads "${WORKLOADS:-8x32768,1x130816}" \
          --max-model-len 131072 --budgets "${BUDGETS:-2048,512,4096}" --out "$RES/e2e-$be-$mode.json" \
          > "$RES/e2e-$be-$mode.log" 2>&1
        rc=$?; log "e2e $be rc=$rc"; grep "^ROW" "$RES/e2e-$be-$mode.log"
        if [ $rc != 0 ] && [ "$be" = PRESCORE ] && [ -d "${OLD:-/tmp/old}" ]; then
          # fallback: the code before the single-step refactor (session 7, commit 7fb9e41), same kernels
          log "e2e $be again with ${OLD:-/tmp/old}"
          python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site_old "${OLD:-/tmp/old}" >> "$RES/install.log" 2>&1
          (cd "${OLD:-/tmp/old}" && PYTHONPATH=/tmp/site_old:$PYTHONPATH python3 scripts/e2e_h100.py --backend "$be" --mode "$mode" --graphs \
            --workloads "${WORKLOADS:-8x32768,1x130816}" --max-model-len 131072 --budgets "${BUDGETS:-2048,512,4096}" \
            --out "$RES/e2e-$be-$mode-old.json" > "$RES/e2e-$be-$mode-old.log" 2>&1)
          log "e2e $be old rc=$?"; grep "^ROW" "$RES/e2e-$be-$mode-old.log"
        fi
      done ;;
    serve)
      log "serve bench"; bash scripts/serve_bench.sh "$RES/serve"; log "serve bench rc=$?" ;;
    defaults)
      log "defaults (issue 15)"; bash scripts/defaults_h100.sh "$RES/defaults"; log "defaults rc=$?" ;;
  esac
done
touch "$RES/DONE"
log done
