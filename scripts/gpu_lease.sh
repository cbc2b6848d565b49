#!/usr/bin/env bash
# One H100 lease for issues 14/15: the default mode end to end vs FA3 (8 x 32k, 1 x 131k, 8 x 16k in one engine
# each, max_model_len 131072, budgets 2048/512/4096), `vllm bench serve` (prescore with each reselect_clock, then
# stock FA3), the selection bench, and issue 15's start check. STEPS picks and orders (default below).
# Started by scripts/gpu_lease_start.sh after the devgpu bundle is unpacked. Steps: e2e serve sel kernels profile defaults quality ruler
# (quality and defaults part 2 need the real models under /tmp/models: scripts/devgpu_models.sh).
set -uo pipefail
RES=${1:-/tmp/res}
mkdir -p "$RES"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . > "$RES/install.log" 2>&1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
log() { echo "[lease $(date +%T)] $*"; }
# BACKEND:MODE[:k=v,...] -> be, mode, cfg and a file-name tag
split_run() { IFS=: read -r be mode cfg <<< "$1"; tag=$be-$mode${cfg:+-$(echo "$cfg" | tr -c 'A-Za-z0-9\n' _)}; }
# everything so far in one file, so that one wait glob ($RES.tgz) brings it all back (bg wait copies <= 8 files)
pack() { tar czf "$RES.tgz.tmp" -C "$RES" . 2>/dev/null && mv "$RES.tgz.tmp" "$RES.tgz"; }
[ -d /tmp/llama3-8b-dummy ] || python3 "${DUMMY:-/tmp/tools/dummy_model.py}" /tmp/llama3-8b-dummy
for step in ${STEPS:-e2e serve sel defaults}; do
  # real models carried and converted by scripts/devgpu_models.sh (stash + assemble), looked up at each step (the
  # pieces may arrive while an earlier step runs)
  case $step in quality) want=${QUALITY_MODELS:-smollm2 qwen} ;; ruler) want=${RULER_MODELS:-qwen gemma} ;; *) want= ;; esac
  for m in qwen gemma; do  # a model's pieces are on their way (its first piece is stashed): wait for the convert
    if [[ " $want " == *" $m "* ]] && [ -d "/tmp/models/${m:0:1}00" ]; then
      for _ in $(seq 300); do [ -f "/tmp/models/$m/.prescore-complete" ] && break; sleep 2; done
    fi
  done
  [ -f /tmp/models/smollm2/.prescore-complete ] && export SMOLLM2_DIR=/tmp/models/smollm2
  [ -f /tmp/models/qwen/.prescore-complete ] && export QWEN_DIR=/tmp/models/qwen
  [ -f /tmp/models/gemma/.prescore-complete ] && export GEMMA_DIR=/tmp/models/gemma
  case $step in
    e2e)
      # E2E_RUNS: BACKEND:MODE[:k=v,...] (server-wide prescore defaults, e.g. PRESCORE:hybrid:reselect_every=8;
      # serve_bench.sh has its own RUNS)
      for run in ${E2E_RUNS:-PRESCORE:hybrid FLASH_ATTN:none}; do
        split_run "$run"; log "e2e $be $mode $cfg"
        python3 scripts/e2e_h100.py --backend "$be" --mode "$mode" --graphs ${cfg:+--config "$cfg"} \
          --workloads "${WORKLOADS:-8x32768,1x130816,8x16384}" --max-model-len 131072 \
          --budgets "${BUDGETS:-2048,512,4096}" --out "$RES/e2e-$tag.json" > "$RES/e2e-$tag.log" 2>&1
        log "e2e $be rc=$?"; grep "^ROW" "$RES/e2e-$tag.log"
      done ;;
    serve)
      log "serve bench"; bash scripts/serve_bench.sh "$RES/serve"; log "serve bench rc=$?"
      python3 scripts/collect_serve_bench.py --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
        --vllm "$(python3 -c 'import vllm; print(vllm.__version__)')" --out "$RES/serve-bench.json" \
        --input-len "${INLEN:-32768}" --output-len "${OUTLEN:-1024}" \
        --command "RUNS=\"${RUNS:-}\" PROMPTS=${PROMPTS:-64} bash scripts/serve_bench.sh (commit $(git rev-parse --short HEAD 2>/dev/null))" \
        "$RES"/serve/bench-*.json > "$RES/serve-collect.log" 2>&1; log "collect rc=$?" ;;
    kernels)  # issue 13: the kernel table (decode, scoring, the default step's selection column; ~4 min on the H100)
      log "kernels"; python3 benchmarks/kernels_bench.py --out "$RES/kernels-h100.json" > "$RES/kernels.log" 2>&1
      log "kernels rc=$?" ;;
    sel)
      log "select bench"
      python3 benchmarks/select_bench.py --modes hybrid --every "${SEL_EVERY:-4}" --clocks "${SEL_CLOCKS:-request,step}" --width 8192 \
        --shapes "${SEL_SHAPES:-8x33024,32x33024,1x131072,8x131072}" --profile --out "$RES/select-bench.json" \
        > "$RES/select-bench.log" 2>&1
      log "select bench rc=$?" ;;
    profile)  # issue 14: per-kernel device time of one decode step at 8 x 32k (torch profiler, in-graph), default
      # configuration vs reselect_async off vs FA3, one engine each
      for run in ${PROFILE_RUNS:-PRESCORE:hybrid PRESCORE:hybrid:reselect_async=false FLASH_ATTN:none}; do
        split_run "$run"; log "profile $be $mode $cfg"
        python3 scripts/profile_h100.py --backend "$be" --mode "$mode" ${cfg:+--config "$cfg"} --budgets 2048 \
          --profile-budget 2048 --steps 48 --out "$RES/profile-$tag.json" > "$RES/profile-$tag.log" 2>&1
        log "profile $be rc=$?"; grep "^ROW\|^PROFILE" "$RES/profile-$tag.log"
      done ;;
    defaults)
      log "defaults (issue 15)"; bash scripts/defaults_h100.sh "$RES/defaults"; log "defaults rc=$?" ;;
    quality)  # issue 13: the quality tables through the shared step (SmolLM2 8k ~1 min, Qwen 32k ~1.5 min)
      log "quality"; mkdir -p "$RES/quality"
      MODELS="${QUALITY_MODELS:-smollm2 qwen}" RESULTS="$RES/quality" bash eval/h100.sh > "$RES/quality.log" 2>&1
      log "quality rc=$?" ;;
    ruler)  # issue 16: the 32k task tables (RULER-style tasks, passkey, ppl; >= 100 trials) on Qwen and gemma
      log "ruler"; mkdir -p "$RES/quality"
      MAIN=0 RULER=1 MODELS="${RULER_MODELS:-qwen gemma}" RESULTS="$RES/quality" bash eval/h100.sh > "$RES/ruler.log" 2>&1
      log "ruler rc=$?" ;;
  esac
  pack
done
touch "$RES/DONE"
pack
log done
