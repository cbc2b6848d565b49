#!/usr/bin/env bash
# Issue 6 real-model checks on a 2-GPU machine (vLLM installed), MODEL = a converted Qwen2.5-Coder-0.5B folder
# (14 query / 2 KV heads: TP=2 gives each rank one KV head):
#  1. greedy identity (scripts/identity_h100.py: 11 chat prompts, 64 greedy tokens; PRESCORE at budget >= context,
#     budget 0 and 256): FLASH_ATTN and PRESCORE at TP=1 (one GPU each, side by side), then both at TP=2;
#  2. HTTP: `vllm serve MODEL --attention-backend prescore --tensor-parallel-size 2`, one completion per
#     vllm_xargs budget, one bad value (HTTP 400 naming the field), then the per-process prescore counters
#     (PRESCORE_METRICS_DIR: one file per worker process = per TP rank).
#   bash scripts/tp_check.sh MODEL OUTDIR       # then python3 scripts/collect_tp2.py
set -u
MODEL=$1; OUT=$2
mkdir -p "$OUT"
id() {  # name gpus tp backend
  CUDA_VISIBLE_DEVICES=$2 timeout 600 python3 scripts/identity_h100.py --model "$MODEL" --backend "$4" \
    --tensor-parallel-size "$3" --out "$OUT/id-$1.json" >"$OUT/id-$1.log" 2>&1
  echo "id-$1 rc=$?" >>"$OUT/progress"
}
id tp1-FLASH_ATTN 0 1 FLASH_ATTN &
id tp1-PRESCORE 1 1 PRESCORE &
wait
id tp2-FLASH_ATTN 0,1 2 FLASH_ATTN
id tp2-PRESCORE 0,1 2 PRESCORE

MDIR=$OUT/metrics; rm -rf "$MDIR"; mkdir -p "$MDIR"
PORT=8031
PRESCORE_METRICS_DIR=$MDIR PRESCORE_METRICS_INTERVAL=0.2 timeout 420 vllm serve "$MODEL" --attention-backend prescore \
  --tensor-parallel-size 2 --max-model-len 8192 --gpu-memory-utilization 0.5 --host 127.0.0.1 --port $PORT \
  --served-model-name m >"$OUT/serve-tp2.log" 2>&1 &
PID=$!
for _ in $(seq 240); do curl -sf 127.0.0.1:$PORT/health >/dev/null && break; kill -0 $PID 2>/dev/null || break; sleep 1; done
python3 - "$PORT" "$OUT/tp-http.json" "$MDIR" <<'PY'
import json, glob, sys, time, urllib.request, urllib.error
port, out, mdir = sys.argv[1], sys.argv[2], sys.argv[3]
text = open("scripts/data/pride-and-prejudice-opening.txt").read()[:12000] + "\n\nIn short,"
def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()[:300]
res = {"requests": []}
for b in (0, 4096, 512, 256):
    code, d = post({"model": "m", "prompt": text, "max_tokens": 48, "temperature": 0,
                    "vllm_xargs": {"prescore_budget": b}})
    res["requests"].append({"budget": b, "status": code,
                            "text": d["choices"][0]["text"][:80] if code == 200 else d,
                            "usage": d.get("usage") if code == 200 else None})
code, d = post({"model": "m", "prompt": "hi", "max_tokens": 4, "vllm_xargs": {"prescore_budget": -5}})
res["bad_value"] = {"status": code, "body": d if isinstance(d, str) else json.dumps(d)[:300]}
time.sleep(2)
procs = []
for f in sorted(glob.glob(f"{mdir}/prescore-*.json")):
    snap = json.load(open(f))
    tot = {}
    for c in snap["counters"]:
        for k, v in c.items():
            if isinstance(v, (int, float)):
                tot[k] = tot.get(k, 0) + v
    procs.append({"pid": snap["pid"], **tot})
res["processes"] = procs
res["ranks_with_sparse_decode"] = sum(1 for p in procs if p.get("decode_rows_sparse", 0) > 0)
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res, indent=1)[:3000])
PY
kill $PID; wait $PID 2>/dev/null
echo "http done" >>"$OUT/progress"
