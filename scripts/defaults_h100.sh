#!/usr/bin/env bash
# Issue 15's GPU proof, first part: `vllm serve <8B-shaped dummy model> --load-format dummy --attention-backend
# prescore` with NO other flags (vLLM's default max_num_seqs, gpu_memory_utilization, prefix caching, chunked
# prefill, CUDA graphs) must come up and serve a budgeted request sparse; the same start with stock FLASH_ATTN gives
# the KV capacity prescore costs. Writes OUT/defaults-part1.json {"vllm", "device", "max_num_seqs",
# "kv_cache_tokens_prescore", "kv_cache_tokens_flash_attn", "start_ok", "sparse_rows", "prescore_memory_line"}.
# Part 2, with a real model ($SMOLLM2_DIR, e.g. from scripts/devgpu_models.sh assemble smollm2): dense identity
# (scripts/identity_h100.py: FA3, TRITON_ATTN, PRESCORE, then --compare-dense -> OUT/dense.json), then the
# prefix-cache check judged with dense.json's noise floor (scripts/prefix_cache_check.py -> OUT/prefix.json) and
# the same check on FA3 as a control (OUT/prefix-FLASH_ATTN.json). Last, scripts/collect_defaults.py writes
# OUT/defaults-h100.json (issue 15's keys; a part that did not run stays null). PARTS picks (default "1 2").
# Needs the devgpu bundle unpacked (eval "$(bash .devgpu/c01/unpack)", never in a pipe), prescore on PYTHONPATH
# and the dummy model.
#   bash scripts/defaults_h100.sh /tmp/res/defaults
set -uo pipefail
OUT=${1:-/tmp/res/defaults}
MODEL=${MODEL:-/tmp/llama3-8b-dummy}
mkdir -p "$OUT"
export PRESCORE_METRICS_DIR="$OUT/metrics" PYTHONUNBUFFERED=1
mkdir -p "$PRESCORE_METRICS_DIR"
PORT=8766
PARTS=${PARTS:-1 2}
if [[ " $PARTS " == *" 1 "* ]]; then
for be in prescore FLASH_ATTN; do
  echo "[defaults $(date +%T)] $be"
  vllm serve "$MODEL" --load-format dummy --attention-backend "$be" --host 127.0.0.1 --port $PORT \
    > "$OUT/server-$be.log" 2>&1 &
  pid=$!
  ok=0
  for _ in $(seq 600); do
    curl -sf 127.0.0.1:$PORT/health >/dev/null && { ok=1; break; }
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  echo "$ok" > "$OUT/start-$be"
  if [ "$ok" = 1 ] && [ "$be" = prescore ]; then
    python3 - "$PORT" "$MODEL" > "$OUT/request.json" <<'PY'
import json, random, sys, urllib.request
port, model = sys.argv[1], sys.argv[2]
random.seed(0)
body = {"model": model, "prompt": [random.randrange(100, 30000) for _ in range(8192)], "max_tokens": 32,
        "ignore_eos": True, "vllm_xargs": {"prescore_budget": 1024}}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=600))
print(json.dumps({"completion_tokens": out["usage"]["completion_tokens"]}))
# the GPU workers write their counters when they build a step at least 1 s after the last write: one more
# 1-token request after that makes the file hold the budgeted request's decode rows
import time
time.sleep(1.5)
body = {"model": model, "prompt": [7, 8, 9], "max_tokens": 1}
urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                              {"Content-Type": "application/json"}), timeout=600).read()
PY
    sleep 2
  fi
  kill $pid; wait $pid 2>/dev/null
done
python3 -P - "$OUT" <<'PY'  # -P: the repo's prescore/ folder must not shadow the installed package
import glob, json, os, re, sys
out = sys.argv[1]
def log(be):
    return open(os.path.join(out, f"server-{be}.log"), errors="replace").read()
def kv_tokens(text):
    m = re.search(r"KV cache size: ([\d,]+) tokens", text)
    return int(m.group(1).replace(",", "")) if m else None
