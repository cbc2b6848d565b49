"""What the platform backends (cpu.py, cuda.py) share on vLLM's side: the start log line, the plan hung on vLLM's
metadata, vLLM's kernel on the rows the plan leaves to it (a re-packed subset of the batch), the padded KV page."""

from __future__ import annotations

import logging
from dataclasses import fields, replace

import torch

from . import compat
from . import params as P
from .plan import Plan
from .requests import TABLE
from .store import LayerStore, extra_page_bytes, request_memory

logger = logging.getLogger("vllm.prescore")
DECODER = "decoder"
_logged = [False]


def log_start(vllm_config, backend_name: str) -> P.PrescoreParams:
    """Refuse pipeline parallelism; log the backend once per process. Returns the server defaults."""
    compat.check_parallel(vllm_config)
    defaults = P.load_defaults(compat.additional_config(vllm_config))
    if not _logged[0]:
        _logged[0] = True
        logger.info("prescore: attention backend %s (%s) active on vLLM %s; request defaults: %s",
                    compat.BACKEND_NAME, backend_name, compat.vllm_version(), P.describe(defaults))
    return defaults


def no_window(sliding_window) -> bool:
    """An impl's ``sliding_window`` means full attention (CPU: -1, FlashAttention: (-1, -1), else None)."""
    return sliding_window in (None, -1, (-1, -1))


def group_layers(vllm_config, kv_cache_spec, layer_names) -> tuple[list[str], list[str]]:
    """(full-attention, sliding-window) layers of one KV cache group, from the layers' impls: a group may mix
    both (hybrid KV cache manager off: one group whose spec carries the sliding layers' window). Built outside
    an engine (no layers registered): the group spec decides."""
    try:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    except Exception:  # noqa: BLE001
        layers = {}
    if not layers:
        return ([], list(layer_names)) if getattr(kv_cache_spec, "sliding_window", None) else (list(layer_names), [])
    full = [n for n, layer in layers.items() if no_window(getattr(layer.impl, "sliding_window", None))]
    return full, [n for n in layers if n not in full]


def log_group(full: list[str], sliding: list[str], kernel: str) -> None:
    """One INFO line per KV cache group holding sliding-window layers (they run vLLM's kernel)."""
    if sliding:
        logger.info("prescore: sliding-window layers %s run dense (vLLM's %s kernel)%s", sliding, kernel,
                    f"; full-attention layers {full} of the same KV cache group run prescore" if full else "")


def attach(md, cm, plan: Plan, build_dense):
    """Hang ``plan`` on vLLM's metadata ``md``. When the step attends some rows of a mixed batch, vLLM's kernel
    attends only the others: ``build_dense(sub)`` builds vLLM's metadata for that re-packed subset."""
    if not plan.uniform and plan.num_attend:
        sub, plan.dense_tokens = subset_common_metadata(cm, plan.dense_rows)
        plan.dense_md = build_dense(sub) if plan.dense_rows else None
    md.prescore = plan
    return md


def dense_rows_forward(base_forward, plan: Plan, layer, query, key, value, kv_cache, attn_metadata, output) -> None:
    """vLLM's own kernel (``base_forward``) for the plan's dense rows: every token when the step attends no row,
    else the re-packed subset (``plan.dense_md`` over ``plan.dense_tokens``)."""
    if plan.dense_md is None and plan.dense_tokens is None:
        base_forward(layer, query, key, value, kv_cache, attn_metadata, output)
    elif plan.dense_md is not None:
        tok = plan.dense_tokens
        o = output.new_empty((tok.numel(), *output.shape[1:]))
        base_forward(layer, query[tok], key, value, kv_cache, plan.dense_md, o)
        output[tok] = o


def batch_rows(vllm_config, cuda: bool) -> int:
    """Rows of the planner's DecodeBuffers (= scratch selection rows): CUDA graphs may pad a batch past
    max_num_seqs up to the largest capture size."""
    n = compat.max_num_seqs(vllm_config)
    if cuda:
        n = max(n, getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0)
    return n


