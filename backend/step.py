"""The decode step of the prescore core (no vLLM import): what every platform runs per layer on a :class:`~.plan.Plan`.

:func:`run`: score the plan's prefill chunks (``score_prefill``), then the plan's decode rows through one fixed
sequence (:func:`decode`), each row with its own method, mode and budget from the plan's buffers:

1. tail scoring: a row whose newest token filled its block scores that block (own method, own fitted state) and
   writes its summaries;
2. selection into the per-slot selection cache (query-aware rows re-select every ``reselect_every`` tokens,
   prior rows when their block count changes; a row whose must-attend blocks overflow the capacity turns
   dense); the device counters ride on it;
3. sparse decode over the cached selections (dense rows: count -1, every block).

``reselect_async`` (config): step 2 only adopts last step's pending selections and keeps / appends (rows with no
valid selection still select now); the due rows' re-selection runs after it, into the pending cache, on a side
CUDA stream beside the decode and the rest of the layer (joined before the next layer's step; in order on CPU, in
mixed steps and at the last layer), and the rows adopt it on their next step.

The ops come in two sets with one meaning: :data:`TRITON` (CUDA; ``score_tail_triton``, ``quest_bounds_triton``
+ ``select_blocks_triton``, ``sparse_decode``: no host sync, no data-dependent host control flow, so a FULL decode
CUDA graph captures it) and :data:`TORCH` (CPU; ``score_decode_tail``, ``select_blocks`` in torch with the same
cache rule, ``sparse_decode_ref``; per-row method columns loop over the methods present). The torch tail scoring
rescores a partial tail block every step; the Triton one scores a block once it is full. Both select the same
blocks: the tail block is always attended, whatever its summaries.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from prescore.kernels import METHODS, MODES as MODE_IDS, get_method, score_decode_tail, score_prefill, select_blocks
from prescore.kernels.decode import MERGE_PADS, default_blocks_per_iter, sparse_decode, sparse_decode_ref

from . import metrics
from .store import METHOD_NAMES, LayerStore

logger = logging.getLogger("vllm.prescore")

# Test hook: when a list, every step appends what each attended sparse row attended (eager only; see tests).
CAPTURE: list | None = None

_OBJS: dict = {}


def _method(name: str):
    if name not in _OBJS:
        _OBJS[name] = get_method(name)
    return _OBJS[name]


def _capturing_graph(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def score_prefill_rows(store: LayerStore, prefill: list, kv, block_table, debug: bool = False) -> None:
    """Score each prefill chunk's blocks (the final chunk fits the method's state into the slot's row)."""
    for row, start, end, final, slot, method, mode, tag in prefill:
        if debug and store.index == 0:
            logger.info("prescore debug: prefill row %d [%d, %d) final %s slot %d %s tag %d", row, start, end, final,
                        slot, method, tag)
        timed = kv.is_cuda and not torch.cuda.is_current_stream_capturing()
        if timed:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        t0 = time.perf_counter()
        state = score_prefill(kv, store.summ[method], block_table[row], start, end, _method(method), tag, final)
        if state is not None:
            store.states[slot, :, : state.shape[1]] = state
        if timed:
            ev[1].record()
            metrics.add_scoring_time(method, mode, events=ev)
        elif not kv.is_cuda:
            metrics.add_scoring_time(method, mode, time.perf_counter() - t0)


class TritonOps:
    """The fused Triton launches (CUDA; the interpreter on CPU in tests)."""

    name = "triton"

    def score_tail(self, kv, store, bt, sl, f) -> None:
        from prescore.kernels.step_triton import score_tail_triton

        score_tail_triton(kv, store.scores3, store.kmin, store.kmax, store.tags2, bt, sl, f("method"), f("col"),
                          store.states, f("srow"), f("tag"), only_full=True)

    def select(self, store, q, bt, sl, f, cache, max_selected: int, block_size: int, beta: float, every: int,
               clocks, pending=None, due_only: bool = False) -> None:
        from prescore.kernels.select_triton import quest_bounds_triton, select_blocks_triton

        srow, cols, mode = f("srow"), f("col"), f("mode")
        budget, sink, window, tag = f("budget"), f("sink"), f("window"), f("tag")
        qb = quest_bounds_triton(q, store.kmin, store.kmax, bt, sl, mode, block_size, beta=beta,
                                 reuse=(cache, srow, f("ctag"), budget, sink, window, max_selected, every, clocks),
                                 due_only=due_only)
        select_blocks_triton(store.scores3, store.tags2, bt, sl, budget, sink, window, mode, f("prior"), tag,
                             max_selected, block_size, qb, cache, srow, cols=cols, overflow_dense=True,
                             stats=None if due_only else (f("sparse"), f("label"), store.acc), every=every,
                             ctags=f("ctag"), clocks=clocks, pending=pending, due_only=due_only)

    def attend(self, q, kv, bt, sl, cache, srow, scale, out) -> None:
        if out.dtype == q.dtype:  # straight into the layer's output (no temporary, no copy launch)
            sparse_decode(q, kv, bt, sl, cache.ids, cache.kcounts, scale, sel_rows=srow, out=out)
        else:
            out.copy_(sparse_decode(q, kv, bt, sl, cache.ids, cache.kcounts, scale, sel_rows=srow))


