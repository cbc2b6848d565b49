"""Fused block selection (Triton): one program per (row, KV head), no sort, no host sync.

Same rule and output as :func:`prescore.kernels.selection.select_blocks` (the torch version is the reference).
Per program: pass 0 builds the ranking key of every logical block (sink/window > never-scored > prior or the
query-aware key; -inf outside the context) as order-preserving int32 in a workspace; a 32-step bitwise binary
search finds the ``total``-th largest key; a final pass writes the selected ids in ascending order (ties at the
threshold taken in index order). ``hybrid`` runs the search twice: first ``forced + prior_blocks`` by the
prior, then the rest of the budget by the query-aware key.

With a selection cache (decode), a prior-mode row is recomputed only when its block count or controls change,
and when the count grew by exactly one block since the cached result, the result is updated in place in
O(selected) instead (``_select_incremental``: exact, the same ids as a full selection). In steady decode rows
reach block boundaries at different steps, so without it nearly every step paid one full selection.
"""

from __future__ import annotations

import triton
import triton.language as tl

CH_MAX = 8192  # keys held in registers up to this many blocks per row (131k tokens at block 16)
FORCED = tl.constexpr(3.0e38)
MUST = tl.constexpr(1.0e38)


@triton.jit
def _sortable(x):
    """float32 -> int32 with the same order (negative floats: flip all bits but the sign)."""
    i = x.to(tl.int32, bitcast=True)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


