"""PRESCORE on CUDA: vLLM's own dense kernel for prefill and dense rows -- FlashAttention (FA3 on Hopper)
when vLLM has it, else its Triton attention (``PRESCORE_DENSE_BACKEND=flash|triton`` forces one) -- and the
prescore Triton kernels for scoring, selection and sparse decode. vLLM's GPU cache layout keeps K in
``[..., :D]`` and V in ``[..., D:]``, so the kernels read the paged cache directly (no mirror).

Decode: batches of single-token decode rows take one fixed sequence of launches over persistent per-row
buffers (``uniform_decode_forward``: no host sync, capturable; the builder reports
``UNIFORM_SINGLE_TOKEN_DECODE`` so vLLM captures them as FULL CUDA graphs); dense rows in them run the
prescore kernel with every block. Mixed batches (prefill rows) plan per step on the host and run between
PIECEWISE graph pieces; their dense rows run vLLM's kernel. ``PRESCORE_UNIFORM_DECODE=0`` sends decode
batches through the per-step path too (then dense rows are bit-identical to the base backend).
"""

from __future__ import annotations

from typing import ClassVar

import os
from functools import partial

import torch
from vllm.v1.attention.backend import AttentionCGSupport

from prescore.kernels.decode import sparse_decode
from prescore.kernels.step_triton import tail_tiles

from . import compat, metrics
from . import params as P
from .attention import (_DECODER, attach_step_plan, DecodeBuffers, dense_rows_forward, extra_page_bytes, LayerStore,
                        log_start, logger, MixedPlan, plan_mixed_step, plan_uniform_decode, score_prefill_rows,
                        restrict_dense, sparse_rows_forward, uniform_decode_forward, UniformDecodePlan)
from .requests import TABLE

_flash = compat.flash_attention() if os.environ.get("PRESCORE_DENSE_BACKEND", "flash") != "triton" else None
BaseBackend, BaseBuilder, BaseImpl, _ = _flash or compat.triton_attention()
DENSE_BACKEND = "FLASH_ATTN" if _flash else "TRITON_ATTN"


