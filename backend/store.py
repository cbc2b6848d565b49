"""Per-layer storage of the prescore core (no vLLM import): block summaries per scoring method (own scores +
tags, shared key min/max), on CPU the K|V mirror in the kernels' layout, the per-request fitted states, the
per-slot selection cache and the device counters.

Summaries (and the mirror) live in the padding of each KV page, which the platform backends' ``customize_spec``
adds (:func:`extra_page_bytes`), so vLLM counts them in the KV-cache memory. The per-request memory (fitted states
``[slots, Hkv, S]`` float32, S = the largest state of the methods the server offers, and the per-slot selection
cache) is allocated by each attention impl when the model is built (:func:`request_memory`), before vLLM profiles
the memory and sizes the KV cache from what remains, so it is counted like the weights.
"""

from __future__ import annotations

import logging

import torch

from prescore.kernels import BlockSummaries, SelectionCache, get_method

from . import metrics
from . import params as P

logger = logging.getLogger("vllm.prescore")

METHOD_NAMES = P.METHOD_NAMES
LABELS = [(m, md) for m in P.METHOD_NAMES for md in P.MODE_NAMES]  # counter row = method * len(modes) + mode
_ALIGN = 64
_STORES = [0]
_once: set = set()


def label(p: P.PrescoreParams) -> int:
    """The device counter row of a request's (method, mode)."""
    return P.METHOD_NAMES.index(p.method) * len(P.MODE_NAMES) + P.MODE_NAMES.index(p.mode)


