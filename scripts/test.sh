#!/usr/bin/env bash
# The README's test command: CPU-only; Triton kernels run under the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
exec python -m pytest -q tests "$@"
