#!/usr/bin/env bash
# Issue 6, real-model checks on the 2-GPU machine (vLLM 0.33 + prescore installed), MODEL = a converted
# Qwen2.5-Coder-0.5B-Instruct folder (14 query / 2 KV heads: TP=2 gives each rank one KV head), e.g. from
# `M=$(bash scripts/devgpu_models.sh assemble qwen)`.
#
#   bash scripts/tp_check.sh MODEL OUTDIR [STEPS]        # STEPS: all (default) or a comma list of
#                                                        #   id1,id2,http,fa2,compare
#   id1   greedy identity at TP=1 (scripts/identity_h100.py: 11 chat prompts x 64 greedy tokens), FLASH_ATTN on
#         GPU 0 and PRESCORE (budget >= context, budget 0, budget 256) on GPU 1, side by side
#   id2   PRESCORE at TP=2 (GPUs 0,1)
#   http  `vllm serve MODEL --attention-backend prescore --tensor-parallel-size 2` on 127.0.0.1 with
#         PRESCORE_METRICS_DIR=OUTDIR/metrics-http (fresh): one ~2.7k-token completion per vllm_xargs budget
#         (0, 4096, 512, 256), one bad value (HTTP 400 naming the field), then the per-process counter files
#         (prescore-<pid>.json, one per worker = per TP rank; ranks named from the server log) and the
#         prescore lines of /metrics (published when prescore's middleware is loaded: it is when
#         `prescore.server` imports; TP_CHECK_MIDDLEWARE=0 serves plain `vllm serve`) -> OUTDIR/tp-http.json
#   fa2   control: FLASH_ATTN at TP=2 (all-reduce rounding alone; runs last, only if the time budget allows)
#   compare  identity_h100.py --compare-tp -> OUTDIR/identity-tp.json (greedy_identical_tp)
# Then: python3 scripts/collect_tp2.py --dir OUTDIR (with the e2e parts of scripts/tp2_runs.sh).
#
# Time: every step runs under `timeout`, within TP_CHECK_BUDGET_S (default 480 s) for the whole script; a
# step that would start with less than its minimum left is skipped and says so (run it again later with
# STEPS=<step>: /tmp, where the model lives, survives while the machine is warm). CUDA graphs are on;
# TP_CHECK_EAGER=1 adds --eager / --enforce-eager. Progress: OUTDIR/progress. Exit 0 when every step ran OK.
# Env: PY (python3), TP_CHECK_PORT (8031), TP_CHECK_MIDDLEWARE (auto|0).
set -u
MODEL=${1:?usage: tp_check.sh MODEL OUTDIR [STEPS]}
OUT=${2:?usage: tp_check.sh MODEL OUTDIR [STEPS]}
STEPS=${3:-all}
[ "$STEPS" = all ] && STEPS=id1,id2,http,fa2,compare
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
MODEL=$(cd "$MODEL" && pwd) || { echo "no model folder $1"; exit 2; }
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
BUDGET_S=${TP_CHECK_BUDGET_S:-480}
PORT=${TP_CHECK_PORT:-8031}
EAGER=(); SERVE_EAGER=()
[ "${TP_CHECK_EAGER:-0}" = 1 ] && { EAGER=(--eager); SERVE_EAGER=(--enforce-eager); }
export PYTHONUNBUFFERED=1
T0=$SECONDS
FAILED=0
left() { echo $((BUDGET_S - (SECONDS - T0))); }
cap() { local c=$1 l; l=$(left); [ "$l" -lt "$c" ] && c=$l; echo "$c"; }
note() { echo "$(date +%T) +$((SECONDS - T0))s $*" | tee -a "$OUT/progress"; }
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
enough() {  # step min_seconds
  if [ "$(left)" -lt "$2" ]; then note "$1 SKIPPED: $(left) s left of TP_CHECK_BUDGET_S=$BUDGET_S (needs >= $2)"; FAILED=1; return 1; fi
}
gpus_idle() {  # wait (<= 30 s) until no compute process holds a GPU (a finished engine's workers exit late)
  local i
  for i in $(seq 30); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && return 0
    sleep 1
  done
  note "warning: GPUs still busy: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | tr '\n' ' ')"
}
note "start: model $MODEL, steps $STEPS, budget ${BUDGET_S}s, GPUs $(nvidia-smi -L 2>/dev/null | wc -l)"
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -lt 2 ] && { want id2 || want http || want fa2; }; then
  note "ERROR: fewer than 2 GPUs visible"; exit 2
