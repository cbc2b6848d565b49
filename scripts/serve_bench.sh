#!/usr/bin/env bash
# `vllm bench serve` (vLLM's own client) against `vllm serve` with prescore's default mode and against stock FA3,
# one after the other on the same GPU (issue 14): random dataset, 32k-token inputs, 1024 output tokens,
# --ignore-eos, --max-concurrency 8, 64 requests after 8 warm-up requests (both backends); CUDA graphs and vLLM's default flags apart from the model
# length and --max-num-seqs 16. Needs the devgpu bundle unpacked, prescore on PYTHONPATH (/tmp/site) and the
# dummy model (shared/devgpu/dummy_model.py). Then: python3 scripts/collect_serve_bench.py OUT/*.json.
#   bash scripts/serve_bench.sh /tmp/res/serve            # env: RUNS, PROMPTS, CONC, RATE, INLEN, OUTLEN
set -uo pipefail
RES=${1:-/tmp/res/serve}
MODEL=${MODEL:-/tmp/llama3-8b-dummy}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
PORT=8765
# RUNS: backend:budget[:variant] (variant: step = reselect_clock step; async = reselect_async on; or server config
# fields k=v[,k=v], e.g. prescore:2048:reselect_every=4). RATE: open loop, `--request-rate RATE` requests/s
# (Poisson arrivals, still capped by CONC), e.g. FA3's closed-loop rate to compare TTFT at the same load.
for run in ${RUNS:-prescore:2048 FLASH_ATTN:none}; do
  IFS=: read -r be budget clock <<< "$run"
  tag=$be-$budget${clock:+-$(echo "$clock" | tr -c 'A-Za-z0-9\n' _)}${RATE:+-rate$RATE}
  case $clock in
    async) setting=', "reselect_async": true' ;;
    "") setting= ;;
    step|request) setting=", \"reselect_clock\": \"$clock\"" ;;
    *) setting=$(python3 -c 'import json, sys; sys.path.insert(0, sys.argv[1]); from e2e_h100 import parse_config
print("".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in parse_config(sys.argv[2]).items()))' \
         "$(dirname "$0")" "$clock") ;;  # the k=v parser of e2e_h100.py --config
  esac
  extra=()
  [ "$be" = prescore ] && extra=(--additional-config "{\"prescore\": {\"budget\": $budget$setting}}")
  echo "[serve_bench $(date +%T)] $tag"
  vllm serve "$MODEL" --load-format dummy --attention-backend "$be" --max-model-len 34816 --max-num-seqs 16 \
    --host 127.0.0.1 --port $PORT "${extra[@]}" > "$RES/server-$tag.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf 127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
  vllm bench serve --backend vllm --base-url http://127.0.0.1:$PORT --model "$MODEL" --dataset-name random \
    --random-input-len "${INLEN:-32768}" --random-output-len "${OUTLEN:-1024}" --ignore-eos \
    --max-concurrency "${CONC:-8}" ${RATE:+--request-rate "$RATE"} --num-prompts "${PROMPTS:-64}" --num-warmups "${WARMUPS:-8}" \
    --percentile-metrics ttft,tpot,itl,e2el \
    --metric-percentiles 50,99 --save-result --save-detailed --result-dir "$RES" --result-filename "bench-$tag.json" \
    > "$RES/bench-$tag.log" 2>&1
  echo "[serve_bench $(date +%T)] $be bench rc=$?"; grep -E "throughput|TTFT|TPOT|Failed" "$RES/bench-$tag.log" | head -12
  grep -E "prescore:" "$RES/server-$tag.log" | head -3
  kill $pid; wait $pid 2>/dev/null
done
