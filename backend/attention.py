"""The PRESCORE attention backend (``--attention-backend prescore``).

Per step the metadata builder plans, on the host, what each batch row needs (see :class:`StepPlan`):

- prefill rows (``num_computed < prefill_len``): dense causal attention by vLLM's own kernel, then
  ``score_prefill`` over the blocks the chunk filled (the final chunk fits the method's state);
- decode rows: ``score_decode_tail`` for the block that received the new token; a row is *dense* (vLLM's
  kernel) when its budget is 0 or its context fits in sink + window + budget, else *sparse*:
  ``select_blocks`` + sparse decode over the selected blocks (Triton on CUDA, the torch reference on CPU).

Per layer the impl owns :class:`LayerStore`: block summaries (scores, key min/max, tags) and, on CPU, a
K|V mirror of the cache in the kernels' layout (vLLM's CPU cache stores each head's K rows then V rows,
not ``[..., :D] | [..., D:]``). Both live in the padding of each KV page, which ``customize_spec`` adds,
so vLLM counts them in the KV-cache memory; the per-request fitted states are a separate
``[slots, Hkv, S]`` float32 buffer per layer.
"""

from __future__ import annotations

from functools import partial

import logging
import os
import time
from dataclasses import dataclass, fields, replace

import torch
from vllm.platforms import current_platform

from prescore.kernels import (BlockSummaries, METHODS, MODES, SelectionCache, get_method, score_decode_tail, score_prefill,
                              select_blocks)
from prescore.kernels.decode import sparse_decode_ref

from . import compat, metrics
from . import params as P
from .requests import TABLE

compat.check_version()
logger = logging.getLogger("vllm.prescore")

CPUBackend, CPUBuilder, CPUImpl, CPUMetadata = compat.cpu_attention()
_DECODER = "decoder"
_METHOD_NAMES = list(P.METHOD_NAMES)
_LABELS = [(m, md) for m in P.METHOD_NAMES for md in P.MODE_NAMES]  # counter row = method * len(modes) + mode
_ALIGN = 64

# Test hook: when a list, every sparse decode appends what it attended (see tests/test_backend_*).
CAPTURE: list | None = None


def _label(p: P.PrescoreParams) -> int:
    return P.METHOD_NAMES.index(p.method) * len(P.MODE_NAMES) + P.MODE_NAMES.index(p.mode)