def extra_page_bytes(num_kv_heads: int, head_size: int, block_size: int, dtype: torch.dtype, mirror: bool) -> int:
    el = torch.empty((), dtype=dtype).element_size()
    M = len(P.METHOD_NAMES)  # scores per method, key min/max shared (tags: a separate contiguous tensor)
    summ = 4 * M * num_kv_heads + 2 * num_kv_heads * head_size * el + el
    kv = num_kv_heads * block_size * 2 * head_size * el if mirror else 0
    return -(-(kv + summ + _ALIGN) // _ALIGN) * _ALIGN


_PER_SLOT = {"layers": 0, "bytes": 0, "slots": 0, "slot_bytes": 0, "floats": 0, "methods": ()}


def state_floats(methods, head_size: int) -> int:
    """Floats per KV head of one request's fitted state: the largest state of the offered ``methods`` (>= 1)."""
    return max([get_method(m).state_size(head_size) for m in methods] + [1])


def request_memory(num_slots: int, scratch_rows: int, num_kv_heads: int, head_size: int, methods, capacity_blocks: int,
                   device, pending: bool = False) -> tuple[torch.Tensor, SelectionCache, SelectionCache | None]:
    """One layer's per-request memory, allocated up front (before vLLM's memory profiling): the fitted states
    ``[num_slots, Hkv, S]`` float32 and the selection cache (``num_slots + scratch_rows`` rows of
    ``capacity_blocks``)."""
    S = state_floats(methods, head_size)
    states = torch.zeros(num_slots, num_kv_heads, S, dtype=torch.float32, device=device)
    cache = SelectionCache.allocate(num_slots + scratch_rows, num_kv_heads, capacity_blocks, device)
    cache_bytes = sum(t.numel() * t.element_size() for t in (cache.ids, cache.counts, cache.kcounts, cache.dense,
                                                             cache.key))
    # reselect_async: the pending selections (same shape), written beside the decode and adopted a step later
    pend = SelectionCache.allocate(num_slots + scratch_rows, num_kv_heads, capacity_blocks, device) if pending else None
    cache_bytes *= 2 if pending else 1
    _PER_SLOT.update(layers=_PER_SLOT["layers"] + 1, bytes=_PER_SLOT["bytes"] + states.numel() * 4 + cache_bytes,
                     slots=num_slots, floats=S, methods=tuple(methods),
                     slot_bytes=num_kv_heads * S * 4 + cache_bytes // (num_slots + scratch_rows))
    return states, cache, pend


def log_once(msg, *args) -> None:
    if msg not in _once:
        _once.add(msg)
        logger.info(msg, *args)


def _view(kv_cache: torch.Tensor, dtype, byte_off: int, tail: tuple, block_stride_bytes: int):
    """A [NB, *tail] view of dtype ``dtype`` at ``byte_off`` inside every page of ``kv_cache``'s storage."""
    es = torch.empty((), dtype=dtype).element_size()
    base = kv_cache.storage_offset() * kv_cache.element_size() + byte_off
    if base % es or block_stride_bytes % es:
        return None
    strides, acc = [], 1
    for s in reversed(tail):
        strides.insert(0, acc)
        acc *= s
    t = torch.empty(0, dtype=dtype, device=kv_cache.device)
    t.set_(kv_cache.untyped_storage(), base // es, (kv_cache.shape[0], *tail), (block_stride_bytes // es, *strides))
    return t


class LayerStore:
    """Per-method block summaries (own scores + tags, shared key min/max) and, on CPU, the K|V mirror: in
    the page padding when present, else separately allocated. Tags are always a separate [M, NB] tensor."""

    def __init__(self, kv_cache: torch.Tensor, mirror: bool, num_slots: int, states: torch.Tensor | None = None,
                 cache: SelectionCache | None = None, pending: SelectionCache | None = None):
        NB, H, BS, D2 = kv_cache.shape
        D, el, dtype = D2 // 2, kv_cache.element_size(), kv_cache.dtype
        M = len(P.METHOD_NAMES)
        self.key = kv_cache.data_ptr()
        page = H * BS * D2 * el
        stride_b = kv_cache.stride(0) * el
        dense_page = (sum((n - 1) * s for n, s in zip(kv_cache.shape[1:], kv_cache.stride()[1:])) + 1) * el == page
        room = stride_b - page if dense_page else 0
        self.in_page = room >= extra_page_bytes(H, D, BS, dtype, mirror) - _ALIGN
        self.mirror = None
        if self.in_page:
            off = page
            if mirror:
                self.mirror = _view(kv_cache, dtype, off, (H, BS, D2), stride_b)
                off += H * BS * D2 * el
            off = -(-off // 4) * 4
            scores = _view(kv_cache, torch.float32, off, (M, H), stride_b)
            off = -(-(off + 4 * M * H) // el) * el
            kmin = _view(kv_cache, dtype, off, (H, D), stride_b)
            kmax = _view(kv_cache, dtype, off + H * D * el, (H, D), stride_b)
            views = (scores, kmin, kmax) + ((self.mirror,) if mirror else ())
            self.in_page = all(v is not None for v in views)
        if not self.in_page:
            logger.warning("prescore: KV pages carry no room for block summaries; allocating %.1f MiB outside "
                           "the KV-cache budget", NB * extra_page_bytes(H, D, BS, dtype, mirror) / 2**20)
            dev = kv_cache.device
            scores = torch.zeros(NB, M, H, dtype=torch.float32, device=dev)
            kmin = torch.zeros(NB, H, D, dtype=dtype, device=dev)
            kmax = torch.zeros(NB, H, D, dtype=dtype, device=dev)
            if mirror:
                self.mirror = torch.zeros(NB, H, BS, D2, dtype=dtype, device=dev)
        # tags [M, NB] contiguous per method (the Triton kernels index tags by block id); 8 B/block/method
        tags = torch.full((M, NB), -1, dtype=torch.int64, device=kv_cache.device)
        self.summ = {m: BlockSummaries(scores=scores[:, j], kmin=kmin, kmax=kmax, tags=tags[j])
                     for j, m in enumerate(P.METHOD_NAMES)}
        self.scores3, self.tags2, self.kmin, self.kmax = scores, tags, kmin, kmax  # [NB, M, H], [M, NB]
        self.num_slots = num_slots
        self.cache: SelectionCache | None = cache
        self.pending: SelectionCache | None = pending  # reselect_async's pending selections
        self.q_async: torch.Tensor | None = None  # reselect_async: the side launches' copy of the step's queries
        if states is None or states.shape[0] < num_slots:
            if states is not None:
                logger.warning("prescore: %d request slots but states for %d were allocated; allocating %d outside "
                               "vLLM's memory budget", num_slots, states.shape[0], num_slots)
            states = torch.zeros(num_slots, H, state_floats(METHOD_NAMES, D), dtype=torch.float32,
                                 device=kv_cache.device)
        self.states = states
        tag_bytes = 8 * M
        if self.in_page:  # the start line: what prescore adds (sizes in the README's Known limits)
            ps = _PER_SLOT
            log_once("prescore: memory per layer: %d bytes per KV block in the page padding (block summaries%s, "
                     "counted in the KV-cache budget) + %d bytes of block tags (allocated with the first KV cache, outside it); %d bytes per request slot (fitted "
                     "states of %s: %d floats x %d KV heads, and the selection cache) x %d slots, allocated before "
                     "vLLM's memory profiling; total over %d layers: %.1f MiB per-request + %.1f MiB per-block "
                     "(%d blocks)", stride_b - page, " + K|V mirror" if mirror else "", tag_bytes, ps["slot_bytes"],
                     "/".join(ps["methods"]), ps["floats"], H, ps["slots"], ps["layers"], ps["bytes"] / 2**20,
                     max(ps["layers"], 1) * NB * (stride_b - page + tag_bytes) / 2**20, NB)
        self.acc = metrics.device_accumulator(LABELS, kv_cache.device)
        self.index = _STORES[0]
        _STORES[0] += 1

    def selection_cache(self, capacity: int, scratch_rows: int, pending: bool = False) -> SelectionCache:
        """Per-slot selections (rows: the request slots, then one scratch row per batch row for padding);
        ``pending``: reselect_async's second cache of the same shape."""
        c = self.pending if pending else self.cache
        if c is None or c.ids.shape[2] != capacity or c.ids.shape[0] < self.num_slots + scratch_rows:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("prescore: the selection cache must be allocated before CUDA graph capture")
            c = SelectionCache.allocate(self.num_slots + scratch_rows, self.scores3.shape[2], capacity,
                                        self.scores3.device)
            if pending:
                self.pending = c
            else:
                self.cache = c
        return c

    def async_queries(self, max_rows: int, shape: tuple, dtype) -> torch.Tensor:
        """reselect_async: the persistent buffer ``[max_rows, Hq, D]`` the step copies its queries into for the
        side launches (they outlive the layer's call)."""
        b = self.q_async
        if b is None or b.shape[0] < max_rows or tuple(b.shape[1:]) != tuple(shape) or b.dtype != dtype:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("prescore: the async query buffer must be allocated before CUDA graph capture")
            self.q_async = b = torch.empty(max_rows, *shape, dtype=dtype, device=self.scores3.device)
        return b

    def is_last(self) -> bool:
        """The most recently created store: the last prescore layer of the model (layers build in order)."""
        return self.index == _STORES[0] - 1
