#!/bin/sh
# Container entrypoint: prescore-serve (vLLM's OpenAI server with --attention-backend prescore) from the environment.
#   MODEL            model id or folder (else give it as the first argument; neither: the embedded SmolLM2)
#   HOST, PORT       listen address (image default 0.0.0.0:8000; prescore-serve's own default is 127.0.0.1)
#   API_KEY          require "Authorization: Bearer $API_KEY" on /v1 (vLLM's --api-key; VLLM_API_KEY works too)
#   PRESCORE_DEFAULT_BUDGET, PRESCORE_MIN_BUDGET, PRESCORE_MAX_BUDGET, PRESCORE_ALLOW_DENSE   budget limits
#   PRESCORE_CONFIG  backend defaults as JSON, e.g. {"method": "kmeans", "mode": "hybrid", "sink": 64, "window": 256}
#   PRESCORE_SERVE   the command to run (default prescore-serve)
# Any arguments are passed on (vLLM engine flags such as --max-model-len 32768 --gpu-memory-utilization 0.9).
set -eu

set -- --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
if [ -n "${MODEL:-}" ]; then
  set -- "$MODEL" "$@"
fi
if [ -n "${API_KEY:-}" ]; then
  set -- "$@" --api-key "$API_KEY"
fi
# shellcheck disable=SC2086 # PRESCORE_SERVE may be a command with arguments (e.g. "python3 -m prescore.server")
exec ${PRESCORE_SERVE:-prescore-serve} "$@"
