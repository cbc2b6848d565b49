"""PRESCORE on CUDA: vLLM's own dense kernel for prefill and dense rows -- FlashAttention (FA3 on Hopper)
when vLLM has it, else its Triton attention -- and the core's planner and step (:mod:`.plan`, :mod:`.step`) with
the Triton ops. vLLM's GPU cache layout keeps K in ``[..., :D]`` and V in ``[..., D:]``, so the kernels read the
paged cache directly (no mirror).

Decode: batches of single-token decode rows are uniform plans: one fixed sequence of launches over the
persistent per-row buffers (no host sync, capturable; the builder reports ``UNIFORM_SINGLE_TOKEN_DECODE`` so
vLLM captures them as FULL CUDA graphs); dense rows in them run the prescore kernel with every block. Mixed
batches (prefill rows) run between PIECEWISE graph pieces: vLLM's kernel for prefill and no-budget rows, the
same step on the budgeted decode rows (a prefix of the same buffers).
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport

from prescore.kernels.step_triton import tail_tiles

from . import compat, metrics
from .common import (DECODER, StoreOwner, attach, batch_rows, dense_rows_forward, group_layers, log_group,
                     log_start, logger, no_window, padded_spec)
from .plan import DecodeBuffers, plan
from .requests import TABLE
from .step import TRITON, run, warm

_flash = compat.flash_attention()
BaseBackend, BaseBuilder, BaseImpl, _ = _flash or compat.triton_attention()
DENSE_BACKEND = "FLASH_ATTN" if _flash else "TRITON_ATTN"


class PrescoreCudaBuilder(BaseBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        tail_tiles(kv_cache_spec.head_size)  # refuses a registered scoring method without a Triton tail tile
        # sliding-window layers run dense; a group with a full-attention layer plans (see cpu.py)
        full, sliding = group_layers(vllm_config, kv_cache_spec, layer_names)
        self.enabled = bool(full)
        log_group(full, sliding, DENSE_BACKEND)
        defaults = log_start(vllm_config, f"CUDA: vLLM {DENSE_BACKEND} for prefill/dense rows, prescore Triton "
                             "sparse decode")
        self.bufs = DecodeBuffers(batch_rows(vllm_config, cuda=True), device)
        self.capacity = defaults.capacity_blocks(self.block_size)
        self.debug = defaults.debug
        self.defaults = defaults
        self._capturing = False

    def build_for_cudagraph_capture(self, common_attn_metadata):
        # per-layer storage must exist before capture: allocating (and initialising tags) inside a graph
        # would be replayed every step
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        warm_layer = None
        for layer in get_layers_from_vllm_config(self.vllm_config, Attention, self.layer_names).values():
            kv = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
            if (isinstance(layer.impl, PrescoreCudaImpl) and no_window(layer.impl.sliding_window)
                    and isinstance(kv, torch.Tensor) and kv.numel()):
                store = layer.impl.store_for(kv)
                store.selection_cache(self.capacity, self.bufs.max_rows)
                if self.defaults.reselect_async:  # its pending selections and the side launches' query copy
                    store.selection_cache(self.capacity, self.bufs.max_rows, pending=True)
                    store.async_queries(self.bufs.max_rows, (layer.impl.num_heads, layer.impl.head_size),
                                        kv.dtype)
                warm_layer = warm_layer or (layer, kv)
        if not _warmed[0] and warm_layer is not None and not torch.cuda.is_current_stream_capturing():
            _warmed[0] = True
            self._warm(warm_layer, common_attn_metadata.block_table_tensor.shape[1])
        self._capturing = True
        try:
            return super().build_for_cudagraph_capture(common_attn_metadata)
        finally:
            self._capturing = False

    def _warm(self, layer_kv, width: int) -> None:
        """Build the step's kernels now (before capture and serving), not on the first request (step.warm)."""
        import time

        layer, kv = layer_kv
        t0 = time.perf_counter()
        try:
            warm(layer.impl.store_for(kv), kv, self.bufs, width, self.capacity, self.block_size, layer.impl.num_heads,
                 self.defaults, self.defaults.methods)
            torch.cuda.synchronize()
            logger.info("prescore: decode and prefill-scoring kernels built before serving (%.1f s)",
                        time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 -- an optimisation: the kernels then build on first use
            logger.warning("prescore: kernel warm-up failed (%s: %s); kernels build on first use", type(e).__name__, e)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metrics.maybe_dump()
        if not self.enabled:
            return md
        cm = common_attn_metadata
        p = plan(cm, self.block_size, self.bufs, TABLE, max_selected=self.capacity, fused_dense=True,
                 capture=self._capturing)
        if self.debug:
            _debug_build(cm, p.uniform)
        return attach(md, cm, p, partial(super().build, 0))


_builds = [0]
_warmed = [False]
_paths: set = set()
_eager = [0]


def _log_path_once(msg: str) -> None:
    if msg not in _paths:
        _paths.add(msg)
        logger.info(msg)


def _debug_build(cm, uniform: bool) -> None:
    """Config ``debug``: log the first builds (and every 500th): rows, query lengths, the path taken."""
    _builds[0] += 1
    k = _builds[0]
    if k <= 60 or k % 500 == 0:
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        q = (qsl[1:] - qsl[:-1]).tolist()
        slots = compat.req_slots(cm)
        logger.info("prescore debug build %d: rows %d qlens %s seq %s req_idx %s uniform %s", k, cm.num_reqs, q[:8],
                    compat.host_seq_lens(cm).tolist()[:8], list(slots if slots is not None else [])[:8], uniform)


class PrescoreCudaImpl(StoreOwner, BaseImpl):
    CUDA = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if no_window(self.sliding_window):
            self.alloc_request_memory(torch.device("cuda", torch.cuda.current_device()))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        p = getattr(attn_metadata, "prescore", None)
        capturing = torch.cuda.is_current_stream_capturing()
        if capturing:
            _log_path_once(f"prescore: CUDA graph capture runs the {('uniform' if p.uniform else 'mixed') if p else 'dense'}"
                           " path")
        if p is None or self.attn_type != DECODER or self.sliding_window != (-1, -1):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        store = self.store_for(kv_cache)
        if p.uniform:
            if not capturing:
                _eager[0] += 1
                if _eager[0] in (64, 4096):
                    from vllm.forward_context import get_forward_context

                    fc = get_forward_context()
                    logger.info("prescore: %d decode-batch layer calls ran outside a FULL CUDA graph (runtime mode %s, "
                                "batch %s)", _eager[0], getattr(fc, "cudagraph_runtime_mode", "?"),
                                getattr(fc, "batch_descriptor", "?"))
        else:
            dense_rows_forward(super().forward, p, layer, query, key, value, kv_cache, attn_metadata, output)
        run(store, p, query, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens, output, self.scale,
            kv_cache.shape[2], TRITON, getattr(layer, "layer_name", ""))
        return output


class PrescoreCudaBackend(BaseBackend):
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return compat.BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return PrescoreCudaImpl

    @staticmethod
    def get_builder_cls():
        return PrescoreCudaBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == DECODER

    @classmethod
    def customize_spec(cls, spec):
        return padded_spec(super().customize_spec(spec), mirror=False)


__all__ = ["PrescoreCudaBackend", "PrescoreCudaBuilder", "PrescoreCudaImpl"]