@triton.jit
def _load_key(ptr, offs, n):
    """Workspace int32 (signed order) -> uint32 with the same order (flip the sign bit)."""
    v = tl.load(ptr + offs, mask=offs < n, other=-2147483648)
    return (v ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _count_ge4(u, valid, cand4):
    """counts of (u >= cand4[i]) over valid entries, for 4 candidates at once -> [4] int32."""
    return tl.sum(((u[:, None] >= cand4[None, :]) & valid[:, None]).to(tl.int32), 0)


@triton.jit
def _kth_largest(WS, n_items, total, CH: tl.constexpr, ONE: tl.constexpr):
    """Largest t with count(key >= t) >= total over WS[0:n_items] (uint32 keys as _load_key gives them).

    Radix-4 search: 16 steps, each counting 4 candidate digits in one reduction. ONE (n_items <= CH): the keys
    stay in registers for every step; else each step streams the workspace."""
    prefix = tl.zeros([], dtype=tl.uint32)
    digits = tl.arange(0, 4).to(tl.uint32)
    if ONE:
        offs = tl.arange(0, CH)
        valid = offs < n_items
        u = _load_key(WS, offs, n_items)
    for step in range(16):
        shift = (tl.full([], 30, tl.int32) - 2 * step).to(tl.uint32)
        cand = prefix | (digits << shift)
        if ONE:
            cnt = _count_ge4(u, valid, cand)
        else:
            cnt = tl.zeros([4], dtype=tl.int32)
            for c in range(0, n_items, CH):
                offs = c + tl.arange(0, CH)
                cnt += _count_ge4(_load_key(WS, offs, n_items), offs < n_items, cand)
        best = tl.max(tl.where(cnt >= total, digits, 0), 0)
        prefix = prefix | (best << shift)
    return prefix


@triton.jit
def _in_top(ws, j, n_items, thr, ties, seen_eq, n):
    """Which of the keys at offsets j are in the top n (keys > thr, then the first ``ties`` keys == thr in index
    order, ``seen_eq`` of them met in earlier chunks); also the number of keys == thr in this chunk."""
    inb = j < n_items
    u = _load_key(ws, j, n_items)
    eq = (u == thr) & inb
    eq_rank = seen_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
    top = (((u > thr) & inb) | (eq & (eq_rank < ties))) & (n > 0)
    return top, tl.sum(eq.to(tl.int32), 0)


@triton.jit
def _threshold(WS, n_items, total, CH: tl.constexpr, ONE: tl.constexpr):
    """(t, ties): the total-th largest key t and how many keys equal to t complete the top ``total``."""
    thr = _kth_largest(WS, n_items, total, CH, ONE)
    n_gt = tl.zeros([], dtype=tl.int32)
    for c in range(0, n_items, CH):
        j = c + tl.arange(0, CH)
        n_gt += tl.sum(((_load_key(WS, j, n_items) > thr) & (j < n_items)).to(tl.int32), 0)
    return thr, total - n_gt


@triton.jit
def _select_kernel(
    SCORES, TAGS, BT, SEQ, BUDGET, SINK, WINDOW, MODE, PRIOR, RTAG, QKEY, WS,
    IDS, COUNTS, KCOUNTS, DENSE, ROW, CKEY, COL, SPARSE, LABEL, ACC,
    stride_sc_b, stride_sc_h, stride_sc_m, stride_tg_m, stride_bt_b, stride_bt_n,
    stride_qk_b, stride_qk_h, stride_qk_n,
    stride_ws_b, stride_ws_h,
    stride_id_b, stride_id_h, stride_id_s, stride_cn_b, stride_ck_r, stride_ck_h, stride_acc,
    MB, S, H: tl.constexpr, BS: tl.constexpr, CH: tl.constexpr, ONE: tl.constexpr, HAS_QKEY: tl.constexpr,
    USE_CACHE: tl.constexpr, HAS_COL: tl.constexpr, OVERFLOW_DENSE: tl.constexpr, S_PAD: tl.constexpr,
    STATS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    if HAS_COL:  # per-row method: its column of the per-method scores and tags
        col = tl.load(COL + b).to(tl.int64)
        SCORES += col * stride_sc_m
        TAGS += col * stride_tg_m
    seq = tl.load(SEQ + b)
    nblk = (seq + BS - 1) // BS
    budget = tl.load(BUDGET + b).to(tl.int32)
    sink = tl.load(SINK + b).to(tl.int32)
    window = tl.load(WINDOW + b).to(tl.int32)
    mode = tl.load(MODE + b).to(tl.int32)
    rtag = tl.load(RTAG + b).to(tl.int64)
    if USE_CACHE:
        # prior-mode selection only changes when the row's block count (or request / controls) changes:
        # every block_size tokens. The cache holds the last result per (row, head) and its key.
        r = tl.load(ROW + b)
        packed = (nblk.to(tl.int64) | (budget.to(tl.int64) << 24) | (sink.to(tl.int64) << 40)
                  | (window.to(tl.int64) << 52))
        ck = CKEY + r * stride_ck_r + h * stride_ck_h
        old_packed = tl.load(ck + 1)
        same = (tl.load(ck) == rtag) & (mode == 0)
        hit = same & (old_packed == packed)
        if hit == 0:
            # one block more than the cached selection (the usual decode step at a block boundary): the block
            # leaving the recent window, x, competes with the cached choice's weakest block; everything else is
            # unchanged (see _select_incremental). Needs window >= 2 blocks (the block just filled and scored is
            # still forced), x past the sink and freshly scored, and a cached sparse, uncapped selection.
            x = nblk - 1 - window
            kc_old = tl.load(KCOUNTS + r * stride_cn_b + h)
            inc = (same & (old_packed == packed - 1) & (window >= 2) & (x >= sink) & (kc_old >= 0)
                   & (kc_old < nblk - 1) & (kc_old < S))
            phys_x = tl.load(BT + b * stride_bt_b + x * stride_bt_n, mask=inc, other=0).to(tl.int64)
            inc = inc & (tl.load(TAGS + phys_x, mask=inc, other=-1) == rtag)
            if inc:
                _select_incremental(SCORES, TAGS, BT, IDS, b, h, r, nblk, sink, x, phys_x, kc_old, rtag,
                                    stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n, stride_id_b, stride_id_h,
                                    stride_id_s, S_PAD)
            else:
                _select_row(SCORES, TAGS, BT, PRIOR, QKEY, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                            sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n, stride_qk_b,
                            stride_qk_h, stride_qk_n, stride_ws_b, stride_ws_h, stride_id_b, stride_id_h, stride_id_s,
                            stride_cn_b, MB, S, CH, ONE, HAS_QKEY, OVERFLOW_DENSE)
            tl.store(ck, rtag)
            tl.store(ck + 1, packed)
    else:
        _select_row(SCORES, TAGS, BT, PRIOR, QKEY, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, b, nblk, budget,
                    sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n, stride_qk_b,
                    stride_qk_h, stride_qk_n, stride_ws_b, stride_ws_h, stride_id_b, stride_id_h, stride_id_s,
                    stride_cn_b, MB, S, CH, ONE, HAS_QKEY, OVERFLOW_DENSE)
    if STATS:  # device counters of sparse rows: this head's share of (selected tokens, context, blocks)
        if USE_CACHE:
            r_out = tl.load(ROW + b)
        else:
            r_out = b
        kc = tl.load(KCOUNTS + r_out * stride_cn_b + h)
        if (tl.load(SPARSE + b) != 0) & (kc >= 0):  # a head the selection turned dense counts as nothing
            a = ACC + tl.load(LABEL + b).to(tl.int64) * stride_acc
            # the tail block is always selected (recent window); its unfilled slots are not tokens
            tl.atomic_add(a, (kc * BS - (nblk * BS - seq)).to(tl.float64) / H)
            tl.atomic_add(a + 1, seq.to(tl.float64) / H)
            tl.atomic_add(a + 2, kc.to(tl.float64) / H)
            tl.atomic_add(a + 3, nblk.to(tl.float64) / H)


@triton.jit
def _select_incremental(SCORES, TAGS, BT, IDS, b, h, r, nblk, sink, x, phys_x, cnt, rtag, stride_sc_b,
                        stride_sc_h, stride_bt_b, stride_bt_n, stride_id_b, stride_id_h, stride_id_s,
                        S_PAD: tl.constexpr):
    """Prior mode, block count n-1 -> n: the cached list (sorted, ``cnt`` ids) is forced blocks (sink, window
    [x, n-1), stale) + the top candidates of [sink, x). Now x leaves the window and block n-1 joins it. The new
    top candidates are the old ones plus x minus the weakest (key ascending, then index descending: the full
    selection takes ties in index order); so either x or the weakest old candidate drops out of the list, and
    n-1 is appended. Same result as :func:`_select_row` on the same keys; counts are unchanged."""
    ids = IDS + r * stride_id_b + h * stride_id_h
    p = tl.arange(0, S_PAD)
    pm = p < cnt
    j = tl.load(ids + p * stride_id_s, mask=pm, other=0)
    cand = pm & (j >= sink) & (j < x)
    phys = tl.load(BT + b * stride_bt_b + j * stride_bt_n, mask=cand, other=0).to(tl.int64)
    sc = tl.load(SCORES + phys * stride_sc_b + h * stride_sc_h, mask=cand, other=0.0)
    tg = tl.load(TAGS + phys, mask=cand, other=0)
    key = _sortable(tl.where(tg != rtag, MUST, sc))
    key = tl.where(cand, key, 2147483647)
    kmin = tl.min(key, 0)
    weakest = tl.max(tl.where(cand & (key == kmin), j, -1), 0)
    key_x = _sortable(tl.load(SCORES + phys_x * stride_sc_b + h * stride_sc_h))
    x_in = (weakest >= 0) & (key_x > kmin)
    rm = tl.where(x_in, weakest, x)
    pos_rm = tl.sum((pm & (j < rm)).to(tl.int32), 0)
    nxt = tl.load(ids + (p + 1) * stride_id_s, mask=(p + 1) < cnt, other=0)
    new = tl.where(p < pos_rm, j, nxt)
    new = tl.where(p == cnt - 1, nblk - 1, new)
    tl.debug_barrier()  # every old id is read before any is overwritten
    tl.store(ids + p * stride_id_s, new, mask=pm)


@triton.jit
def _select_row(SCORES, TAGS, BT, PRIOR, QKEY, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n, stride_qk_b,
                stride_qk_h, stride_qk_n, stride_ws_b, stride_ws_h, stride_id_b, stride_id_h, stride_id_s,
                stride_cn_b, MB, S, CH: tl.constexpr, ONE: tl.constexpr, HAS_QKEY: tl.constexpr,
                OVERFLOW_DENSE: tl.constexpr):
    """Select for batch row b, KV head h; write the result at output row r."""
    dense = (budget == 0) | (nblk <= sink + window + budget)
    ws = WS + b * stride_ws_b + h * stride_ws_h

    # pass 0: prior key (with forced overrides) -> workspace; count forced blocks
    n_forced = tl.zeros([], dtype=tl.int32)
    for c in range(0, MB, CH):
        j = c + tl.arange(0, CH)
        inb = j < MB
        in_ctx = j < nblk
        phys = tl.load(BT + b * stride_bt_b + j * stride_bt_n, mask=inb & in_ctx, other=0).to(tl.int64)
        sc = tl.load(SCORES + phys * stride_sc_b + h * stride_sc_h, mask=inb & in_ctx, other=0.0)
        tg = tl.load(TAGS + phys, mask=inb & in_ctx, other=0)
        sw = (j < sink) | (j >= nblk - window) | (j == nblk - 1)
        stale = tg != rtag
        key = tl.where(sw, FORCED, tl.where(stale, MUST, sc))
        key = tl.where(in_ctx, key, float("-inf"))
        tl.store(ws + j, _sortable(key), mask=inb)
        n_forced += tl.sum(((sw | stale) & in_ctx).to(tl.int32), 0)
    if OVERFLOW_DENSE:  # more must-attend blocks than the capacity holds: attend everything (never drop one)
        dense = dense | (n_forced + budget > S)
    total = tl.minimum(tl.minimum(n_forced + budget, S), nblk)

    if HAS_QKEY:
        if mode != 0:
            # first stage: forced (+ the prior share for hybrid) by the prior key
            n_first = n_forced
            if mode == 2:
                n_first += tl.minimum(tl.load(PRIOR + b).to(tl.int32), budget)
            n_first = tl.minimum(n_first, total)
            thr, ties = _threshold(ws, MB, n_first, CH, ONE)
            seen_eq = tl.zeros([], dtype=tl.int32)
            for c in range(0, MB, CH):
                j = c + tl.arange(0, CH)
                inb = j < MB
                first, n_eq = _in_top(ws, j, MB, thr, ties, seen_eq, n_first)
                qk = tl.load(QKEY + b * stride_qk_b + h * stride_qk_h + j * stride_qk_n, mask=inb, other=0.0)
                key = tl.where(first, FORCED, qk)
                key = tl.where(j < nblk, key, float("-inf"))
                tl.store(ws + j, _sortable(key), mask=inb)
                seen_eq += n_eq

    thr, ties = _threshold(ws, MB, total, CH, ONE)
    seen_eq = tl.zeros([], dtype=tl.int32)
    written = tl.zeros([], dtype=tl.int32)
    ids = IDS + r * stride_id_b + h * stride_id_h
    for c in range(0, MB, CH):
        j = c + tl.arange(0, CH)
        take, n_eq = _in_top(ws, j, MB, thr, ties, seen_eq, total)
        pos = written + tl.cumsum(take.to(tl.int32), 0) - 1
        if dense:
            take = (j < nblk) & (j < S)
            pos = j
        tl.store(ids + pos * stride_id_s, j.to(tl.int32), mask=take & (pos < S))
        written += tl.sum(take.to(tl.int32), 0)
        seen_eq += n_eq
    for c in range(0, S, CH):  # padding
        p = c + tl.arange(0, CH)
        tl.store(ids + p * stride_id_s, tl.full([CH], 0, tl.int32) + MB, mask=(p >= written) & (p < S))
    cnt = tl.where(dense, nblk, total)
    tl.store(COUNTS + r * stride_cn_b + h, cnt)
    tl.store(KCOUNTS + r * stride_cn_b + h, tl.where(dense, -1, total))
    tl.store(DENSE + r, dense.to(tl.int8), mask=h == 0)


def select_blocks_triton(scores, tags, block_table, seq_lens, budget_blocks, sink_blocks, window_blocks, mode,
                         prior_blocks, req_tags, max_selected, block_size, qkey=None, cache=None, rows=None,
                         cols=None, overflow_dense=False, stats=None):
    """Launch wrapper; returns (ids [B,H,S] int32, counts [B,H] int32, kcounts [B,H] int32, dense [B] int8).

    With ``cache`` (a :class:`~prescore.kernels.selection.SelectionCache`) and ``rows [B]`` int32 (each batch
    row's persistent cache row, e.g. its request slot), results live in the cache's buffers at ``rows`` and a
    prior-mode row whose block count, tag and controls are unchanged since its last call is not recomputed;
    the returned tensors are then the cache buffers (index them with ``rows``).

    ``cols [B]`` (per-row scoring method): ``scores`` is ``[NB, M, H]`` and ``tags`` ``[M, NB]`` and row b reads
    column ``cols[b]``. ``overflow_dense``: a row whose forced blocks + budget exceed ``max_selected`` is
    returned dense (count -1) instead of dropping must-attend blocks.

    ``stats = (sparse [B], labels [B], acc [L, 4] float64)``: also add each sparse row's (selected tokens,
    context tokens, selected blocks, context blocks), averaged over KV heads, into ``acc[labels[b]]`` (what
    :func:`prescore.kernels.step_triton.row_stats_triton` does, without its own launch)."""
    import torch

    # per-row controls are indexed by row without strides (contiguous() is free when they already are)
    seq_lens, budget_blocks, sink_blocks, window_blocks, mode, prior_blocks, req_tags = (
        t.contiguous() for t in (seq_lens, budget_blocks, sink_blocks, window_blocks, mode, prior_blocks, req_tags))
    B, MB = block_table.shape
    H = scores.shape[-1]
    S = max_selected
    dev = block_table.device
    has_col = cols is not None
    if has_col:
        if scores.dim() != 3 or tags.dim() != 2:
            raise ValueError("per-row columns need scores [NB, M, H] and tags [M, NB]")
        s_sc_m, s_tg_m, cols = scores.stride(1), tags.stride(0), cols.contiguous()
    else:
        s_sc_m, s_tg_m, cols = 0, 0, seq_lens
    if cache is not None:
        rows = rows.contiguous()
        ids, counts, kcounts, dense, ckey = cache.ids, cache.counts, cache.kcounts, cache.dense, cache.key
        if ids.shape[2] != S:
            raise ValueError(f"cache capacity {ids.shape[2]} != max_selected {S}")
    else:
        ids = torch.empty(B, H, S, dtype=torch.int32, device=dev)
        counts = torch.empty(B, H, dtype=torch.int32, device=dev)
        kcounts = torch.empty(B, H, dtype=torch.int32, device=dev)
        dense = torch.empty(B, dtype=torch.int8, device=dev)
        ckey = torch.empty(1, 1, 2, dtype=torch.int64, device=dev)
        rows = seq_lens
    ws = torch.empty(B, H, MB, dtype=torch.int32, device=dev)
    has_q = qkey is not None
    qk = qkey if has_q else scores.new_empty(1, 1, 1)
    CH = min(CH_MAX, max(64, triton.next_power_of_2(MB)))
    if stats is not None:
        sparse, labels, acc = stats
        sparse, labels = sparse.contiguous(), labels.contiguous()
    else:
        sparse = labels = seq_lens
        acc = torch.empty(1, 4, dtype=torch.float64, device=dev)
    _select_kernel[(B, H)](
        scores, tags, block_table, seq_lens, budget_blocks, sink_blocks, window_blocks, mode, prior_blocks,
        req_tags, qk, ws, ids, counts, kcounts, dense, rows, ckey, cols, sparse, labels, acc,
        scores.stride(0), scores.stride(-1), s_sc_m, s_tg_m, block_table.stride(0), block_table.stride(1),
        qk.stride(0), qk.stride(1), qk.stride(2), ws.stride(0), ws.stride(1),
        ids.stride(0), ids.stride(1), ids.stride(2), counts.stride(0), ckey.stride(0), ckey.stride(1), acc.stride(0),
        MB, S, H, BS=block_size, CH=CH, ONE=MB <= CH, HAS_QKEY=has_q, USE_CACHE=cache is not None,
        HAS_COL=has_col, OVERFLOW_DENSE=overflow_dense, S_PAD=max(16, triton.next_power_of_2(S)),
        STATS=stats is not None, num_warps=8 if CH >= 4096 else 4,
    )
    return ids, counts, kcounts, dense