fi
# prescore must import from the installed package (not this folder's prescore/, which lacks the backend)
if ! (cd / && "$PY" -c "import vllm, prescore.backend.platform" 2>/dev/null); then
  note "prescore (or vllm) does not import outside the repo: pip install --no-deps --target /tmp/tp-check-ps ."
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/tp-check-ps "$REPO" >/dev/null 2>&1
  export PYTHONPATH=/tmp/tp-check-ps${PYTHONPATH:+:$PYTHONPATH}
  (cd / && "$PY" -c "import vllm, prescore.backend.platform") || { note "ERROR: vllm / prescore not importable"; exit 2; }
fi

ident() {  # name gpus tp backend cap
  local t=$SECONDS rc
  CUDA_VISIBLE_DEVICES=$2 timeout -k 15 "$(cap "$5")" "$PY" scripts/identity_h100.py --model "$MODEL" \
    --backend "$4" --tensor-parallel-size "$3" "${EAGER[@]}" --out "$OUT/id-$1.json" >"$OUT/id-$1.log" 2>&1
  rc=$?
  note "id-$1 rc=$rc $((SECONDS - t))s$([ $rc = 124 ] && echo ' TIMED OUT')"
  return $rc
}

if want id1 && enough id1 120; then
  rm -f "$OUT"/id-tp1-*.json
  ident tp1-FLASH_ATTN 0 1 FLASH_ATTN 220 & P1=$!
  ident tp1-PRESCORE 1 1 PRESCORE 220 & P2=$!
  wait $P1 || FAILED=1
  wait $P2 || FAILED=1
  gpus_idle
fi
if want id2 && enough id2 120; then
  rm -f "$OUT/id-tp2-PRESCORE.json"
  ident tp2-PRESCORE 0,1 2 PRESCORE 220 || FAILED=1
  gpus_idle
fi

if want http && enough http 150; then
  MDIR=$OUT/metrics-http
  rm -rf "$MDIR"; mkdir -p "$MDIR"; rm -f "$OUT/tp-http.json"
  MW=()
  if [ "${TP_CHECK_MIDDLEWARE:-auto}" != 0 ] && (cd / && "$PY" -c "import prescore.server.middleware" 2>/dev/null); then
    MW=(--middleware prescore.server.middleware.PrescoreMiddleware)
  fi
  if command -v vllm >/dev/null; then VLLM=(vllm); else VLLM=("$PY" -m vllm.entrypoints.cli.main); fi
  SERVE=(serve "$MODEL" --attention-backend prescore --tensor-parallel-size 2 --max-model-len 8192
         --gpu-memory-utilization 0.5 --seed 0 --host 127.0.0.1 --port "$PORT" --served-model-name m
         "${SERVE_EAGER[@]}" "${MW[@]}")
  echo "${VLLM[*]} ${SERVE[*]}" >"$OUT/serve-tp2.cmd"
  HTTP_CAP=$(cap 260)
  t=$SECONDS
  # cwd $OUT: this repo's prescore/ folder must not shadow the installed package (python -m puts cwd first)
  (cd "$OUT" && CUDA_VISIBLE_DEVICES=0,1 PRESCORE_METRICS_DIR=$MDIR PRESCORE_METRICS_INTERVAL=0.2 \
     exec timeout -k 15 "$HTTP_CAP" "${VLLM[@]}" "${SERVE[@]}") >"$OUT/serve-tp2.log" 2>&1 &
  SPID=$!
  ready=0
  while [ $((SECONDS - t)) -lt $((HTTP_CAP - 60)) ]; do
    curl -sf "127.0.0.1:$PORT/health" >/dev/null 2>&1 && { ready=1; break; }
    kill -0 $SPID 2>/dev/null || break
    sleep 1
  done
  note "http: server $([ $ready = 1 ] && echo ready || echo 'NOT ready') after $((SECONDS - t))s (middleware: $([ ${#MW[@]} -gt 0 ] && echo on || echo off))"
  [ $ready = 1 ] || tail -n 25 "$OUT/serve-tp2.log"
  if [ $ready = 1 ]; then
    REM=$((HTTP_CAP - (SECONDS - t) - 5)); [ $REM -gt 90 ] && REM=90
    timeout "$REM" "$PY" - "$PORT" "$OUT" "$MDIR" "$((SECONDS - t))" "${#MW[@]}" <<'PY' || FAILED=1