p, f = log("prescore"), log("FLASH_ATTN")
seqs = re.search(r"x (\d+) slots", p)  # prescore's memory line: max_num_seqs + 8 slots (compat.request_slots)
def start_s(text):
    m = re.search(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s", text)
    return float(m.group(1)) if m else None
mem = re.search(r"prescore: memory per layer: [^\n]*", p)
from prescore.backend import metrics
snap = metrics.read_dir(os.path.join(out, "metrics"))
sparse = sum(r.get("decode_rows_sparse", 0) for r in snap["counters"])
import torch
try:
    import vllm
    ver = vllm.__version__
except Exception:  # noqa: BLE001
    ver = None
res = {"vllm": ver, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "max_num_seqs": int(seqs.group(1)) - 8 if seqs else None,
       "start_s_prescore": start_s(p), "start_s_flash_attn": start_s(f),
       "kv_cache_tokens_prescore": kv_tokens(p), "kv_cache_tokens_flash_attn": kv_tokens(f),
       "start_ok": open(os.path.join(out, "start-prescore")).read().strip() == "1",
       "sparse_rows": sparse, "prescore_memory_line": mem.group(0) if mem else None}
json.dump(res, open(os.path.join(out, "defaults-part1.json"), "w"), indent=1)
print(json.dumps(res))
PY
fi
# DENSE_JSON=path: an earlier lease's dense.json (e.g. results/h100/session13/dense.json): skip the identity runs and
# judge the prefix check with its noise floor
if [[ " $PARTS " == *" 2 "* ]] && [ -n "${DENSE_JSON:-}" ]; then cp "$DENSE_JSON" "$OUT/dense.json"; fi
if [[ " $PARTS " == *" 2 "* ]] && [ -n "${SMOLLM2_DIR:-}" ]; then
  [ -n "${DENSE_JSON:-}" ] || for be in FLASH_ATTN TRITON_ATTN PRESCORE; do
    echo "[defaults $(date +%T)] identity $be"
    python3 scripts/identity_h100.py --model "$SMOLLM2_DIR" --backend $be --out "$OUT/identity-$be.json" \
      > "$OUT/identity-$be.log" 2>&1
    echo "[defaults $(date +%T)] identity $be rc=$?"
  done
  [ -n "${DENSE_JSON:-}" ] || python3 scripts/identity_h100.py --compare-dense \
    "$OUT"/identity-{FLASH_ATTN,TRITON_ATTN,PRESCORE}.json --out "$OUT/dense.json"
  # prefix caching on vs off: prescore, judged with the dense backends' noise floor (dense.json); then the same
  # two engines on FA3 as a control (does prefix caching change FA3's own greedy tokens on this GPU?)
  for be in prescore FLASH_ATTN; do
    f=$OUT/prefix.json; [ $be = prescore ] || f=$OUT/prefix-$be.json
    echo "[defaults $(date +%T)] prefix caching check $be"
    env -u PRESCORE_METRICS_DIR python3 scripts/prefix_cache_check.py --model "$SMOLLM2_DIR" --backend $be \
      --gpu-memory-utilization 0.4 --noise-floor-from "$OUT/dense.json" --out "$f" > "${f%.json}.log" 2>&1
    echo "[defaults $(date +%T)] prefix $be rc=$?"
  done
fi
# PART1=path: part 1's JSON from an earlier lease (e.g. results/h100/session12/defaults-part1.json) when PARTS=2
P1="$OUT/defaults-part1.json"; [ -f "$P1" ] || P1=${PART1:-$P1}
python3 scripts/collect_defaults.py --part1 "$P1" --prefix "$OUT/prefix.json" --prefix-control "$OUT/prefix-FLASH_ATTN.json" \
  --dense "$OUT/dense.json" --out "$OUT/defaults-h100.json" \
  --command "PARTS='$PARTS' PART1=${PART1:-} DENSE_JSON=${DENSE_JSON:-} SMOLLM2_DIR=... bash scripts/defaults_h100.sh OUT (scripts/collect_defaults.py)"