def extra_page_bytes(num_kv_heads: int, head_size: int, block_size: int, dtype: torch.dtype, mirror: bool) -> int:
    el = torch.empty((), dtype=dtype).element_size()
    M = len(P.METHOD_NAMES)  # scores per method, key min/max shared (tags: a separate contiguous tensor)
    summ = 4 * M * num_kv_heads + 2 * num_kv_heads * head_size * el + el
    kv = num_kv_heads * block_size * 2 * head_size * el if mirror else 0
    return -(-(kv + summ + _ALIGN) // _ALIGN) * _ALIGN


# ----------------------------------------------------------------------------------------------------------
# Host-side plan
# ----------------------------------------------------------------------------------------------------------

@dataclass
class MethodGroup:
    """One scoring method's decode rows of the step (each method has its own scores and tags per block)."""

    method: str
    score_rows: torch.Tensor  # [Bd] decode rows whose newest block gets (re)scored
    score_slots: torch.Tensor
    score_tags: torch.Tensor
    score_ids: torch.Tensor  # kernel method id per score row
    sparse_rows: torch.Tensor  # [Bs]
    sparse_tokens: torch.Tensor  # [Bs] query token of each sparse row
    sparse_slots: torch.Tensor  # [Bs] request slot of each sparse row (its selection-cache row)
    ctags: torch.Tensor  # [Bs] admission serial of each sparse row (the selection cache's key)
    budget: torch.Tensor  # [Bs] blocks
    sink: torch.Tensor
    window: torch.Tensor
    mode: torch.Tensor
    prior: torch.Tensor
    tags: torch.Tensor
    labels: torch.Tensor  # [Bs] counter row
    need_query: bool

    @property
    def num_sparse(self) -> int:
        return int(self.sparse_rows.numel())


@dataclass
class StepPlan:
    prefill: list  # (row, start, end, final, slot, method, tag)
    groups: list  # MethodGroup per method with decode rows
    max_selected: int
    dense_tokens: torch.Tensor | None = None  # tokens vLLM's kernel attends when some rows are sparse
    dense_md: object | None = None

    @property
    def num_sparse(self) -> int:
        return sum(g.num_sparse for g in self.groups)


def _i(vals, device, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype, device=device)


_KEYS = ("score_rows", "score_slots", "score_tags", "sparse_rows", "sparse_tokens", "sparse_slots", "ctags", "budget",
         "sink", "window", "mode", "prior", "tags", "labels")
_DTYPES = {"score_rows": torch.long, "score_slots": torch.long, "score_tags": torch.int64, "sparse_rows": torch.long,
           "sparse_tokens": torch.long, "tags": torch.int64, "labels": torch.long, "ctags": torch.int64}


def plan_step(cm, block_size: int, device) -> tuple[StepPlan, list[int]]:
    """Classify the batch rows (host only). Returns the plan and the rows vLLM's kernel must attend."""
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1].tolist()
    seq = compat.host_seq_lens(cm).tolist()
    slots = TABLE.slots(n, compat.req_slots(cm))
    prefill, dense_rows = [], []
    groups: dict[str, dict] = {}
    for i in range(n):
        qlen, ctx = qsl[i + 1] - qsl[i], int(seq[i])
        slot = slots[i]
        p = TABLE.params[slot] if slot >= 0 else None
        if qlen <= 0 or p is None:
            dense_rows.append(i)
            continue
        start = ctx - qlen
        tag = TABLE.tag[slot]
        if start < TABLE.prefill_len[slot]:  # (part of) a prefill
            dense_rows.append(i)
            if p.budget > 0:
                final = ctx >= TABLE.prefill_len[slot]
                prefill.append((i, start, ctx, final, slot, p.method, tag))
                metrics.add(p.method, p.mode, prefill_rows=1, prefill_tokens=qlen)
            continue
        if p.budget == 0 or qlen != 1:  # dense by request (or a multi-token decode: not sparse-capable)
            dense_rows.append(i)
            metrics.add(p.method, p.mode, decode_rows_dense=1)
            continue
        g = groups.setdefault(p.method, {k: [] for k in _KEYS} | {"need_query": False})
        g["score_rows"].append(i), g["score_slots"].append(slot), g["score_tags"].append(tag)
        budget, sink, window, prior = p.blocks(block_size)
        if -(-ctx // block_size) <= sink + window + budget:
            dense_rows.append(i)
            metrics.add(p.method, p.mode, decode_rows_dense=1)
            continue
        metrics.add(p.method, p.mode, decode_rows_sparse=1)
        for k, v in (("sparse_rows", i), ("sparse_tokens", qsl[i]), ("sparse_slots", slot),
                     ("ctags", TABLE.serial[slot]), ("budget", budget),
                     ("sink", sink),
                     ("window", window), ("mode", MODES[p.mode]), ("prior", prior), ("tags", tag),
                     ("labels", _label(p))):
            g[k].append(v)
        g["need_query"] |= p.mode != "prior"
    out = []
    for method, g in sorted(groups.items()):
        t = {k: _i(g[k], device, _DTYPES.get(k, torch.int32)) for k in _KEYS}
        mid = METHODS[method].method_id
        out.append(MethodGroup(method=method, score_ids=torch.full_like(t["score_rows"], mid, dtype=torch.int32),
                               need_query=g["need_query"], **t))
    # selection capacity: every block of the longest row, so must-attend (foreign-tag) blocks are never dropped
    plan = StepPlan(prefill=prefill, groups=out, max_selected=int(cm.block_table_tensor.shape[1]))
    return plan, dense_rows


class DecodeBuffers:
    """Persistent per-row controls for pure-decode steps (CUDA graphs replay kernels that read these
    addresses): one int64 ``[F, max_rows]`` device tensor (each field contiguous: the kernels index fields by
    row without strides) refilled by the builder each step.

    ``method`` is the kernel method id (-1: no scoring: padding, unknown request or budget 0), ``col`` the
    method's column of the per-method summaries, ``srow`` the row's persistent state / selection-cache row
    (its request slot; padding rows get a private scratch row past the slots, so no two rows share one)."""

    FIELDS = ("slot", "method", "col", "srow", "budget", "sink", "window", "mode", "prior", "tag", "label",
              "sparse", "ctag")

    def __init__(self, max_rows: int, device):
        self.max_rows = max_rows
        self.buf = torch.zeros(len(self.FIELDS), max_rows, dtype=torch.int64, device=device)
        self.rows = 0

    def field(self, name: str, n: int) -> torch.Tensor:
        return self.buf[self.FIELDS.index(name), :n]

    def fill(self, rows: list[tuple]) -> None:
        """``rows``: one FIELDS tuple per batch row."""
        n = len(rows)
        # pageable source: the copy is staged before copy_ returns, so it is free to reuse at once (a pinned
        # buffer refilled next step could race the in-flight DMA)
        self.buf[:, :n].copy_(torch.tensor(rows, dtype=torch.int64).view(n, len(self.FIELDS)).T, non_blocking=True)
        self.rows = n


def _row_fields(slot: int, p, ctx: int, block_size: int, scratch_row: int) -> tuple:
    """DecodeBuffers.FIELDS of one single-token decode row (``p`` None or budget 0: no scoring, dense);
    counts the row in the host counters."""
    if p is None or p.budget == 0:
        if p is not None:
            metrics.add(p.method, p.mode, decode_rows_dense=1)
        return (max(slot, 0), -1, 0, scratch_row, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    budget, sink, window, prior = p.blocks(block_size)
    sparse = -(-ctx // block_size) > sink + window + budget
    metrics.add(p.method, p.mode, **{"decode_rows_sparse" if sparse else "decode_rows_dense": 1})
    return (slot, METHODS[p.method].method_id, _METHOD_NAMES.index(p.method), slot, budget, sink, window,
            MODES[p.mode], prior, TABLE.tag[slot], _label(p), int(sparse), TABLE.serial[slot])


def plan_uniform_decode(cm, block_size: int, bufs: DecodeBuffers, capture: bool = False) -> bool:
    """Fill ``bufs`` for a batch of single-token decode rows only (what a FULL decode CUDA graph replays).
    Returns False (nothing written) when some row is a prefill or multi-token row. ``capture``: a CUDA graph
    capture's dummy batch: every row is padding whatever the request table holds (the sampler's warmup
    requests may still sit in it), so the graph always records the fused decode path."""
    n = cm.num_reqs
    if n > bufs.max_rows:
        return False
    qsl = cm.query_start_loc_cpu[: n + 1].tolist()
    if capture:
        if any(qsl[i + 1] - qsl[i] > 1 for i in range(n)):
            return False
        scratch = max(TABLE.capacity, 1)
        bufs.fill([(0, -1, 0, scratch + i, 0, 0, 0, 0, 0, 0, 0, 0, 0) for i in range(n)])
        return True
    seq = compat.host_seq_lens(cm).tolist()
    slots = TABLE.slots(n, compat.req_slots(cm))
    scratch = max(TABLE.capacity, 1)
    rows = []
    for i in range(n):
        qlen, ctx, slot = qsl[i + 1] - qsl[i], int(seq[i]), slots[i]
        p = TABLE.params[slot] if slot >= 0 else None
        if qlen > 1 or (p is not None and qlen == 1 and ctx - 1 < TABLE.prefill_len[slot]):
            return False
        rows.append(_row_fields(slot, p if qlen else None, ctx, block_size, scratch + i))
    bufs.fill(rows)
    return True


class RowFields:
    """Per-row controls of a step's decode subset (same interface as :class:`DecodeBuffers`)."""

    FIELDS = DecodeBuffers.FIELDS

    def __init__(self, rows: list[tuple], max_rows: int, device):
        self.max_rows = max_rows
        self.buf = torch.tensor(rows, dtype=torch.int64).view(len(rows), len(self.FIELDS)).T.contiguous().to(
            device, non_blocking=True)

    def field(self, name: str, n: int) -> torch.Tensor:
        return self.buf[self.FIELDS.index(name), :n]


@dataclass
class MixedPlan:
    """CUDA, a step with prefill rows: vLLM's kernel for prefill and no-budget rows (``dense_md`` over
    ``dense_tokens``), prefill scoring, and the decode rows with a budget through the fused decode path."""

    prefill: list  # (row, start, end, final, slot, method, tag)
    decode_rows: torch.Tensor  # [nd] batch rows
    decode_tokens: torch.Tensor  # [nd] their query tokens
    fields: RowFields | None
    max_selected: int
    dense_tokens: torch.Tensor | None = None
    dense_md: object | None = None


def plan_mixed_step(cm, block_size: int, device, capacity: int, max_rows: int) -> tuple[MixedPlan, list[int]]:
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1].tolist()
    seq = compat.host_seq_lens(cm).tolist()
    slots = TABLE.slots(n, compat.req_slots(cm))
    prefill, dense_rows, drows, dtoks, fields = [], [], [], [], []
    for i in range(n):
        qlen, ctx, slot = qsl[i + 1] - qsl[i], int(seq[i]), slots[i]
        p = TABLE.params[slot] if slot >= 0 else None
        if qlen <= 0 or p is None:
            dense_rows.append(i)
            continue
        start = ctx - qlen
        if start < TABLE.prefill_len[slot]:
            dense_rows.append(i)
            if p.budget > 0:
                prefill.append((i, start, ctx, ctx >= TABLE.prefill_len[slot], slot, p.method, TABLE.tag[slot]))
                metrics.add(p.method, p.mode, prefill_rows=1, prefill_tokens=qlen)
            continue
        if p.budget == 0 or qlen != 1:
            dense_rows.append(i)
            metrics.add(p.method, p.mode, decode_rows_dense=1)
            continue
        drows.append(i)
        dtoks.append(qsl[i])
        fields.append(_row_fields(slot, p, ctx, block_size, 0))
    plan = MixedPlan(prefill=prefill, decode_rows=_i(drows, device, torch.long),
                     decode_tokens=_i(dtoks, device, torch.long),
                     fields=RowFields(fields, max_rows, device) if fields else None, max_selected=capacity)
    return plan, dense_rows


def score_prefill_rows(store: "LayerStore", prefill: list, kv, block_table) -> None:
    for row, start, end, final, slot, method, tag in prefill:
        if _DEBUG and store.index == 0:
            logger.info("prescore debug: prefill row %d [%d, %d) final %s slot %d %s tag %d", row, start, end, final,
                        slot, method, tag)
        p = TABLE.params[slot]
        timed = kv.is_cuda and not torch.cuda.is_current_stream_capturing()
        if timed:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        t0 = time.perf_counter()
        state = score_prefill(kv, store.summ[method], block_table[row], start, end, _METHOD_OBJS[method], tag, final)
        if state is not None:
            store.states[slot, :, : state.shape[1]] = state
        if p is not None:
            if timed:
                ev[1].record()
                metrics.add_scoring_time(p.method, p.mode, events=ev)
            elif not kv.is_cuda:
                metrics.add_scoring_time(p.method, p.mode, time.perf_counter() - t0)


@dataclass
class UniformDecodePlan:
    bufs: DecodeBuffers
    num_rows: int
    max_selected: int


def uniform_decode_forward(store: "LayerStore", plan: UniformDecodePlan, query, kv, block_table, seq_lens, output,
                           scale, block_size: int, decode_fn) -> None:
    """Every row of a pure-decode batch through one fixed sequence of launches (no host sync, no
    data-dependent host control flow: capturable), each row with its own method, mode and budget:

    1. ``score_tail_triton``: a row whose newest token filled its block scores that block (own method,
       own fitted state) and writes its summaries;
    2. ``quest_bounds_triton`` (split over the context; skips prior-mode rows and rows that keep their cached
       selection this step) + ``select_blocks_triton`` on the row's method column into the per-slot selection
       cache (prior rows recompute only when their block count changes, query-aware rows every
       ``reselect_every`` tokens; a row whose must-attend blocks overflow the capacity turns dense);
    3. one sparse decode over the cached selections (dense rows: count -1, every block).
    The device counters are added by the selection launch (atomic adds per sparse row and KV head)."""
    from prescore.kernels.select_triton import quest_bounds_triton, select_blocks_triton
    from prescore.kernels.step_triton import score_tail_triton

    n, U = plan.num_rows, plan.bufs
    bt, sl, q = block_table[:n], seq_lens[:n], query[:n]
    f = lambda name: U.field(name, n)  # noqa: E731
    srow, cols, mode = f("srow"), f("col"), f("mode")
    cache = store.selection_cache(plan.max_selected, U.max_rows)
    score_tail_triton(kv, store.scores3, store.kmin, store.kmax, store.tags2, bt, sl, f("method"), cols,
                      store.states, srow, f("tag"), only_full=True)
    every = TABLE.defaults.reselect_every
    budget, sink, window, tag = f("budget"), f("sink"), f("window"), f("tag")
    qb = quest_bounds_triton(q, store.kmin, store.kmax, bt, sl, mode, block_size, beta=TABLE.defaults.quest_beta,
                             reuse=(cache, srow, f("ctag"), budget, sink, window, plan.max_selected, every))
    select_blocks_triton(store.scores3, store.tags2, bt, sl, budget, sink, window, mode, f("prior"), tag,
                         plan.max_selected, block_size, qb, cache, srow, cols=cols, overflow_dense=True,
                         stats=(f("sparse"), f("label"), store.acc), every=every, ctags=f("ctag"))
    o = output[:n]
    if o.dtype == q.dtype:  # straight into the layer's output (no temporary, no copy launch)
        decode_fn(q, kv, bt, sl, cache.ids, cache.kcounts, scale, sel_rows=srow, out=o)
    else:
        o.copy_(decode_fn(q, kv, bt, sl, cache.ids, cache.kcounts, scale, sel_rows=srow))
    if _DEBUG and store.index == 0 and not (kv.is_cuda and torch.cuda.is_current_stream_capturing()):
        # eager-only diagnostics (host syncs), first layer
        nb = (sl.long() + block_size - 1) // block_size
        fresh = [int((store.tags2[int(c), bt[i, : int(nb[i])].long()] == f("tag")[i]).sum()) for i, c in
                 enumerate(cols.tolist())]
        logger.info("prescore debug: seq %s kcounts %s fresh-tag blocks %s method %s budget %s",
                    sl.tolist(), cache.kcounts[srow.long(), 0].tolist(), fresh, f("method").tolist(),
                    f("budget").tolist())


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


_logged = False
_once: set = set()


def _log_once(msg, *args) -> None:
    if msg not in _once:
        _once.add(msg)
        logger.info(msg, *args)


def log_start(vllm_config, backend_name: str) -> None:
    global _logged
    compat.check_parallel(vllm_config)
    if _logged:
        return
    _logged = True
    defaults = P.load_defaults(compat.additional_config(vllm_config))
    logger.info("prescore: attention backend %s (%s) active on vLLM %s; request defaults: %s",
                compat.BACKEND_NAME, backend_name, compat.vllm_version(), P.describe(defaults))


# ----------------------------------------------------------------------------------------------------------
# Per-layer storage
# ----------------------------------------------------------------------------------------------------------

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

    def __init__(self, kv_cache: torch.Tensor, mirror: bool, num_slots: int):
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
        if self.in_page:
            _log_once("prescore: block summaries%s live in the KV page padding (%d extra bytes per block and "
                      "layer, counted in the KV-cache budget)", " + K|V mirror" if mirror else "",
                      stride_b - page)
        else:
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
        self.cache: SelectionCache | None = None
        S = max(get_method(m).state_size(D) for m in P.METHOD_NAMES)
        need = num_slots * H * S * 4
        if kv_cache.is_cuda:
            free = torch.cuda.mem_get_info(kv_cache.device)[0]
            if need > free:
                raise RuntimeError(
                    f"prescore: the per-request scoring states need {need / 2**20:.0f} MiB per layer ({num_slots} "
                    f"request slots x {H} KV heads x {S} floats) but only {free / 2**20:.0f} MiB are free after the "
                    "KV cache: lower --max-num-seqs or --gpu-memory-utilization")
        self.states = torch.zeros(num_slots, H, S, dtype=torch.float32, device=kv_cache.device)
        self.acc = metrics.device_accumulator(_LABELS, kv_cache.device)
        self.index = _STORES[0]
        _STORES[0] += 1

    def selection_cache(self, capacity: int, scratch_rows: int) -> SelectionCache:
        """Per-slot selections (rows: the request slots, then one scratch row per batch row for padding)."""
        c = self.cache
        if c is None or c.ids.shape[2] != capacity or c.ids.shape[0] < self.num_slots + scratch_rows:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("prescore: the selection cache must be allocated before CUDA graph capture")
            self.cache = c = SelectionCache.allocate(self.num_slots + scratch_rows, self.scores3.shape[2], capacity,
                                                     self.scores3.device)
        return c


_METHOD_OBJS = {name: get_method(name) for name in P.METHOD_NAMES}
_DEBUG = os.environ.get("PRESCORE_DEBUG") == "1"
_STORES = [0]


def sparse_rows_forward(store: LayerStore, plan: StepPlan, query, kv, block_table, seq_lens, output, scale,
                        block_size: int, decode_fn, layer_name: str = "") -> None:
    """Score, select and attend. ``kv`` is the cache in the kernels' layout."""
    score_prefill_rows(store, plan.prefill, kv, block_table)
    for g in plan.groups:
        summ = store.summ[g.method]
        if g.score_rows.numel():
            score_decode_tail(kv, summ, block_table[g.score_rows], seq_lens[g.score_rows], g.score_ids,
                              store.states[g.score_slots], g.score_tags,
                              {METHODS[g.method].method_id: _METHOD_OBJS[g.method]})
        if not g.num_sparse:
            continue
        bt, sl = block_table[g.sparse_rows], seq_lens[g.sparse_rows]
        q = query[g.sparse_tokens]
        # per-slot selection cache (rows: request slots): quest/hybrid rows re-select every reselect_every tokens
        cache = store.selection_cache(plan.max_selected, 0)
        sel = select_blocks(summ, bt, sl, g.budget, g.sink, g.window, g.mode, g.prior, g.tags, plan.max_selected,
                            q=q, block_size=block_size, need_query=g.need_query,
                            quest_beta=TABLE.defaults.quest_beta, cache=cache, rows=g.sparse_slots,
                            every=TABLE.defaults.reselect_every, ctags=g.ctags).per_row()
        out = decode_fn(q, kv, bt, sl, sel.ids, sel.kernel_counts(), scale)
        output[g.sparse_tokens] = out.to(output.dtype)
        # counters (device-side, no sync)
        BS = block_size
        nblk = (sl.long() + BS - 1) // BS
        cnt = sel.counts.long()
        last_sel = (sel.ids.long() == (nblk - 1)[:, None, None]).any(-1)
        sel_tok = cnt * BS - last_sel.long() * (nblk * BS - sl.long())[:, None]
        vals = torch.stack([sel_tok.double().mean(1), sl.double(), cnt.double().mean(1), nblk.double()], 1)
        store.acc.index_add_(0, g.labels, vals)
        if CAPTURE is not None:
            _capture(summ, g, q, kv, bt, sl, sel, out, scale, block_size, layer_name)


def dense_rows_forward(base_forward, plan, layer, query, key, value, kv_cache, attn_metadata, output) -> None:
    """vLLM's own kernel (``base_forward``) for the plan's dense rows: every token when no row left the dense
    path, else the re-packed subset (``plan.dense_md`` over ``plan.dense_tokens``)."""
    if plan.dense_md is None and plan.dense_tokens is None:
        base_forward(layer, query, key, value, kv_cache, attn_metadata, output)
    elif plan.dense_md is not None:
        tok = plan.dense_tokens
        o = output.new_empty((tok.numel(), *output.shape[1:]))
        base_forward(layer, query[tok], key, value, kv_cache, plan.dense_md, o)
        output[tok] = o


def _capture(summ, g, q, kv, bt, sl, sel, out, scale, BS, layer_name):
    """Copy what one layer's sparse rows attended: compact caches so a test can rerun the references."""
    for b in range(g.num_sparse):
        nblk = -(-int(sl[b]) // BS)
        phys = bt[b, :nblk].long()
        CAPTURE.append({
            "layer": layer_name, "method": g.method, "q": q[b].clone(), "kv": kv[phys].clone(),
            "seq_len": int(sl[b]), "ids": sel.ids[b].clone(), "counts": sel.counts[b].clone(),
            "dense": bool(sel.dense[b]), "out": out[b].clone(), "scale": scale, "block_size": BS,
            "scores": summ.scores[phys].clone(), "kmin": summ.kmin[phys].clone(), "kmax": summ.kmax[phys].clone(),
            "tag_ok": (summ.tags[phys] == g.tags[b]).clone(), "tag": int(g.tags[b]),
            "budget": int(g.budget[b]), "sink": int(g.sink[b]), "window": int(g.window[b]),
            "mode": int(g.mode[b]), "prior": int(g.prior[b]),
        })


# ----------------------------------------------------------------------------------------------------------
# CPU backend (subclasses vLLM's CPU attention: its KV write and dense kernel)
# ----------------------------------------------------------------------------------------------------------

def attach_step_plan(md, cm, block_size: int, device, build_dense):
    """Plan the step (host) and hang it on vLLM's metadata ``md``; when some row is sparse, ``build_dense(sub)``
    builds vLLM's own metadata for the dense rows' subset (run by vLLM's kernel)."""
    plan, dense_rows = plan_step(cm, block_size, device)
    if plan.num_sparse:
        restrict_dense(plan, cm, dense_rows, build_dense)
    md.prescore = plan
    return md


def restrict_dense(plan, cm, dense_rows: list[int], build_dense) -> None:
    """vLLM's kernel attends only ``dense_rows``: their re-packed metadata (``build_dense(sub)``) and tokens."""
    sub, plan.dense_tokens = subset_common_metadata(cm, dense_rows)
    plan.dense_md = build_dense(sub) if dense_rows else None


class PrescoreCPUBuilder(CPUBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # sliding-window groups run dense (pre-scoring assumes every block stays attendable)
        self.enabled = self.window_size == -1 and not getattr(kv_cache_spec, "sliding_window", None)
        if not self.enabled:
            logger.info("prescore: sliding-window layers %s run dense (vLLM's CPU kernel)", layer_names[:2])
        log_start(vllm_config, "CPU: vLLM CPU attention for prefill/dense rows, torch reference for sparse decode")

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metrics.maybe_dump()
        if not self.enabled or self.is_cross_attention or self.is_encoder_only_attention:
            return md
        return attach_step_plan(md, common_attn_metadata, self.block_size, self.device, partial(super().build, 0))


class PrescoreCPUImpl(CPUImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.store: LayerStore | None = None

    def _store(self, kv_cache) -> LayerStore:
        if self.store is None or self.store.key != kv_cache.data_ptr():
            self.store = LayerStore(kv_cache, mirror=True, num_slots=max(TABLE.capacity, 1))
        return self.store

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.attn_type != _DECODER or self.sliding_window != -1:
            return
        mirror = self._store(kv_cache).mirror
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
        plan = getattr(attn_metadata, "prescore", None)
        if plan is None or self.attn_type != _DECODER or self.sliding_window != -1:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        dense_rows_forward(super().forward, plan, layer, query, key, value, kv_cache, attn_metadata, output)
        store = self._store(kv_cache)
        n = attn_metadata.num_actual_tokens
        sparse_rows_forward(store, plan, query[:n], store.mirror, attn_metadata.block_table,
                            attn_metadata.seq_lens, output, self.scale, kv_cache.shape[2], _cpu_decode,
                            getattr(layer, "layer_name", ""))
        return output


def _cpu_decode(q, kv, bt, sl, ids, counts, scale):
    return sparse_decode_ref(q, kv, bt, sl, ids, counts, scale, dtype=torch.float32)


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
        spec = super().customize_spec(spec)
        if getattr(spec, "page_size_padded", None) is not None or getattr(spec, "state_content_bytes", None):
            return spec  # already packed/padded by someone else: summaries go outside the KV budget
        extra = extra_page_bytes(spec.num_kv_heads, spec.head_size, spec.block_size, spec.dtype, mirror=True)
        return replace(spec, page_size_padded=spec.real_page_size_bytes + extra)


if current_platform.is_cpu():
    PrescoreBackend = PrescoreCPUBackend
else:  # CUDA: Triton attention for prefill/dense rows, Triton sparse decode (see cuda.py)
    from .cuda import PrescoreCudaBackend as PrescoreBackend  # noqa: E402,F401
