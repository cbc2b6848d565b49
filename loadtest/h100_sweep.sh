#!/usr/bin/env bash
# Budget sweep on a GPU machine: prescore-serve on dummy Llama-3-8B-shaped weights, 16k-token prompts from real
# text, budgets {dense, 4096, 2048, 512}; writes results/loadtest-h100.json (+ .md, plots when matplotlib is there)
# and, when $OUT is set (the lent GPU machine), copies them and the server log under $OUT/.
#
#   eval "$(bash /tmp/devgpu/unpack)"      # vLLM on the lent machine (shared/devgpu/README.md)
#   bash loadtest/h100_sweep.sh
#
# Environment (defaults): REQUESTS=32 per budget, CONCURRENCY=16, PROMPT_TOKENS=16384, OUTPUT_TOKENS=128,
# WARMUP=2, BUDGETS=dense,4096,2048,512, PHASE_S=90 (per-budget bound), PORT=8765, MODEL_DIR=/tmp/llama3-8b-dummy,
# EAGER=1 (0: CUDA graphs, piecewise around attention; slower start), SERVE_ARGS (extra prescore-serve / vLLM flags), RESULT=results/loadtest-h100.json, DUMMY_MODEL=path of
# shared/devgpu/dummy_model.py (searched for when unset), SITE=/tmp/devgpu/site (where the plugin is installed
# when it is not importable yet).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REQUESTS=${REQUESTS:-32}
CONCURRENCY=${CONCURRENCY:-16}
PROMPT_TOKENS=${PROMPT_TOKENS:-16384}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-128}
WARMUP=${WARMUP:-2}
BUDGETS=${BUDGETS:-dense,4096,2048,512}
PHASE_S=${PHASE_S:-90}
PORT=${PORT:-8765}
MODEL_DIR=${MODEL_DIR:-/tmp/llama3-8b-dummy}
RESULT=${RESULT:-results/loadtest-h100.json}
SITE=${SITE:-/tmp/devgpu/site}
LOG=${LOG:-/tmp/prescore-serve-h100.log}
EAGER_FLAG=--enforce-eager; [ "${EAGER:-1}" = 0 ] && EAGER_FLAG=
export PYTHONUNBUFFERED=1

# 1. the plugin, with its entry points (vLLM's engine and worker processes find it through its .dist-info)
if ! python3 -c "import prescore.server.cli, prescore.loadtest.generator" 2> /dev/null \
   || ! command -v prescore-serve > /dev/null; then
  echo "installing prescore into $SITE"
  python3 -m pip install -q --no-deps --no-build-isolation --target "$SITE" "$ROOT" || exit 4
  export PATH="$SITE/bin:$PATH"
fi
command -v prescore-serve > /dev/null || { echo "prescore-serve not on PATH"; exit 4; }

# 2. the dummy model folder (config + tokenizer, no weights: --load-format dummy)
if [ ! -f "$MODEL_DIR/config.json" ]; then
  dm=${DUMMY_MODEL:-}
  for c in "$ROOT/shared/devgpu/dummy_model.py" "$ROOT/../shared/devgpu/dummy_model.py" \
           "$ROOT/.devgpu/tools/dummy_model.py" /work/shared/devgpu/dummy_model.py; do
    [ -z "$dm" ] && [ -f "$c" ] && dm=$c
  done
  [ -n "$dm" ] || { echo "dummy_model.py not found (set DUMMY_MODEL)"; exit 5; }
  python3 "$dm" "$MODEL_DIR" || exit 5
fi

# 3. the server (127.0.0.1; prefix caching off so every 16k prompt is prefilled)
# shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
setsid prescore-serve "$MODEL_DIR" --load-format dummy --served-model-name dummy --host 127.0.0.1 --port "$PORT" \
  --max-model-len $((PROMPT_TOKENS + OUTPUT_TOKENS + 512)) --max-num-seqs "$CONCURRENCY" --no-enable-prefix-caching \
  $EAGER_FLAG --gpu-memory-utilization 0.90 --prescore-max-budget 65536 ${SERVE_ARGS:-} > "$LOG" 2>&1 &
pid=$!
stop() { kill -INT -- -"$pid" 2> /dev/null; for _ in $(seq 1 30); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
         kill -9 -- -"$pid" 2> /dev/null; wait "$pid" 2> /dev/null; }
trap stop EXIT
t0=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1; do
  if ! kill -0 "$pid" 2> /dev/null || [ $(( $(date +%s) - t0 )) -gt 400 ]; then
    echo "server not ready; last log lines:"; tail -40 "$LOG"; [ -n "${OUT:-}" ] && cp "$LOG" "$OUT/"; exit 6
  fi
  sleep 2
done
echo "server ready after $(( $(date +%s) - t0 )) s"
grep -m2 -iE "attention backend|PRESCORE" "$LOG" || true

# 4. the sweep
mkdir -p "$(dirname "$RESULT")"
PYTHONSAFEPATH=1 python3 -m prescore.loadtest.generator --base-url "http://127.0.0.1:$PORT" --model dummy --budgets "$BUDGETS" \
  --requests "$REQUESTS" --warmup "$WARMUP" --concurrency "$CONCURRENCY" --prompt-tokens "$PROMPT_TOKENS" \
  --output-tokens "$OUTPUT_TOKENS" --duration-s "$PHASE_S" --timeout-s 300 --no-progress --out "$RESULT"
rc=$?
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^prescore:" > "${RESULT%.json}-metrics.txt" || true
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp "${RESULT%.json}"* "$OUT/results/" 2> /dev/null
  cp "$LOG" "$OUT/"
fi
exit $rc