class TorchOps:
    """The same ops in torch (CPU backend): host syncs allowed, per-method loops over the rows' columns."""

    name = "torch"

    def score_tail(self, kv, store, bt, sl, f) -> None:
        mids, srow = f("method"), f("srow").long().clamp_max(store.states.shape[0] - 1)  # padding: no scoring
        for name in set(METHOD_NAMES[c] for c in f("col")[mids >= 0].tolist()):
            mid = METHODS[name].method_id
            r = (mids == mid).nonzero()[:, 0]
            score_decode_tail(kv, store.summ[name], bt[r], sl[r], mids[r], store.states[srow[r]], f("tag")[r],
                              {mid: _method(name)})

    def select(self, store, q, bt, sl, f, cache, max_selected: int, block_size: int, beta: float, every: int,
               clocks, pending=None, due_only: bool = False) -> None:
        cols = f("col")
        for c in sorted(set(cols.tolist())):
            r = (cols == c).nonzero()[:, 0]
            g = lambda name: f(name)[r]  # noqa: E731
            select_blocks(store.summ[METHOD_NAMES[c]], bt[r], sl[r], g("budget"), g("sink"), g("window"), g("mode"),
                          g("prior"), g("tag"), max_selected, q=q[r], block_size=block_size, use_triton=False,
                          cache=cache, rows=g("srow"), overflow_dense=True, quest_beta=beta, every=every,
                          ctags=g("ctag"), clocks=None if clocks is None else clocks[r], pending=pending,
                          due_only=due_only)
        if due_only:
            return
        # the device counters, as the Triton selection adds them: per sparse row and KV head the selection did
        # not turn dense, (selected tokens, context tokens, selected blocks, context blocks) / H
        kc = cache.kcounts[f("srow").long()].long()  # [n, H]
        ok = (f("sparse") != 0)[:, None] & (kc >= 0)
        seq = sl.long()[:, None]
        nblk = (seq + block_size - 1) // block_size
        kc, nh = kc * ok, ok.sum(1, keepdim=True)
        vals = torch.cat([(kc * block_size - ok * (nblk * block_size - seq)).sum(1, keepdim=True), nh * seq,
                          kc.sum(1, keepdim=True), nh * nblk], 1)
        store.acc.index_add_(0, f("label"), vals.double() / ok.shape[1])

    def attend(self, q, kv, bt, sl, cache, srow, scale, out) -> None:
        r = srow.long()
        out.copy_(sparse_decode_ref(q, kv, bt, sl, cache.ids[r], cache.kcounts[r], scale, dtype=torch.float32))


TRITON, TORCH = TritonOps(), TorchOps()