import glob, json, sys, time, urllib.error, urllib.request
port, out, mdir, ready_s, mw = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] != "0"
text = open("scripts/data/pride-and-prejudice-opening.txt").read()
base = f"http://127.0.0.1:{port}"


def post(body, timeout=60):
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r), {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-prescore")}
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:600], {}


res = {"server_ready_s": ready_s, "middleware": mw, "requests": []}
budgets = [0, 4096, 512, 256]
for i, b in enumerate(budgets):  # a rotated text per request: no shared prefix blocks between requests
    k = 2000 * i
    prompt = text[k:] + "\n\n" + text[:k] + "\n\nIn short,"
    t = time.perf_counter()
    code, d, hdr = post({"model": "m", "prompt": prompt, "max_tokens": 48, "temperature": 0,
                         "vllm_xargs": {"prescore_budget": b}})
    res["requests"].append({"budget": b, "status": code, "seconds": round(time.perf_counter() - t, 2),
                            "text": d["choices"][0]["text"][:100] if code == 200 else d,
                            "usage": d.get("usage") if code == 200 else None, "headers": hdr})
if mw:  # prescore's own HTTP field, through the middleware
    code, d, hdr = post({"model": "m", "prompt": text[6000:] + text[:6000], "max_tokens": 16, "temperature": 0,
                         "key_budget": 512})
    res["requests"].append({"key_budget": 512, "status": code, "headers": hdr,
                            "text": d["choices"][0]["text"][:100] if code == 200 else d})
code, d, _ = post({"model": "m", "prompt": "hi", "max_tokens": 4, "vllm_xargs": {"prescore_budget": -5}})
body = d if isinstance(d, str) else json.dumps(d)
res["bad_value"] = {"request": {"vllm_xargs": {"prescore_budget": -5}}, "status": code, "body": body[:600],
                    "names_field": code == 400 and "prescore_budget" in body}
time.sleep(1.0)  # > PRESCORE_METRICS_INTERVAL: the next step rewrites every worker's file
post({"model": "m", "prompt": "flush", "max_tokens": 2, "vllm_xargs": {"prescore_budget": 0}})
time.sleep(1.0)
try:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        res["metrics_prescore"] = [l for l in r.read().decode().splitlines()
                                   if l.startswith("prescore") and not l.startswith("#")]
except Exception as e:  # noqa: BLE001
    res["metrics_prescore"] = f"unavailable: {e}"
res["files_live"] = {f.rsplit("/", 1)[-1]: json.load(open(f)) for f in sorted(glob.glob(f"{mdir}/prescore-*.json"))}
json.dump(res, open(f"{out}/tp-http.json", "w"), indent=1)
PY
  fi
  # timeout (pid SPID) leads its own process group: TERM reaches the server, the engine and the TP workers
  kill -TERM $SPID 2>/dev/null
  for _ in $(seq 40); do kill -0 $SPID 2>/dev/null || break; sleep 1; done
  kill -KILL -- -$SPID 2>/dev/null
  wait $SPID 2>/dev/null
  gpus_idle
  # per-process counters after exit (workers also dump at exit), ranks from the server log, verdict
  "$PY" - "$OUT" "$MDIR" "$(cat "$OUT/serve-tp2.cmd")" <<'PY' || FAILED=1
import glob, json, os, re, sys
out, mdir, cmd = sys.argv[1], sys.argv[2], sys.argv[3]
path = f"{out}/tp-http.json"
res = json.load(open(path)) if os.path.exists(path) else {"error": "no HTTP results (server not ready?)"}
res["command"] = cmd
ranks = {}
log = open(f"{out}/serve-tp2.log", errors="replace").read()
for name, pid in re.findall(r"\((Worker_[A-Za-z0-9_]+) pid=(\d+)\)", log):
    ranks[int(pid)] = name
snaps = {}
for f in sorted(glob.glob(f"{mdir}/prescore-*.json")):
    try:
        snaps[f.rsplit("/", 1)[-1]] = json.load(open(f))
    except ValueError:
        pass
for name, s in res.pop("files_live", {}).items():  # keep the larger of the live and exit snapshots
    if name not in snaps or s.get("time", 0) > snaps[name].get("time", 0):
        snaps[name] = s