class StoreOwner:
    """Mixin of the platform impls: the layer's :class:`LayerStore`, (re)built when vLLM hands it another cache.
    The per-request memory (fitted states, selection cache) is allocated when the impl is built, with the model,
    before vLLM's memory profiling (:meth:`alloc_request_memory`)."""

    MIRROR = False  # CPU: keep a K|V mirror in the kernels' layout
    CUDA = False
    store: LayerStore | None = None
    prealloc: tuple | None = None

    def alloc_request_memory(self, device) -> None:
        if getattr(self, "attn_type", DECODER) != DECODER or getattr(self, "kv_sharing_target_layer_name", None):
            return
        try:
            from vllm.config import get_current_vllm_config

            cfg = get_current_vllm_config()
            defaults = P.load_defaults(compat.additional_config(cfg))
            bs = cfg.cache_config.block_size
        except Exception:  # noqa: BLE001 - built outside an engine: allocate with the first KV cache instead
            return
        if not bs:
            return
        self.prealloc = request_memory(compat.request_slots(cfg), batch_rows(cfg, self.CUDA), self.num_kv_heads,
                                       self.head_size, defaults.methods, defaults.capacity_blocks(bs), device,
                                       pending=defaults.reselect_async)

    def store_for(self, kv_cache) -> LayerStore:
        if self.store is None or self.store.key != kv_cache.data_ptr():
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("prescore: layer storage must be allocated before CUDA graph capture")
            states, cache, pending = self.prealloc or (None, None, None)
            self.store = LayerStore(kv_cache, mirror=self.MIRROR, num_slots=max(TABLE.capacity, 1), states=states,
                                    cache=cache, pending=pending)
        return self.store


def padded_spec(spec, mirror: bool):
    """vLLM's KV-cache spec with room for the block summaries (and on CPU the K|V mirror) in every page."""
    if getattr(spec, "page_size_padded", None) is not None or getattr(spec, "state_content_bytes", None):
        return spec  # already packed/padded by someone else: summaries go outside the KV budget
    extra = extra_page_bytes(spec.num_kv_heads, spec.head_size, spec.block_size, spec.dtype, mirror=mirror)
    return replace(spec, page_size_padded=spec.real_page_size_bytes + extra)


def subset_common_metadata(cm, rows: list[int]):
    """CommonAttentionMetadata of a subset of rows (tokens re-packed), plus the token index into the batch."""
    qsl = cm.query_start_loc_cpu
    toks = [torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in rows]
    tok = torch.cat(toks) if toks else torch.zeros(0, dtype=torch.long)
    lens = torch.tensor([int(qsl[r + 1] - qsl[r]) for r in rows], dtype=torch.int32)
    new_qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
    new_qsl[1:] = torch.cumsum(lens, 0)
    dev = cm.query_start_loc.device
    ridx = torch.tensor(rows, dtype=torch.long, device=dev)
    seq_lens = cm.seq_lens[ridx]
    tok_dev = tok.to(dev)
    rows_cpu = torch.tensor(rows, dtype=torch.long)
    kw = dict(
        query_start_loc=new_qsl.to(dev), query_start_loc_cpu=new_qsl, seq_lens=seq_lens,
        num_reqs=len(rows), num_actual_tokens=int(tok.numel()),
        max_query_len=int(lens.max()) if len(rows) else 0,
        max_seq_len=int(seq_lens.max()) if len(rows) else 0,
        block_table_tensor=cm.block_table_tensor[ridx], slot_mapping=cm.slot_mapping[tok_dev],
    )
    # optional per-row / per-token fields (which exist depends on the vLLM version)
    per_row = ("seq_lens_cpu_upper_bound", "is_prefilling", "req_idx", "encoder_seq_lens", "dcp_local_seq_lens",
               "dcp_local_seq_lens_cpu_upper_bound", "rswa_prefix_lens")
    for f in fields(cm):
        v = getattr(cm, f.name)
        if f.name in kw or v is None:
            continue
        if f.name in per_row:
            on_dev = isinstance(v, torch.Tensor) and v.device != rows_cpu.device
            kw[f.name] = v[ridx if on_dev else (rows_cpu if isinstance(v, torch.Tensor) else rows)]
        elif f.name == "positions":
            kw[f.name] = v[tok_dev]
        elif f.name.startswith("_"):
            kw[f.name] = None
    sub = replace(cm, **kw)
    return sub, tok.to(dev)