def decode(store: LayerStore, plan, query, kv, block_table, seq_lens, output, scale, block_size: int, ops,
           layer_name: str = "") -> None:
    """The plan's ``num_rows`` decode rows (row i: ``query[i]``, ``block_table[i]``, ``seq_lens[i]``) through
    the fixed sequence of the module doc; writes ``output[:num_attend]``."""
    n, a, U = plan.num_rows, plan.num_attend, plan.bufs
    bt, sl, q = block_table[:n], seq_lens[:n], query[:n]
    f = lambda name: U.field(name, n)  # noqa: E731
    srow = f("srow")
    _join_side()
    cache = store.selection_cache(plan.max_selected, U.max_rows)
    ops.score_tail(kv, store, bt, sl, f)
    # reselect_clock: the planner's step clock, or (None) the rows' lengths, which the kernels default to
    clocks = f("clock") if plan.step_clock else None
    if not plan.async_select:
        ops.select(store, q, bt, sl, f, cache, plan.max_selected, block_size, plan.quest_beta, plan.every, clocks)
    else:
        pending = store.selection_cache(plan.max_selected, U.max_rows, pending=True)
        ops.select(store, q, bt, sl, f, cache, plan.max_selected, block_size, plan.quest_beta, NEVER, clocks,
                   pending=pending)
        side = _side_stream(kv) if plan.uniform and not store.is_last() else None
        qs = q
        if side is not None:  # the queries outlive this layer's call in the store; the side launches read that copy
            qs = store.async_queries(U.max_rows, tuple(q.shape[1:]), q.dtype)[:n]
            qs.copy_(q)
            fork = torch.cuda.Event()
            fork.record()
            side.wait_event(fork)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            ops.select(store, qs, bt, sl, f, pending, plan.max_selected, block_size, plan.quest_beta, plan.every,
                       clocks, due_only=True)
        if side is not None:
            _SIDE[0] = torch.cuda.Event()
            _SIDE[0].record(side)
    if a == n:
        ops.attend(q, kv, bt, sl, cache, srow, scale, output[:n])
    elif a:
        ops.attend(q[:a], kv, bt[:a], sl[:a], cache, srow[:a], scale, output[:a])
    if _capturing_graph(kv):
        return
    if CAPTURE is not None:
        _capture(store, plan, q, kv, bt, sl, cache, output, scale, block_size, layer_name)
    if plan.debug and store.index == 0:  # eager-only diagnostics (host syncs), first layer
        nb = (sl.long() + block_size - 1) // block_size
        fresh = [int((store.tags2[int(c), bt[i, : int(nb[i])].long()] == f("tag")[i]).sum()) for i, c in
                 enumerate(f("col").tolist())]
        logger.info("prescore debug: seq %s kcounts %s fresh-tag blocks %s method %s budget %s",
                    sl.tolist(), cache.kcounts[srow.long(), 0].tolist(), fresh, f("method").tolist(),
                    f("budget").tolist())


NEVER = 1 << 30  # reselect_async's main launch: no row is due (clocks are token counts < 2^24)
_SIDE: list = [None]  # the side stream's last event not yet joined
_STREAMS: dict = {}


def _side_stream(kv):
    if not kv.is_cuda:
        return None
    if kv.device not in _STREAMS:
        _STREAMS[kv.device] = torch.cuda.Stream(kv.device)
    return _STREAMS[kv.device]


def _join_side() -> None:
    """The current stream waits for the previous layer's side launches (reselect_async)."""
    if _SIDE[0] is not None:
        torch.cuda.current_stream().wait_event(_SIDE[0])
        _SIDE[0] = None


def run(store: LayerStore, plan, query, kv, block_table, seq_lens, output, scale, block_size: int, ops,
        layer_name: str = "") -> None:
    """One layer's prescore work for a step: prefill scoring, then the decode rows (uniform plans: the batch
    itself; mixed plans: the decode subset, gathered and scattered back). ``kv``: the cache in the kernels'
    layout ``[NB, Hkv, BS, 2D]`` (K ``[..., :D]``, V ``[..., D:]``)."""
    score_prefill_rows(store, plan.prefill, kv, block_table, plan.debug)
    if not plan.num_rows:
        return
    if plan.uniform:
        decode(store, plan, query, kv, block_table, seq_lens, output, scale, block_size, ops, layer_name)
        return
    r, tok = plan.rows, plan.tokens
    o = output.new_empty((plan.num_attend, *output.shape[1:]))
    decode(store, plan, query[tok], kv, block_table[r], seq_lens[r], o, scale, block_size, ops, layer_name)
    if plan.num_attend:
        output[tok[: plan.num_attend]] = o