procs = []
for name, s in sorted(snaps.items()):
    tot = {}
    for c in s.get("counters", []):
        for k, v in c.items():
            if isinstance(v, (int, float)):
                tot[k] = tot.get(k, 0) + v
    pid = s.get("pid") or int(re.sub(r"\D", "", name) or 0)
    procs.append({"pid": pid, "process": ranks.get(pid, "?"), "file": name, **tot, "by_method_mode": s.get("counters", [])})
res["processes"] = procs
sparse = [p for p in procs if p.get("decode_rows_sparse", 0) > 0]
res["ranks_with_sparse_decode"] = len(sparse)
res["ranks_agree"] = len({p.get("decode_rows_sparse") for p in sparse}) == 1 if sparse else False
for p in procs:
    if p.get("context_tokens"):
        p["attended_share"] = round(p["selected_tokens"] / p["context_tokens"], 4)
reqs = res.get("requests", [])
res["ok"] = bool(reqs) and all(r["status"] == 200 for r in reqs) and res.get("bad_value", {}).get("names_field", False) \
    and len(sparse) >= 2
json.dump(res, open(path, "w"), indent=1)
for r in res.get("requests", []):
    b = f"budget {r['budget']}" if "budget" in r else f"key_budget {r.get('key_budget')}"
    print(f"  {b:16s} HTTP {r['status']}  prompt tokens {(r.get('usage') or {}).get('prompt_tokens', '-')}  "
          f"{json.dumps(r['headers']) if r.get('headers') else ''} {str(r['text'])[:60]!r}")
if "error" in res:
    print("  ERROR:", res["error"])
else:
    bad = res.get("bad_value", {})
    print(f"  bad value -> HTTP {bad.get('status')} names the field: {bad.get('names_field')}  {bad.get('body', '')[:160]}")
    m = res.get("metrics_prescore") or []
    print("  /metrics:", m if isinstance(m, str) else f"{len(m)} prescore lines, e.g. "
          + "; ".join(l for l in m if "decode_rows_sparse" in l)[:300])
for p in procs:
    print(f"  pid {p['pid']:>7} {p['process']:12s} sparse rows {p.get('decode_rows_sparse', 0):>6.0f}  dense rows "
          f"{p.get('decode_rows_dense', 0):>6.0f}  prefill tokens {p.get('prefill_tokens', 0):>7.0f}  "
          f"attended {p.get('attended_share', '-')}")
print("tp-http ok:", res["ok"], "| ranks with sparse decode:", len(sparse), "| ranks agree:", res["ranks_agree"])
sys.exit(0 if res["ok"] else 1)
PY
  note "http done $((SECONDS - t))s (ok=$("$PY" -c "import json;print(json.load(open('$OUT/tp-http.json')).get('ok'))" 2>/dev/null))"
fi

if want fa2 && enough fa2 110; then
  rm -f "$OUT/id-tp2-FLASH_ATTN.json"
  ident tp2-FLASH_ATTN 0,1 2 FLASH_ATTN 220 || FAILED=1
fi

if want compare; then
  FILES=("$OUT/id-tp1-FLASH_ATTN.json" "$OUT/id-tp1-PRESCORE.json" "$OUT/id-tp2-PRESCORE.json")
  [ -f "$OUT/id-tp2-FLASH_ATTN.json" ] && FILES+=("$OUT/id-tp2-FLASH_ATTN.json")
  if ls "${FILES[@]}" >/dev/null 2>&1; then
    "$PY" scripts/identity_h100.py --compare-tp "${FILES[@]}" --out "$OUT/identity-tp.json" >"$OUT/identity-tp.log" 2>&1
    "$PY" - "$OUT/identity-tp.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("greedy_identical_tp:", r["greedy_identical_tp"], r["problems"] or "")
for k, v in r["detail"].items():
    print(f"  {k:55s} {v['identical']}/{v['of']}" + (f"  first diff (prompt, token) {v['first_diff']}" if v["first_diff"] else ""))
PY
  else
    note "compare: missing $(for f in "${FILES[@]}"; do [ -f "$f" ] || printf '%s ' "${f##*/}"; done)"; FAILED=1
  fi
fi
note "end: $((SECONDS - T0))s, $([ $FAILED = 0 ] && echo 'all steps OK' || echo 'SOME STEPS FAILED OR SKIPPED (see above)')"
exit $FAILED
