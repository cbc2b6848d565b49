"""Budgeted block selection for one decode step, per (request, KV head).

Inputs (one layer): ``BlockSummaries`` (physical-block scores, key min/max, tags), ``block_table [B, MB]``,
``seq_lens [B]`` (current token included), and per-row controls as int tensors ``[B]``:
``budget_blocks`` (0 = dense), ``sink_blocks``, ``window_blocks``, ``mode`` (MODES), ``prior_blocks`` (the
part of the budget that `hybrid` spends on the prior), ``req_tags`` (int64). ``q [B, Hq, D]`` is read only by
query-aware modes.

Rule: always the first ``sink_blocks`` and the last ``window_blocks`` blocks of the context, the tail block
(the one holding the current token, even with a zero window) and every block never scored (tag < 0) or, in prior
mode, scored by another request (a prefix-cached block another request's final prefill rescored: its pre-score
comes from that request's fit), then the ``budget_blocks`` best remaining blocks by the mode's key. A block's key
min/max are a function of its content alone, so in the query-aware modes a block another request scored (tag >= 0,
not the row's) is not forced: it competes on the query-aware key, and is not eligible for hybrid's prior share
(the prior share is capped by the blocks the row scored itself):

- ``prior``: the pre-score (query-independent).
- ``quest``: Quest's upper bound sum_d max(q_d * kmin_d, q_d * kmax_d) per query head, combined over the GQA
  group by a log-sum-exp of the heads' scaled bounds relative to their best block (see ``quest_bound``);
  ``quest_beta`` < 1 shrinks the bound towards the block midpoint's score (an estimate, no longer a bound).
- ``hybrid``: ``prior_blocks`` by the pre-score, the rest of the budget by the Quest bound.

A row is dense (``dense[b]`` True, every block attended) when its budget is 0 or the context fits in
sink + window + budget. Output (fixed-size buffers, CUDA-graph friendly): ``ids [B, Hkv, S]`` int32 logical
block ids sorted ascending (padding after ``counts``), ``counts [B, Hkv]`` int32, ``dense [B]`` bool.
``S = max_selected`` is a static capacity (>= the largest sink + window + budget in blocks); must-attend
blocks beyond it are dropped in favour of sink/window blocks, or, with ``overflow_dense=True`` (what the
backend uses), such a row is returned dense instead (never drops a must-attend block).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
import triton.language as tl

from .scoring import BlockSummaries


class Mode(enum.IntEnum):
    """How a row spends its budget; the per-row ``mode`` tensors hold these integers. The one list of modes:
    ``MODES`` / ``MODE_NAMES`` (params, HTTP schema, eval) and the Triton constants below derive from it."""

    PRIOR = 0
    QUEST = 1
    HYBRID = 2


MODES = {m.name.lower(): int(m) for m in Mode}  # name -> integer
MODE_NAMES = tuple(MODES)
# the same integers as Triton constants (the kernels compare the loaded per-row mode with these)
MODE_PRIOR, MODE_QUEST, MODE_HYBRID = (tl.constexpr(int(m)) for m in Mode)

_FORCED = 3.0e38  # sink / window
_MUST = 1.0e38  # never scored for this request
_OTHER = -3.0e38  # scored by another request, in a query-aware row: below every prior, above -inf


@dataclass
class Selection:
    ids: torch.Tensor  # [B, Hkv, S] int32
    counts: torch.Tensor  # [B, Hkv] int32
    dense: torch.Tensor  # [B] bool
    kcounts: torch.Tensor | None = None  # counts as the decode kernel reads them (negative = dense row)
    rows: torch.Tensor | None = None  # set when the tensors are persistent per-slot buffers: batch row b -> rows[b]

    def per_row(self) -> "Selection":
        """The same selection indexed by batch row (gathers from per-slot buffers when ``rows`` is set)."""
        if self.rows is None:
            return self
        r = self.rows.long()
        return Selection(self.ids[r], self.counts[r], self.dense[r].bool(), self.kernel_counts()[r])

    def kernel_counts(self) -> torch.Tensor:
        """Counts as the decode kernel reads them: negative marks a dense row."""
        if self.kcounts is not None:
            return self.kcounts
        return torch.where(self.dense[:, None], torch.full_like(self.counts, -1), self.counts)


@dataclass
class SelectionCache:
    """Persistent per-row selection buffers (rows = request slots): see ``select_blocks(cache=..., rows=...)``."""

    ids: torch.Tensor  # [R, H, S] int32
    counts: torch.Tensor  # [R, H] int32
    kcounts: torch.Tensor  # [R, H] int32
    dense: torch.Tensor  # [R] int8
    key: torch.Tensor  # [R, H, 2] int64: (request tag, packed block count and controls) of the stored result

    @classmethod
    def allocate(cls, rows: int, num_kv_heads: int, max_selected: int, device) -> "SelectionCache":
        z = dict(dtype=torch.int32, device=device)
        return cls(ids=torch.zeros(rows, num_kv_heads, max_selected, **z), counts=torch.zeros(rows, num_kv_heads, **z),
                   kcounts=torch.zeros(rows, num_kv_heads, **z),
                   dense=torch.zeros(rows, dtype=torch.int8, device=device),
                   key=torch.full((rows, num_kv_heads, 2), -1, dtype=torch.int64, device=device))

    def invalidate(self) -> None:
        self.key.fill_(-1)


def quest_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, in_ctx: torch.Tensor,
                beta: float = 1.0) -> torch.Tensor:
    """q [B, Hkv, G, D]; kmin/kmax [B, Hkv, MB, D]; in_ctx [B, MB] -> [B, Hkv, MB].

    Per query head, Quest's bound scaled by 1/sqrt(D) and taken relative to the head's best block in the
    context is an upper bound on the block's log attention weight relative to the best block; the group's
    key is the log-sum-exp over its heads (the most attention mass the block can take from the group).

    ``beta`` scales the bound's spread: with c = (kmin + kmax) / 2 and r = (kmax - kmin) / 2 the per-head key
    is q.c + beta * |q|.r (beta 1 = Quest's bound, 0 = the midpoint's score). Below 1 it is an estimate of the
    block's best score rather than a bound: the bound over-rates blocks with wide key ranges (measured in
    results/QUALITY.md)."""
    qf = q.float()
    kmin, kmax = kmin.float(), kmax.float()
    if beta != 1.0:
        hi, lo = 0.5 + 0.5 * beta, 0.5 - 0.5 * beta
        kmin, kmax = kmin * hi + kmax * lo, kmax * hi + kmin * lo
    bound = qf.clamp_min(0) @ kmax.transpose(-1, -2) + qf.clamp_max(0) @ kmin.transpose(-1, -2)
    best = torch.where(in_ctx[:, None, None, :], bound, float("-inf")).amax(-1, keepdim=True)
    rel = (bound - best) / math.sqrt(q.shape[-1])
    return torch.logsumexp(rel, dim=2)


def select_blocks(summ: BlockSummaries, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  budget_blocks: torch.Tensor, sink_blocks: torch.Tensor, window_blocks: torch.Tensor,
                  mode: torch.Tensor, prior_blocks: torch.Tensor, req_tags: torch.Tensor, max_selected: int,
                  q: torch.Tensor | None = None, block_size: int | None = None,
                  need_query: bool | None = None, use_triton: bool | None = None,
                  cache: SelectionCache | None = None, rows: torch.Tensor | None = None,
                  overflow_dense: bool = False, quest_beta: float = 1.0, every: int = 1,
                  ctags: torch.Tensor | None = None, clocks: torch.Tensor | None = None,
                  pending: SelectionCache | None = None, due_only: bool = False) -> Selection:
    """See module doc. ``need_query`` (static) skips the Quest bound when no row uses a query-aware mode
    (None: decided from ``mode``, a host sync). ``use_triton`` (default: on CUDA) runs the fused Triton kernel
    (:mod:`.select_triton`); otherwise this torch implementation runs. ``cache`` + ``rows`` (Triton only): keep
    results per persistent row and skip recomputing prior-mode rows whose block count is unchanged (exact: the
    prior selection only changes at block boundaries); the result then holds the cache buffers and ``rows``
    (``Selection.per_row()`` gathers; ``sparse_decode(..., sel_rows=sel.rows)`` reads them in place). With a
    cache, ``every`` > 1 makes a query-aware row re-select only when its clock (``clocks [B]``: the backend's
    step clock, so every row re-selects on the same steps; default its length) is a multiple of ``every``; in
    between it keeps its cached blocks plus each block a new token opens (LServe-style reuse). ``ctags [B]``
    (default ``req_tags``): the cache's key per row, unique per admitted request (request tags are content
    tags and repeat when a prompt is sent again: a new request must never start from an older one's choice).
    ``reselect_async`` (with a cache): ``pending`` (a cache of the same shape) first adopts each row's fresh pending
    selection (:func:`_adopt_torch`); ``due_only`` selects afresh only the due query-aware rows, into ``cache``
    (the pending one), marked fresh (:func:`_pend_torch`); the Triton kernel does the same."""
    if need_query is None:
        need_query = bool((mode.long() != MODES["prior"]).any())
    if use_triton is None:
        use_triton = block_table.is_cuda
    if use_triton:
        return _select_triton(summ, block_table, seq_lens, budget_blocks, sink_blocks, window_blocks, mode,
                              prior_blocks, req_tags, max_selected, q, block_size, need_query, cache, rows,
                              overflow_dense, quest_beta, every, ctags, clocks, pending, due_only)
    if cache is not None:
        fresh = select_blocks(summ, block_table, seq_lens, budget_blocks, sink_blocks, window_blocks, mode,
                              prior_blocks, req_tags, max_selected, q, block_size, need_query, False,
                              overflow_dense=overflow_dense, quest_beta=quest_beta)
        ctags = req_tags if ctags is None else ctags
        clocks = seq_lens if clocks is None else clocks
        if due_only:
            return _pend_torch(fresh, cache, rows, seq_lens, budget_blocks, sink_blocks, window_blocks, mode, ctags,
                               block_size, every, clocks)
        if pending is not None:
            _adopt_torch(cache, pending, rows, seq_lens, budget_blocks, sink_blocks, window_blocks, ctags, block_size)
        return _reuse_torch(fresh, cache, rows, seq_lens, budget_blocks, sink_blocks, window_blocks, mode,
                            ctags, block_size, every, clocks)
    B, MB = block_table.shape
    H = summ.scores.shape[1]
    BS = block_size
    dev = block_table.device
    seq = seq_lens.long()
    nblk = (seq + BS - 1) // BS  # [B]
    j = torch.arange(MB, device=dev)
    phys = block_table.long().clamp_min(0)
    in_ctx = j[None, :] < nblk[:, None]  # [B, MB]
    sw = ((j[None, :] < sink_blocks.long()[:, None]) | (j[None, :] >= (nblk - window_blocks.long())[:, None])
          | (j[None, :] == (nblk - 1)[:, None]))
    tg = summ.tags[phys]
    mine = tg == req_tags.long()[:, None]  # [B, MB]
    qrow = (mode.long() != MODES["prior"])[:, None] & need_query
    other = ~mine & (tg >= 0) & qrow & ~sw  # another request's scores: the query-aware key only
    stale = ~mine & ~other
    forced_key = torch.where(sw, _FORCED, _MUST)[:, None, :]  # [B, 1, MB]
    forced = (sw | stale) & in_ctx  # [B, MB]
    n_forced = forced.sum(-1)  # [B]
    n_own = in_ctx.sum(-1) - n_forced - (other & in_ctx).sum(-1)  # blocks eligible for the prior share

    prior = summ.scores[phys].transpose(1, 2)  # [B, H, MB]
    neg = float("-inf")
    S = max_selected
    k = min(S, MB)
    budget = budget_blocks.long()
    total = torch.minimum(n_forced + budget, torch.full_like(n_forced, S)).clamp_max(MB)  # [B]
    mode = mode.long()

    def topk_mask(key, n):  # key [B, H, MB]; keep the n[b] best -> bool mask
        vals, idx = key.topk(k, dim=-1)
        keep = torch.arange(k, device=dev)[None, None, :] < n[:, None, None]
        keep = keep & (vals > float("-inf"))
        return torch.zeros_like(key, dtype=torch.bool).scatter_(-1, idx, keep)

    key = torch.where(forced[:, None, :], forced_key, torch.where(other[:, None, :], _OTHER, prior))
    key = torch.where(in_ctx[:, None, :], key, neg)
    if need_query:
        if q is None:
            raise ValueError("query-aware selection needs q")
        G = q.shape[1] // H
        kmin = summ.kmin[phys].transpose(1, 2)  # [B, H, MB, D]
        kmax = summ.kmax[phys].transpose(1, 2)
        bound = quest_bound(q.view(B, H, G, -1), kmin, kmax, in_ctx, quest_beta)
        n_prior = torch.where(mode == MODES["hybrid"],
                              n_forced + torch.minimum(prior_blocks.long().clamp_max(budget), n_own), n_forced)
        first = topk_mask(key, torch.where(mode == MODES["prior"], total, n_prior))
        qkey = torch.where(first, _FORCED, bound)
        qkey = torch.where(in_ctx[:, None, :], qkey, neg)
        key = torch.where((mode == MODES["prior"])[:, None, None], key, qkey)
    vals, idx = key.topk(k, dim=-1)  # [B, H, k]
    keep = (torch.arange(k, device=dev)[None, None, :] < total[:, None, None]) & (vals > float("-inf"))
    ids = torch.where(keep, idx, MB).sort(-1).values
    counts = keep.sum(-1)
    if k < S:
        ids = torch.cat([ids, ids.new_full((B, H, S - k), MB)], -1)
    dense = (budget == 0) | (nblk <= sink_blocks.long() + window_blocks.long() + budget)
    if overflow_dense:
        dense = dense | (n_forced + budget > S)
    jj = torch.arange(S, device=dev)
    dense_ids = torch.where(jj[None, :] < nblk[:, None], jj[None, :], MB)  # [B, S]
    ids = torch.where(dense[:, None, None], dense_ids[:, None, :].expand(B, H, S), ids)
    counts = torch.where(dense[:, None], nblk[:, None].expand(B, H), counts)
    return Selection(ids=ids.to(torch.int32), counts=counts.to(torch.int32), dense=dense)


_FRESH = torch.iinfo(torch.int64).min  # the sign bit of a pending key's second word: made on the last step


def _packed_torch(seq_lens, budget_blocks, sink_blocks, window_blocks, block_size: int):
    nblk = (seq_lens.long() + block_size - 1) // block_size
    return nblk, nblk | (budget_blocks.long() << 24) | (sink_blocks.long() << 40) | (window_blocks.long() << 52)


def _pend_torch(fresh: Selection, pending: SelectionCache, rows, seq_lens, budget_blocks, sink_blocks, window_blocks,
                mode, ctags, block_size: int, every: int, clocks) -> Selection:
    """``reselect_async``'s side launch in torch: the due query-aware rows (clock a multiple of ``every``) store
    the fresh selection in the pending cache, marked fresh; the other rows are left alone."""
    due = (mode.long() != MODES["prior"]) & ((clocks.long() % every) == 0)
    if bool(due.any()):
        r = rows.long()[due]
        _, packed = _packed_torch(seq_lens, budget_blocks, sink_blocks, window_blocks, block_size)
        pending.ids[r] = fresh.ids[due].to(pending.ids.dtype)
        pending.counts[r] = fresh.counts[due].to(pending.counts.dtype)
        pending.kcounts[r] = fresh.kernel_counts()[due].to(pending.kcounts.dtype)
        pending.dense[r] = fresh.dense[due].to(pending.dense.dtype)
        pending.key[r, :, 0] = ctags.long()[due][:, None]
        pending.key[r, :, 1] = (packed[due] | _FRESH)[:, None]
    return Selection(ids=pending.ids, counts=pending.counts, dense=pending.dense, kcounts=pending.kcounts, rows=rows)


def _adopt_torch(cache: SelectionCache, pending: SelectionCache, rows, seq_lens, budget_blocks, sink_blocks,
                 window_blocks, ctags, block_size: int) -> None:
    """``reselect_async``'s main launch in torch, first part (the kernel's ``_adopt``): a row takes its pending
    selection when it is fresh, of the same admission and controls, and at most one block behind."""
    r = rows.long()
    nblk, packed = _packed_torch(seq_lens, budget_blocks, sink_blocks, window_blocks, block_size)
    ptag, pp = pending.key[r, :, 0], pending.key[r, :, 1]  # [B, H]
    pv = pp & ~_FRESH
    pn = pv & 0xFFFFFF
    ok = ((ptag == ctags.long()[:, None]) & (pp < 0) & ((pv >> 24) == (packed >> 24)[:, None])
          & ((pn == nblk[:, None]) | (pn == (nblk - 1)[:, None])))
    if not bool(ok.any()):
        return
    cache.ids[r] = torch.where(ok[..., None], pending.ids[r], cache.ids[r])
    cache.counts[r] = torch.where(ok, pending.counts[r], cache.counts[r])
    cache.kcounts[r] = torch.where(ok, pending.kcounts[r], cache.kcounts[r])
    cache.dense[r] = torch.where(ok[:, 0], (pending.kcounts[r][:, 0] < 0).to(cache.dense.dtype), cache.dense[r])
    cache.key[r, :, 0] = torch.where(ok, ptag, cache.key[r, :, 0])
    cache.key[r, :, 1] = torch.where(ok, pv, cache.key[r, :, 1])
    pending.key[r, :, 1] = torch.where(ok, pv, pp)


def _reuse_torch(fresh: Selection, cache: SelectionCache, rows, seq_lens, budget_blocks, sink_blocks, window_blocks,
                 mode, ctags, block_size: int, every: int, clocks) -> Selection:
    """The selection cache in torch, with the Triton kernel's rule (``select_triton._reuse``): a query-aware row
    whose clock (the step clock, or its length) is not a multiple of ``every`` keeps its cached blocks
    (appending the block a new token opened); every other row takes the fresh selection. Prior rows always take
    it (the kernel's prior cache is exact)."""
    r = rows.long()
    S = cache.ids.shape[2]
    nblk, packed = _packed_torch(seq_lens, budget_blocks, sink_blocks, window_blocks, block_size)
    old_tag, old = cache.key[r, :, 0], cache.key[r, :, 1]  # [B, H]
    kc = cache.kcounts[r]
    ok = ((old_tag == ctags.long()[:, None]) & (mode.long() != MODES["prior"])[:, None]
          & ((old >> 24) == (packed >> 24)[:, None]) & ((clocks.long() % every) != 0)[:, None])
    keep = ok & ((old & 0xFFFFFF) == nblk[:, None])
    app = ok & ((old & 0xFFFFFF) == (nblk - 1)[:, None]) & (kc >= 0) & (kc < S)
    take = ~(keep | app)
    ids, counts = cache.ids[r], cache.counts[r]
    ids = torch.where(take[..., None], fresh.ids.to(ids.dtype), ids)
    counts = torch.where(take, fresh.counts.to(counts.dtype), counts)
    kcounts = torch.where(take, fresh.kernel_counts().to(kc.dtype), kc)
    if bool(app.any()):
        bb, hh = app.nonzero(as_tuple=True)
        ids[bb, hh, kc[bb, hh].long()] = (nblk[bb] - 1).to(ids.dtype)
        counts = counts + app.to(counts.dtype)
        kcounts = kcounts + app.to(kcounts.dtype)
    cache.ids[r], cache.counts[r], cache.kcounts[r] = ids, counts, kcounts
    cache.dense[r] = torch.where(take[:, 0], fresh.dense.to(cache.dense.dtype), cache.dense[r])
    cache.key[r, :, 0] = ctags.long()[:, None].expand_as(old_tag)
    cache.key[r, :, 1] = torch.where(take | app, packed[:, None], old)
    return Selection(ids=cache.ids, counts=cache.counts, dense=cache.dense, kcounts=cache.kcounts, rows=rows)


def select_blocks_ref(scores: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, tag_ok: torch.Tensor,
                      seq_len: int, block_size: int, budget: int, sink: int, window: int, mode: str,
                      prior_share: int, q: torch.Tensor | None, beta: float = 1.0,
                      scored: torch.Tensor | None = None) -> list[list[int]] | None:
    """One row, pure python over logical blocks. scores [nblk, H]; kmin/kmax [nblk, H, D]; tag_ok [nblk] (the
    row's own tag); scored [nblk] (tag >= 0: some request scored it; None: no block but the row's own is scored);
    q [Hq, D]. Returns per KV head the sorted selected block ids, or None for a dense row. Ties in the
    ranking key are broken arbitrarily, so tests compare sets only where keys are distinct."""
    nblk = -(-seq_len // block_size)
    if budget == 0 or nblk <= sink + window + budget:
        return None
    H = scores.shape[1]
    G = q.shape[0] // H if q is not None else 1
    out = []
    for h in range(H):
        sw = [j < sink or j >= nblk - max(window, 1) for j in range(nblk)]
        other = [not sw[j] and not bool(tag_ok[j]) and scored is not None and bool(scored[j]) and mode != "prior"
                 for j in range(nblk)]  # another request scored it: the query-aware key only
        forced = [j for j in range(nblk) if sw[j] or (not bool(tag_ok[j]) and not other[j])]
        rest = [j for j in range(nblk) if j not in forced]
        own = [j for j in rest if not other[j]]
        chosen = set(forced)
        n_prior = budget if mode == "prior" else (min(prior_share, budget) if mode == "hybrid" else 0)
        by_prior = sorted(own, key=lambda j: -float(scores[j, h]))[:n_prior]
        chosen |= set(by_prior)
        if mode != "prior":
            rel = []
            for g in range(G):
                qq = q[h * G + g].double()
                c = [(kmin[i, h].double() + kmax[i, h].double()) / 2 for i in range(nblk)]
                r = [(kmax[i, h].double() - kmin[i, h].double()) / 2 for i in range(nblk)]
                b = [float((qq * c[i]).sum() + beta * (qq.abs() * r[i]).sum()) for i in range(nblk)]
                rel.append([(x - max(b)) / math.sqrt(q.shape[-1]) for x in b])
            bound = [math.log(sum(math.exp(r[i]) for r in rel)) for i in range(nblk)]
            remaining = [j for j in rest if j not in chosen]
            chosen |= set(sorted(remaining, key=lambda j: -bound[j])[: budget - len(by_prior)])
        out.append(sorted(chosen))
    return out


def _select_triton(summ, block_table, seq_lens, budget_blocks, sink_blocks, window_blocks, mode, prior_blocks,
                   req_tags, max_selected, q, block_size, need_query, cache=None, rows=None,
                   overflow_dense=False, quest_beta=1.0, every=1, ctags=None, clocks=None, pending=None,
                   due_only=False) -> Selection:
    from .select_triton import quest_bounds_triton, select_blocks_triton

    qb = None
    if need_query:
        if q is None:
            raise ValueError("query-aware selection needs q")
        reuse = None if cache is None else (cache, rows, req_tags if ctags is None else ctags, budget_blocks,
                                             sink_blocks, window_blocks, max_selected, every, clocks)
        qb = quest_bounds_triton(q, summ.kmin, summ.kmax, block_table, seq_lens, mode, block_size, beta=quest_beta,
                                 reuse=reuse, due_only=due_only)
    ids, counts, kcounts, dense = select_blocks_triton(
        summ.scores, summ.tags, block_table, seq_lens, budget_blocks, sink_blocks, window_blocks, mode,
        prior_blocks, req_tags, max_selected, block_size, qb, cache, rows, overflow_dense=overflow_dense,
        every=every, ctags=ctags, clocks=clocks, pending=pending, due_only=due_only)
    if cache is not None:  # per-slot buffers, not gathered: pass sel_rows=selection.rows to sparse_decode
        return Selection(ids=ids, counts=counts, dense=dense, kcounts=kcounts, rows=rows)
    return Selection(ids=ids, counts=counts, dense=dense.bool(), kcounts=kcounts)
