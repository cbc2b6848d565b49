#!/usr/bin/env bash
# The default (hybrid) mode end to end in vLLM 0.33 on one H100: PRESCORE hybrid at budget 2048 vs FA3, both with
# CUDA graphs, 8 x 32k prompts, Llama-3-8B-shaped dummy weights (scripts/e2e_h100.py). Needs the devgpu vLLM
# bundle unpacked (`eval "$(bash /tmp/devgpu/unpack)"`), prescore installed into /tmp/devgpu/site and the dummy
# model at /tmp/llama3-8b-dummy (shared/devgpu/dummy_model.py). Writes e2e-*.json / *.log under OUT.
set -uo pipefail
OUT=${OUT:-/tmp/e2e}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
COMMON=(--graphs --workloads 8x32768 --max-model-len 33024 --budgets 2048)
python3 scripts/e2e_h100.py --backend PRESCORE --mode hybrid "${COMMON[@]}" --out "$OUT/e2e-PRESCORE-hybrid.json" \
  > "$OUT/e2e-PRESCORE-hybrid.log" 2>&1
echo "PRESCORE rc=$?"; grep "^ROW" "$OUT/e2e-PRESCORE-hybrid.log"
python3 scripts/e2e_h100.py --backend FLASH_ATTN "${COMMON[@]}" --out "$OUT/e2e-FLASH_ATTN.json" \
  > "$OUT/e2e-FLASH_ATTN.log" 2>&1
echo "FLASH_ATTN rc=$?"; grep "^ROW" "$OUT/e2e-FLASH_ATTN.log"
