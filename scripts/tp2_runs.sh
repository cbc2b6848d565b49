#!/usr/bin/env bash
# Issue 6 timing runs on a 2-GPU machine (vLLM installed, dummy Llama-3-8B config at /tmp/llama3-8b-dummy):
# TP=1 FLASH_ATTN and TP=1 PRESCORE side by side (one GPU each), then TP=2 FLASH_ATTN, then TP=2 PRESCORE;
# 8 x 32k prompts, CUDA graphs, budget 2048, direct pure-decode step timing (scripts/e2e_h100.py).
#   bash scripts/tp2_runs.sh OUTDIR        # then: python3 scripts/collect_tp2.py (results/tp2-h200.json)
set -u
OUT=${1:-/tmp/tp2}
mkdir -p "$OUT"
COMMON=(--graphs --max-model-len 34000 --workloads 8x32768 --budgets 2048 --mode prior)
run() {  # name gpus tp backend
  CUDA_VISIBLE_DEVICES=$2 timeout 900 python3 scripts/e2e_h100.py --backend "$4" --tensor-parallel-size "$3" \
    "${COMMON[@]}" --out "$OUT/e2e-$1.json" >"$OUT/e2e-$1.log" 2>&1
  echo "$1 rc=$? $(grep -c '^ROW' "$OUT/e2e-$1.log") rows" >>"$OUT/progress"
}
echo "start $(date +%T)" >>"$OUT/progress"
run tp1-FLASH_ATTN 0 1 FLASH_ATTN &
run tp1-PRESCORE 1 1 PRESCORE &
wait
run tp2-FLASH_ATTN 0,1 2 FLASH_ATTN
run tp2-PRESCORE 0,1 2 PRESCORE
echo "done $(date +%T)" >>"$OUT/progress"