def _capture(store, plan, q, kv, bt, sl, cache, out, scale, BS, layer_name) -> None:
    """Copy what the attended sparse rows attended: compact caches so a test can rerun the references."""
    f = lambda name: plan.bufs.field(name, plan.num_rows).tolist()  # noqa: E731
    srow, sparse, cols = f("srow"), f("sparse"), f("col")
    for b in range(plan.num_attend):
        if not sparse[b]:
            continue
        method, r = METHOD_NAMES[cols[b]], srow[b]
        summ = store.summ[method]
        nblk = -(-int(sl[b]) // BS)
        phys = bt[b, :nblk].long()
        tag = f("tag")[b]
        CAPTURE.append({
            "layer": layer_name, "method": method, "q": q[b].clone(), "kv": kv[phys].clone(),
            "seq_len": int(sl[b]), "ids": cache.ids[r].clone(), "counts": cache.counts[r].clone(),
            "dense": bool(cache.dense[r]), "out": out[b].clone(), "scale": scale, "block_size": BS,
            "scores": summ.scores[phys].clone(), "kmin": summ.kmin[phys].clone(), "kmax": summ.kmax[phys].clone(),
            "tag_ok": (summ.tags[phys] == tag).clone(), "scored": (summ.tags[phys] >= 0).clone(), "tag": tag,
            "budget": f("budget")[b],
            "sink": f("sink")[b], "window": f("window")[b], "mode": f("mode")[b], "prior": f("prior")[b],
        })


__all__ = ["CAPTURE", "TORCH", "TRITON", "TorchOps", "TritonOps", "decode", "run", "score_prefill_rows"]


WARM_TAG = (1 << 62) + 7  # the warm-up row's request tag (content tags are hashes; restored after)


def warm(store: LayerStore, kv, bufs, width: int, max_selected: int, block_size: int, num_q_heads: int, params,
         methods, ops=TRITON) -> None:
    """Build every decode-step kernel (and each offered method's prefill scoring) with the launch's shapes before
    serving, so the first request does not pay the compiles: one fake sparse decode row (request slot 0's state
    and selection-cache row) and one fake prompt whose logical blocks all map to physical block 0 (vLLM's null
    block, never handed to a request); then block 0's summaries and tags and slot 0's rows are restored. The row
    is not counted. ``width``: the block table's width at run time (the selection kernel's shapes follow it);
    ``params``: the server defaults (method, mode, budget, sink, window, reselect_every)."""
    from .plan import Plan

    BS, dev = block_size, kv.device
    budget, sink, window, prior = params.blocks(BS)
    nblk = min(width, sink + window + budget + 2)
    bt = torch.zeros(1, width, dtype=torch.int32, device=dev)
    cache = store.selection_cache(max_selected, bufs.max_rows)
    slot0 = (store.states, cache.ids, cache.counts, cache.kcounts, cache.dense, cache.key)  # restored below
    saved = [t[0].clone() for t in slot0]
    for m in methods:  # prefill scoring: a non-final chunk and the final one (the fit)
        for final in (False, True):
            score_prefill(kv, store.summ[m], bt[0], 0, nblk * BS - 3, _method(m), WARM_TAG, final)
    bufs.fill([(0, METHODS[params.method].method_id, METHOD_NAMES.index(params.method), 0, budget, sink, window,
                MODE_IDS[params.mode], prior, WARM_TAG, 0, 0, WARM_TAG)])
    plan = Plan(bufs=bufs, num_rows=1, num_attend=1, rows=None, tokens=None, prefill=[], dense_rows=[],
                max_selected=max_selected, quest_beta=params.quest_beta, every=1,
                async_select=params.reselect_async)
    D, Hkv = kv.shape[3] // 2, kv.shape[1]
    q = torch.zeros(1, num_q_heads, D, dtype=kv.dtype, device=dev)
    out = torch.empty_like(q)
    lens = [torch.tensor([n], dtype=torch.int32, device=dev) for n in (nblk * BS - BS, nblk * BS - 1)]
    for every in sorted({1, params.reselect_every}):
        plan.every = every
        for sl in lens:  # a step that fills a block (tail scoring) and one that does not
            decode(store, plan, q, kv, bt, sl, out, D ** -0.5, BS, ops)
    if ops is TRITON:  # the other builds a batch size can ask for: each merge tile, and 128-token tiles (B x Hkv >= 256)
        for bpi in sorted({default_blocks_per_iter(D, BS, Hkv), default_blocks_per_iter(D, BS, 256)}):
            for pad in MERGE_PADS:
                sparse_decode(q, kv, bt, lens[1], cache.ids, cache.kcounts, D ** -0.5,
                              sel_rows=bufs.field("srow", 1), out=out, num_splits=pad, blocks_per_iter=bpi)
    _join_side()
    store.tags2[:, 0] = -1
    store.scores3[0] = 0
    store.kmin[0] = 0
    store.kmax[0] = 0
    for t, v in zip(slot0, saved):
        t[0] = v