class PrescoreCudaBuilder(BaseBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        tail_tiles(kv_cache_spec.head_size)  # refuses a registered scoring method without a Triton tail tile
        self.enabled = not getattr(kv_cache_spec, "sliding_window", None)
        if not self.enabled:
            logger.info("prescore: sliding-window layers %s run dense (vLLM's Triton kernel)", layer_names[:2])
        log_start(vllm_config, f"CUDA: vLLM {DENSE_BACKEND} for prefill/dense rows, prescore Triton sparse decode")
        cc = vllm_config.compilation_config
        rows = max(compat.max_num_seqs(vllm_config), getattr(cc, "max_cudagraph_capture_size", None) or 0)
        self.bufs = DecodeBuffers(rows, device)
        defaults = P.load_defaults(compat.additional_config(vllm_config))
        self.capacity = defaults.capacity_blocks(self.block_size)
        self._capturing = False

    def _uniform(self) -> bool:
        return os.environ.get("PRESCORE_UNIFORM_DECODE", "1") == "1"

    def build_for_cudagraph_capture(self, common_attn_metadata):
        # per-layer storage must exist before capture: allocating (and initialising tags) inside a graph
        # would be replayed every step
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        for layer in get_layers_from_vllm_config(self.vllm_config, Attention, self.layer_names).values():
            kv = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
            if isinstance(layer.impl, PrescoreCudaImpl) and isinstance(kv, torch.Tensor) and kv.numel():
                layer.impl.store_for(kv).selection_cache(self.capacity, self.bufs.max_rows)
        self._capturing = True
        try:
            return super().build_for_cudagraph_capture(common_attn_metadata)
        finally:
            self._capturing = False

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metrics.maybe_dump()
        if not self.enabled:
            return md
        cm = common_attn_metadata
        if self._uniform() and plan_uniform_decode(cm, self.block_size, self.bufs, self._capturing):
            md.prescore = UniformDecodePlan(self.bufs, cm.num_reqs, self.capacity)
            _debug_build(cm, True)
            return md
        _debug_build(cm, False)
        if not self._uniform():
            return attach_step_plan(md, cm, self.block_size, self.device, partial(super().build, 0))
        plan, dense_rows = plan_mixed_step(cm, self.block_size, self.device, self.capacity, self.bufs.max_rows)
        if plan.fields is not None:  # vLLM's kernel attends only the other rows
            restrict_dense(plan, cm, dense_rows, partial(super().build, 0))
        md.prescore = plan
        return md


_builds = [0]
_paths: set = set()
_eager = [0]


def _log_path_once(msg: str) -> None:
    if msg not in _paths:
        _paths.add(msg)
        logger.info(msg)


def _debug_build(cm, uniform: bool) -> None:
    """PRESCORE_DEBUG=1: log the first builds (and every 500th): rows, query lengths, the path taken."""
    if os.environ.get("PRESCORE_DEBUG") != "1":
        return
    _builds[0] += 1
    k = _builds[0]
    if k <= 60 or k % 500 == 0:
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        q = (qsl[1:] - qsl[:-1]).tolist()
        logger.info("prescore debug build %d: rows %d qlens %s seq %s req_idx %s uniform %s", k, cm.num_reqs, q[:8],
                    compat.host_seq_lens(cm).tolist()[:8], list(compat.req_slots(cm) if compat.req_slots(cm) is not None else [])[:8], uniform)


class PrescoreCudaImpl(BaseImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.store: LayerStore | None = None

    def store_for(self, kv_cache) -> LayerStore:
        if self.store is None or self.store.key != kv_cache.data_ptr():
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("prescore: layer storage must be allocated before CUDA graph capture")
            self.store = LayerStore(kv_cache, mirror=False, num_slots=max(TABLE.capacity, 1))
        return self.store

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        plan = getattr(attn_metadata, "prescore", None)
        capturing = torch.cuda.is_current_stream_capturing()
        if capturing:
            _log_path_once(f"prescore: CUDA graph capture runs the {type(plan).__name__ if plan else 'dense'} path")
        if plan is None or self.attn_type != _DECODER or self.sliding_window != (-1, -1):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        store = self.store_for(kv_cache)
        if isinstance(plan, UniformDecodePlan):
            if not capturing:
                _eager[0] += 1
                if _eager[0] in (64, 4096):
                    from vllm.forward_context import get_forward_context

                    fc = get_forward_context()
                    logger.info("prescore: %d decode-batch layer calls ran outside a FULL CUDA graph (runtime mode %s, "
                                "batch %s)", _eager[0], getattr(fc, "cudagraph_runtime_mode", "?"),
                                getattr(fc, "batch_descriptor", "?"))
            uniform_decode_forward(store, plan, query, kv_cache, attn_metadata.block_table,
                                   attn_metadata.seq_lens, output, self.scale, kv_cache.shape[2], _cuda_decode)
            return output
        if isinstance(plan, MixedPlan):
            dense_rows_forward(super().forward, plan, layer, query, key, value, kv_cache, attn_metadata, output)
            score_prefill_rows(store, plan.prefill, kv_cache, attn_metadata.block_table)
            if plan.fields is not None:
                r, tok = plan.decode_rows, plan.decode_tokens
                o = output.new_empty((tok.numel(), *output.shape[1:]))
                uniform_decode_forward(store, UniformDecodePlan(plan.fields, tok.numel(), plan.max_selected),
                                       query[tok], kv_cache, attn_metadata.block_table[r], attn_metadata.seq_lens[r],
                                       o, self.scale, kv_cache.shape[2], _cuda_decode)
                output[tok] = o
            return output
        dense_rows_forward(super().forward, plan, layer, query, key, value, kv_cache, attn_metadata, output)
        n = attn_metadata.num_actual_tokens
        sparse_rows_forward(store, plan, query[:n], kv_cache, attn_metadata.block_table,
                            attn_metadata.seq_lens, output, self.scale, kv_cache.shape[2], _cuda_decode,
                            getattr(layer, "layer_name", ""))
        return output


def _cuda_decode(q, kv, bt, sl, ids, counts, scale, sel_rows=None, out=None):
    return sparse_decode(q, kv, bt, sl, ids, counts, scale, sel_rows=sel_rows, out=out)


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
        return attn_type == _DECODER

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        if getattr(spec, "page_size_padded", None) is not None or getattr(spec, "state_content_bytes", None):
            return spec
        from dataclasses import replace

        extra = extra_page_bytes(spec.num_kv_heads, spec.head_size, spec.block_size, spec.dtype, mirror=False)
        return replace(spec, page_size_padded=spec.real_page_size_bytes + extra)


__all__ = ["PrescoreCudaBackend", "PrescoreCudaBuilder", "PrescoreCudaImpl"]
