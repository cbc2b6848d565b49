#!/usr/bin/env bash
# `vllm serve MODEL --attention-backend prescore` on 127.0.0.1: one request per budget through vllm_xargs,
# one bad value (expects HTTP 400 naming the field). Usage: scripts/serve_check.sh MODEL LOG [vllm args...]
set -u
MODEL=$1; LOG=$2; shift 2
PORT=8019
VLLM="vllm"; command -v vllm >/dev/null || VLLM="python3 -m vllm.entrypoints.cli.main"
$VLLM serve "$MODEL" --attention-backend prescore --host 127.0.0.1 --port $PORT --served-model-name m "$@" >"$LOG" 2>&1 &
PID=$!
for _ in $(seq 300); do curl -sf 127.0.0.1:$PORT/health >/dev/null && break; kill -0 $PID 2>/dev/null || break; sleep 1; done
TEXT=$(python3 -c "import json;print(json.dumps(open('scripts/data/pride-and-prejudice-opening.txt').read()[:9000]+' In short,'))")
for B in 0 4096 2048 512; do
  curl -s 127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \
    -d "{\"model\":\"m\",\"prompt\":$TEXT,\"max_tokens\":24,\"temperature\":0,\"vllm_xargs\":{\"prescore_budget\":$B}}" |
    python3 -c "import json,sys; d=json.load(sys.stdin); print('budget $B ->', repr(d['choices'][0]['text'][:80]), d['usage'])"
done
curl -s -o /dev/null -w 'bad budget -> HTTP %{http_code}\n' 127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \
  -d '{"model":"m","prompt":"hi","max_tokens":4,"vllm_xargs":{"prescore_budget":-5}}'
grep -m1 "prescore: attention backend" "$LOG"
kill $PID; wait $PID 2>/dev/null
