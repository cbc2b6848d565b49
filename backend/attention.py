"""The PRESCORE attention backend (``--attention-backend prescore``): ``PrescoreBackend`` is the platform's class,
the path vLLM's registry and the platform plugin name (``compat.BACKEND_PATH``).

Layout: a vLLM-free core -- :mod:`.store` (per-layer summaries, states, selection cache), :mod:`.plan` (one pass
over the batch rows per step into persistent fixed-shape buffers), :mod:`.step` (prefill scoring, then one
decode sequence: tail scoring, selection, sparse decode; Triton or torch ops) -- and thin platform modules over
vLLM's own backends: :mod:`.cpu` (vLLM's CPU attention, torch ops) and :mod:`.cuda` (FlashAttention / Triton
attention, Triton ops, FULL decode CUDA graphs); :mod:`.common` holds what both do on vLLM's side.
"""

from __future__ import annotations

from vllm.platforms import current_platform

from . import compat

compat.check_version()

if current_platform.is_cpu():
    from .cpu import PrescoreCPUBackend as PrescoreBackend
else:  # CUDA: vLLM's FlashAttention / Triton attention for prefill and dense rows, the Triton step (see cuda.py)
    from .cuda import PrescoreCudaBackend as PrescoreBackend

__all__ = ["PrescoreBackend"]
