#!/usr/bin/env bash
# Start the session-7 GPU job detached, from a private copy of the repo.
#   call 1: bash .devgpu/c00/unpack   (carry .devgpu/c00)
#   call 2: eval "$(bash .devgpu/c01/unpack)"; bash scripts/gpu_session7_start.sh   (carry .devgpu/c01)
set -u
rm -rf /tmp/repo && mkdir -p /tmp/repo && tar --exclude=./.devgpu -cf - . | tar -xf - -C /tmp/repo
mkdir -p /tmp/res /tmp/tools
[ -f .devgpu/c01/tools/dummy_model.py ] && cp .devgpu/c01/tools/dummy_model.py /tmp/tools/
cd /tmp/repo
bash /tmp/devgpu/bg start s7 -- bash scripts/gpu_session7.sh /tmp/res
