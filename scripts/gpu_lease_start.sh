#!/usr/bin/env bash
# Start the GPU lease's jobs detached (scripts/gpu_lease.sh), from a private copy of the repo.
#   (here, once: ../shared/devgpu/pack --drop-moe --chunk-mb 52; bash scripts/devgpu_models.sh prepare smollm2;
#    cp ../shared/devgpu/dummy_model.py .devgpu/c01/tools/)
#   call 1 (carry .devgpu/s00): bash scripts/devgpu_models.sh stash .devgpu/s00
#   call 2 (carry .devgpu/s01): bash scripts/devgpu_models.sh stash .devgpu/s01 && bash scripts/devgpu_models.sh assemble smollm2
#     (only for the steps `quality` and `defaults` part 2; SmolLM2 -> /tmp/models/smollm2)
#   call 3 (carry .devgpu/c00):  bash .devgpu/c00/unpack
#   call 4 (carry .devgpu/c01), each within 30 s of the last:
#       eval "$(bash .devgpu/c01/unpack)"; STEPS="quality e2e defaults serve" bash scripts/gpu_lease_start.sh
#   (never pipe that eval: a pipe runs it in a subshell and the jobs lose vLLM's PYTHONPATH; session 7 lost a
#   lease that way.) Then, call after call, short waits so each brings back what exists (a machine taken back
#   mid-call returns nothing; session 8 lost 6 minutes that way):
#       bash /tmp/devgpu/bg wait lease 240 '/tmp/res/e2e-*.json' /tmp/res/serve-bench.json \
#           /tmp/res/select-bench.json '/tmp/res/defaults/*.json'
#   (at most 8 files come back per call: name logs one at a time when a step fails; bg names its own log
#   lease/lease.log, so keep result files' names different from the job's.)
set -u
mkdir -p /tmp/repo /tmp/res /tmp/tools
[ -f /tmp/repo/pyproject.toml ] || tar --exclude=./.devgpu --exclude=./.gpu_old -cf - . | tar -xf - -C /tmp/repo
[ -f .devgpu/c01/tools/dummy_model.py ] && cp .devgpu/c01/tools/dummy_model.py /tmp/tools/
cd /tmp/repo
bash /tmp/devgpu/bg start lease -- env STEPS="${STEPS:-e2e serve sel defaults}" bash scripts/gpu_lease.sh /tmp/res
