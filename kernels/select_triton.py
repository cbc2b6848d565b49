"""Fused block selection (Triton): one program per (row, KV head), no sort, no host sync.

Same rule and output as :func:`prescore.kernels.selection.select_blocks` (the torch version is the reference).
Per program: the ranking key of every logical block (sink/window > never-scored > prior or the query-aware key;
-inf outside the context; a query-aware row ranks a block another request scored below every prior, so only its
query-aware stage can take it) as an order-preserving unsigned int; a radix search finds the ``total``-th largest
key; a final pass writes the selected ids in ascending order (ties at the threshold taken in index order).
``hybrid`` runs the search twice: first ``forced + prior_blocks`` by the prior, then the rest of the budget by
the query-aware key. Block tables up to 8192 blocks (``_select_row_reg``): every key stays in registers and each
radix step counts 16 candidate digits at once (8 steps); a row of at most 2048 blocks searches only that tier of
a wider table. Wider tables (``_select_row``) stream the keys through a workspace (radix 4, 16 steps).

With a selection cache (decode), a prior-mode row is recomputed only when its block count or controls change,
and when the count grew by exactly one block since the cached result, the result is updated in place in
O(selected) instead (``_select_incremental``: exact, the same ids as a full selection). In steady decode rows
reach block boundaries at different steps, so without it nearly every step paid one full selection.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .decode import _num_sms
from .selection import MODE_HYBRID, MODE_PRIOR

CH_LO = tl.constexpr(2048)  # the register path's tiers in a wider table: 32k tokens at block 16 ...
CH_MID = tl.constexpr(4096)  # ... and 64k
CH_MAX = 8192  # keys held in registers up to this many blocks per row (131k tokens at block 16)
FORCED = tl.constexpr(3.0e38)
MUST = tl.constexpr(1.0e38)
OTHER = tl.constexpr(-3.0e38)  # scored by another request (prefix-shared): below every prior, above -inf


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
    SCORES, TAGS, BT, SEQ, CLOCK, BUDGET, SINK, WINDOW, MODE, PRIOR, RTAG, CTAG, BND, PMAX, WS,
    IDS, COUNTS, KCOUNTS, DENSE, ROW, CKEY, COL, SPARSE, LABEL, ACC, PIDS, PCOUNTS, PKCOUNTS, PKEY,
    stride_sc_b, stride_sc_h, stride_sc_m, stride_tg_m, stride_bt_b, stride_bt_n,
    s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS,
    stride_ws_b, stride_ws_h,
    stride_id_b, stride_id_h, stride_id_s, stride_cn_b, stride_ck_r, stride_ck_h, stride_acc,
    MB, S, EVERY, H: tl.constexpr, BS: tl.constexpr, CH: tl.constexpr, ONE: tl.constexpr, HAS_QKEY: tl.constexpr,
    USE_CACHE: tl.constexpr, HAS_COL: tl.constexpr, OVERFLOW_DENSE: tl.constexpr, S_PAD: tl.constexpr,
    STATS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, NS_PAD: tl.constexpr, REG: tl.constexpr,
    ADOPT: tl.constexpr, DUE_ONLY: tl.constexpr,
):
    """One (row, KV head). With a cache (USE_CACHE): ADOPT (the main launch of ``reselect_async``) first takes the
    pending selection (PIDS.., PKEY) a DUE_ONLY launch made for this row on its previous step; DUE_ONLY (the side
    launch) selects afresh only the query-aware rows whose clock is due, into the pending cache, and marks it
    fresh (the sign bit of its key's second word); every other row is left alone."""
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
    if DUE_ONLY:
        r = tl.load(ROW + b)
        if (mode != MODE_PRIOR) & ((tl.load(CLOCK + b) % EVERY) == 0):
            _select_any(SCORES, TAGS, BT, PRIOR, BND, PMAX, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk,
                        budget, sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                        s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS, stride_ws_b, stride_ws_h,
                        stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH, ONE, HAS_QKEY,
                        OVERFLOW_DENSE, G, G_PAD, NS_PAD, REG)
            ck = CKEY + r * stride_ck_r + h * stride_ck_h
            tl.store(ck, tl.load(CTAG + b).to(tl.int64))
            tl.store(ck + 1, _packed(nblk, budget, sink, window) | (tl.full([], 1, tl.int64) << 63))
    elif USE_CACHE:
        # prior-mode selection only changes when the row's block count (or request / controls) changes:
        # every block_size tokens. The cache holds the last result per (row, head) and its key.
        r = tl.load(ROW + b)
        packed = _packed(nblk, budget, sink, window)
        ck = CKEY + r * stride_ck_r + h * stride_ck_h
        ctag = tl.load(CTAG + b).to(tl.int64)  # the cache key: one per admission (content tags repeat)
        if ADOPT:
            _adopt(PIDS, PCOUNTS, PKCOUNTS, PKEY, IDS, COUNTS, KCOUNTS, DENSE, ck, r, h, ctag, packed, nblk, S,
                   stride_id_b, stride_id_h, stride_id_s, stride_cn_b, stride_ck_r, stride_ck_h, S_PAD)
        old_packed = tl.load(ck + 1)
        same = (tl.load(ck) == ctag) & (mode == MODE_PRIOR)
        hit = same & (old_packed == packed)
        # query-aware rows between re-selections (every EVERY tokens): keep the cached choice, appending the
        # block a new token opened (see _reuse)
        reuse = _reuse(CKEY, KCOUNTS, r, h, ctag, packed, nblk, tl.load(CLOCK + b), mode, S, EVERY, stride_ck_r,
                       stride_ck_h, stride_cn_b)
        if reuse == 2:
            kc_app = tl.load(KCOUNTS + r * stride_cn_b + h)
            tl.store(IDS + r * stride_id_b + h * stride_id_h + kc_app * stride_id_s, nblk - 1)
            tl.store(COUNTS + r * stride_cn_b + h, kc_app + 1)
            tl.store(KCOUNTS + r * stride_cn_b + h, kc_app + 1)
            tl.store(ck + 1, packed)
        if (hit == 0) & (reuse == 0):
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
                _select_any(SCORES, TAGS, BT, PRIOR, BND, PMAX, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk,
                            budget, sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                            s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS, stride_ws_b, stride_ws_h,
                            stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH, ONE, HAS_QKEY,
                            OVERFLOW_DENSE, G, G_PAD, NS_PAD, REG)
            tl.store(ck, ctag)
            tl.store(ck + 1, packed)
    else:
        _select_any(SCORES, TAGS, BT, PRIOR, BND, PMAX, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, b, nblk, budget,
                    sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                    s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS, stride_ws_b, stride_ws_h,
                    stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH, ONE, HAS_QKEY, OVERFLOW_DENSE,
                    G, G_PAD, NS_PAD, REG)
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
def _adopt(PIDS, PCOUNTS, PKCOUNTS, PKEY, IDS, COUNTS, KCOUNTS, DENSE, ck, r, h, ctag, packed, nblk, S, stride_id_b,
           stride_id_h, stride_id_s, stride_cn_b, stride_ck_r, stride_ck_h, S_PAD: tl.constexpr):
    """``reselect_async``: take the pending selection of (row r, head h) when it is fresh (made on the row's
    previous step), of the same admission and controls, and at most one block behind; clear its fresh mark."""
    pk = PKEY + r * stride_ck_r + h * stride_ck_h
    pp = tl.load(pk + 1)
    pv = pp & ~(tl.full([], 1, tl.int64) << 63)
    pn = (pv & 0xFFFFFF).to(tl.int32)
    ok = (tl.load(pk) == ctag) & (pp < 0) & ((pv >> 24) == (packed >> 24)) & ((pn == nblk) | (pn == nblk - 1))
    if ok:
        cnt = tl.load(PCOUNTS + r * stride_cn_b + h)
        kc = tl.load(PKCOUNTS + r * stride_cn_b + h)
        p = tl.arange(0, S_PAD)
        m = p < tl.minimum(cnt, S)  # a dense selection counts every block but holds at most S ids
        off = r * stride_id_b + h * stride_id_h + p * stride_id_s
        tl.store(IDS + off, tl.load(PIDS + off, mask=m, other=0), mask=m)
        tl.store(COUNTS + r * stride_cn_b + h, cnt)
        tl.store(KCOUNTS + r * stride_cn_b + h, kc)
        tl.store(DENSE + r, (kc < 0).to(tl.int8), mask=h == 0)
        tl.store(ck, ctag)
        tl.store(ck + 1, pv)
        tl.store(pk + 1, pv)


@triton.jit
def _select_any(SCORES, TAGS, BT, PRIOR, BND, PMAX, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS, stride_ws_b, stride_ws_h,
                stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH: tl.constexpr, ONE: tl.constexpr,
                HAS_QKEY: tl.constexpr, OVERFLOW_DENSE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                NS_PAD: tl.constexpr, REG: tl.constexpr):
    if REG:
        # a row in a wider block table (a long max_model_len) searches only the smallest tier that holds it
        if (CH > CH_LO) & (nblk <= CH_LO):
            _select_row_reg(SCORES, TAGS, BT, PRIOR, BND, PMAX, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                            sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                            s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS,
                            stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH_LO, HAS_QKEY,
                            OVERFLOW_DENSE, G, G_PAD, NS_PAD)
        elif (CH > CH_MID) & (nblk <= CH_MID):
            _select_row_reg(SCORES, TAGS, BT, PRIOR, BND, PMAX, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                            sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                            s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS,
                            stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH_MID, HAS_QKEY,
                            OVERFLOW_DENSE, G, G_PAD, NS_PAD)
        else:
            _select_row_reg(SCORES, TAGS, BT, PRIOR, BND, PMAX, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                            sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                            s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS,
                            stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH, HAS_QKEY,
                            OVERFLOW_DENSE, G, G_PAD, NS_PAD)
    else:
        _select_row(SCORES, TAGS, BT, PRIOR, BND, PMAX, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                    sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                    s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS, stride_ws_b, stride_ws_h,
                    stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH, ONE, HAS_QKEY, OVERFLOW_DENSE,
                    G, G_PAD, NS_PAD)


@triton.jit
def _packed(nblk, budget, sink, window):
    """The cache key's second word: block count and the row's controls."""
    return (nblk.to(tl.int64) | (budget.to(tl.int64) << 24) | (sink.to(tl.int64) << 40)
            | (window.to(tl.int64) << 52))


@triton.jit
def _reuse(CKEY, KCOUNTS, r, h, ctag, packed, nblk, clock, mode, S, EVERY, stride_ck_r, stride_ck_h, stride_cn_b):
    """Whether a query-aware row (mode != MODE_PRIOR) keeps its cached selection this step: 0 = select afresh, 1 = keep
    it (same block count), 2 = keep it and append the block the new token opened. A row re-selects when its
    ``clock`` (the step clock: every row of a step has the same, so rows re-select together and the other
    steps skip the bound and selection work; default the row's length) is a multiple of EVERY (EVERY 1: every
    step), when its request, controls or cached state changed, or when there is no room to append."""
    ck = CKEY + r * stride_ck_r + h * stride_ck_h
    old = tl.load(ck + 1)
    kc = tl.load(KCOUNTS + r * stride_cn_b + h)
    ok = (tl.load(ck) == ctag) & (mode != MODE_PRIOR) & ((old >> 24) == (packed >> 24)) & ((clock % EVERY) != 0)
    old_n = (old & 0xFFFFFF).to(tl.int32)
    keep = ok & (old_n == nblk)
    app = ok & (old_n == nblk - 1) & (kc >= 0) & (kc < S)
    return tl.where(keep, 1, tl.where(app, 2, 0))


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
def _block_key(sc, tg, j, in_ctx, nblk, sink, window, rtag, mode, HAS_QKEY: tl.constexpr):
    """The first-stage key of blocks j (sink/window FORCED > never-scored or prior-row foreign MUST > the prior
    score > a block another request scored, in a query-aware row: OTHER), -inf outside the context; and the
    masks of must-attend and other-request blocks in the context."""
    sw = (j < sink) | (j >= nblk - window) | (j == nblk - 1)
    other = (tg != rtag) & (tg >= 0) & ((mode != MODE_PRIOR) & HAS_QKEY) & ~sw
    stale = (tg != rtag) & ~other
    key = tl.where(sw, FORCED, tl.where(stale, MUST, tl.where(other, OTHER, sc)))
    return tl.where(in_ctx, key, float("-inf")), (sw | stale) & in_ctx, other & in_ctx


@triton.jit
def _first_count(PRIOR, b, mode, budget, nblk, n_forced, n_other, total):
    """Blocks the first (prior) stage of a query-aware row takes: the forced ones, plus for hybrid the prior share,
    which goes to blocks this request scored."""
    n_first = n_forced
    if mode == MODE_HYBRID:
        n_first += tl.minimum(tl.minimum(tl.load(PRIOR + b).to(tl.int32), budget), nblk - n_forced - n_other)
    return tl.minimum(n_first, total)


@triton.jit
def _finish(ids, COUNTS, KCOUNTS, DENSE, r, h, written, dense, nblk, total, MB, S, stride_id_s, stride_cn_b,
            CH: tl.constexpr):
    """Pad the ids past the ``written`` selected ones with MB; store the counts (dense: every block, kernel
    count -1) and the row's dense flag."""
    for c in range(0, S, CH):
        p = c + tl.arange(0, CH)
        tl.store(ids + p * stride_id_s, tl.full([CH], 0, tl.int32) + MB, mask=(p >= written) & (p < S))
    tl.store(COUNTS + r * stride_cn_b + h, tl.where(dense, nblk, total))
    tl.store(KCOUNTS + r * stride_cn_b + h, tl.where(dense, -1, total))
    tl.store(DENSE + r, dense.to(tl.int8), mask=h == 0)


@triton.jit
def _select_row(SCORES, TAGS, BT, PRIOR, BND, PMAX, WS, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS, stride_ws_b, stride_ws_h,
                stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH: tl.constexpr, ONE: tl.constexpr,
                HAS_QKEY: tl.constexpr, OVERFLOW_DENSE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                NS_PAD: tl.constexpr):
    """Select for batch row b, KV head h; write the result at output row r."""
    dense = (budget == 0) | (nblk <= sink + window + budget)
    ws = WS + b * stride_ws_b + h * stride_ws_h

    # pass 0: prior key (with forced overrides) -> workspace; count forced blocks (and, for query-aware rows,
    # blocks another request scored: no prior for this row, they compete on the query-aware key)
    n_forced = tl.zeros([], dtype=tl.int32)
    n_other = tl.zeros([], dtype=tl.int32)
    for c in range(0, MB, CH):
        j = c + tl.arange(0, CH)
        inb = j < MB
        in_ctx = j < nblk
        phys = tl.load(BT + b * stride_bt_b + j * stride_bt_n, mask=inb & in_ctx, other=0).to(tl.int64)
        sc = tl.load(SCORES + phys * stride_sc_b + h * stride_sc_h, mask=inb & in_ctx, other=0.0)
        tg = tl.load(TAGS + phys, mask=inb & in_ctx, other=0)
        key, forced, other = _block_key(sc, tg, j, in_ctx, nblk, sink, window, rtag, mode, HAS_QKEY)
        tl.store(ws + j, _sortable(key), mask=inb)
        n_forced += tl.sum(forced.to(tl.int32), 0)
        n_other += tl.sum(other.to(tl.int32), 0)
    if OVERFLOW_DENSE:  # more must-attend blocks than the capacity holds: attend everything (never drop one)
        dense = dense | (n_forced + budget > S)
    total = tl.minimum(tl.minimum(n_forced + budget, S), nblk)

    if HAS_QKEY:
        if mode != MODE_PRIOR:
            # first stage: forced (+ the prior share for hybrid) by the prior key
            n_first = _first_count(PRIOR, b, mode, budget, nblk, n_forced, n_other, total)
            thr, ties = _threshold(ws, MB, n_first, CH, ONE)
            best = _qkey_best(PMAX, b, h, s_pm_b, s_pm_h, s_pm_s, NS, NS_PAD, G, G_PAD)
            seen_eq = tl.zeros([], dtype=tl.int32)
            for c in range(0, MB, CH):
                j = c + tl.arange(0, CH)
                inb = j < MB
                first, n_eq = _in_top(ws, j, MB, thr, ties, seen_eq, n_first)
                qk = _qkey_load(BND, best, b, h, j, inb & (j < nblk), s_bd_b, s_bd_h, s_bd_g, G, G_PAD)
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
    _finish(ids, COUNTS, KCOUNTS, DENSE, r, h, written, dense, nblk, total, MB, S, stride_id_s, stride_cn_b, CH)


@triton.jit
def _ukey(x):
    """float32 -> uint32 with the same order."""
    return (_sortable(x) ^ -2147483648).to(tl.uint32, bitcast=True)  # signed order -> unsigned order


@triton.jit
def _threshold_reg(u, valid, total):
    """(t, ties) of register-resident keys: a radix-4 search, each step counting the 4 candidate digits in one
    reduction; then how many keys == t complete the top ``total``. It stops early once the keys >= the prefix
    found so far are exactly ``total`` (they are then the top ``total``: the same set as the full 16 steps give;
    with distinct keys that is after ~log4(n) + a few steps). (Radix 16, 8 steps of [CH, 16] counts, measured 5x
    slower at 8192 blocks on the H100: results/h100/select-probe-session8.log.)"""
    prefix = tl.zeros([], dtype=tl.uint32)
    digits = tl.arange(0, 4).to(tl.uint32)
    step = tl.zeros([], dtype=tl.int32)
    exact = total < 0
    while (step < 16) & (exact == 0):  # a loop, not unrolled: unrolled, the 8192-block variant builds for minutes
        shift = (30 - 2 * step).to(tl.uint32)
        cand = prefix | (digits << shift)
        cnt = tl.sum(((u[:, None] >= cand[None, :]) & valid[:, None]).to(tl.int32), 0)
        best = tl.max(tl.where(cnt >= total, digits, 0), 0)
        prefix = prefix | (best << shift)
        exact = tl.sum(tl.where(digits == best, cnt, 0), 0) == total
        step += 1
    n_gt = tl.sum(((u > prefix) & valid).to(tl.int32), 0)
    return prefix, total - n_gt


@triton.jit
def _top_reg(u, valid, thr, ties, n):
    """The top n of register-resident keys (> thr, then the first ``ties`` == thr in index order)."""
    eq = (u == thr) & valid
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - 1
    return (((u > thr) & valid) | (eq & (eq_rank < ties))) & (n > 0)


@triton.jit
def _select_row_reg(SCORES, TAGS, BT, PRIOR, BND, PMAX, IDS, COUNTS, KCOUNTS, DENSE, b, h, r, nblk, budget,
                    sink, window, mode, rtag, stride_sc_b, stride_sc_h, stride_bt_b, stride_bt_n,
                    s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h, s_pm_s, NS,
                    stride_id_b, stride_id_h, stride_id_s, stride_cn_b, MB, S, CH: tl.constexpr,
                    HAS_QKEY: tl.constexpr, OVERFLOW_DENSE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                    NS_PAD: tl.constexpr):
    """:func:`_select_row` for a block table of at most CH blocks: every key stays in registers."""
    dense = (budget == 0) | (nblk <= sink + window + budget)
    j = tl.arange(0, CH)
    in_ctx = j < nblk
    valid = j < MB
    phys = tl.load(BT + b * stride_bt_b + j * stride_bt_n, mask=in_ctx & valid, other=0).to(tl.int64)
    sc = tl.load(SCORES + phys * stride_sc_b + h * stride_sc_h, mask=in_ctx & valid, other=0.0)
    tg = tl.load(TAGS + phys, mask=in_ctx & valid, other=0)
    key, forced, other = _block_key(sc, tg, j, in_ctx, nblk, sink, window, rtag, mode, HAS_QKEY)
    u = _ukey(key)
    n_forced = tl.sum(forced.to(tl.int32), 0)
    n_other = tl.sum(other.to(tl.int32), 0)
    if OVERFLOW_DENSE:
        dense = dense | (n_forced + budget > S)
    total = tl.minimum(tl.minimum(n_forced + budget, S), nblk)
    if HAS_QKEY:
        if mode != MODE_PRIOR:
            n_first = _first_count(PRIOR, b, mode, budget, nblk, n_forced, n_other, total)
            thr, ties = _threshold_reg(u, valid, n_first)
            first = _top_reg(u, valid, thr, ties, n_first)
            best = _qkey_best(PMAX, b, h, s_pm_b, s_pm_h, s_pm_s, NS, NS_PAD, G, G_PAD)
            qk = _qkey_load(BND, best, b, h, j, in_ctx & valid, s_bd_b, s_bd_h, s_bd_g, G, G_PAD)
            u = _ukey(tl.where(in_ctx, tl.where(first, FORCED, qk), float("-inf")))
    thr, ties = _threshold_reg(u, valid, total)
    take = _top_reg(u, valid, thr, ties, total)
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    written = tl.sum(take.to(tl.int32), 0)
    if dense:
        take = in_ctx & (j < S)
        pos = j
        written = tl.minimum(nblk, S).to(tl.int32)
    ids = IDS + r * stride_id_b + h * stride_id_h
    tl.store(ids + pos * stride_id_s, j.to(tl.int32), mask=take & (pos < S))
    _finish(ids, COUNTS, KCOUNTS, DENSE, r, h, written, dense, nblk, total, MB, S, stride_id_s, stride_cn_b, CH)


def select_blocks_triton(scores, tags, block_table, seq_lens, budget_blocks, sink_blocks, window_blocks, mode,
                         prior_blocks, req_tags, max_selected, block_size, qbounds=None, cache=None, rows=None,
                         cols=None, overflow_dense=False, stats=None, every=1, ctags=None, clocks=None,
                         pending=None, due_only=False):
    """Launch wrapper; returns (ids [B,H,S] int32, counts [B,H] int32, kcounts [B,H] int32, dense [B] int8).

    With ``cache`` (a :class:`~prescore.kernels.selection.SelectionCache`) and ``rows [B]`` int32 (each batch
    row's persistent cache row, e.g. its request slot), results live in the cache's buffers at ``rows`` and a
    prior-mode row whose block count, tag and controls are unchanged since its last call is not recomputed;
    the returned tensors are then the cache buffers (index them with ``rows``).

    ``cols [B]`` (per-row scoring method): ``scores`` is ``[NB, M, H]`` and ``tags`` ``[M, NB]`` and row b reads
    column ``cols[b]``. ``overflow_dense``: a row whose forced blocks + budget exceed ``max_selected`` is
    returned dense (count -1) instead of dropping must-attend blocks.

    ``qbounds = (bnd, pmax)``: :func:`quest_bounds_triton`'s output (query-aware rows). ``every`` (with a cache):
    a query-aware row re-selects only when its clock (``clocks [B]``, default its length) is a multiple of
    ``every`` (see ``_reuse``).

    ``stats = (sparse [B], labels [B], acc [L, 4] float64)``: also add each sparse row's (selected tokens,
    context tokens, selected blocks, context blocks), averaged over KV heads, into ``acc[labels[b]]`` (a head
    the selection turned dense adds nothing; the tail block's unfilled slots are not tokens).

    ``reselect_async`` (with a cache): ``pending`` (a second SelectionCache of the same shape) makes this the main
    launch, which first adopts each row's fresh pending selection; ``due_only`` makes it the side launch, which
    selects afresh only the due query-aware rows, into ``cache`` (the pending one), marked fresh."""
    import torch

    # per-row controls are indexed by row without strides (contiguous() is free when they already are)
    clocks = seq_lens if clocks is None else clocks
    seq_lens, budget_blocks, sink_blocks, window_blocks, mode, prior_blocks, req_tags, clocks = (
        t.contiguous() for t in (seq_lens, budget_blocks, sink_blocks, window_blocks, mode, prior_blocks, req_tags,
                                 clocks))
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
    has_q = qbounds is not None
    if has_q:
        bnd, pmax = qbounds
        G, NS = bnd.shape[2], pmax.shape[2]
    else:
        bnd, pmax = scores.new_empty(1, 1, 1, 1), scores.new_empty(1, 1, 1, 1)
        G, NS = 1, 1
    if cache is None:
        every = 1
    ctags = req_tags if ctags is None else ctags.contiguous()  # the cache's key per row (one per admission)
    CH = min(CH_MAX, max(64, triton.next_power_of_2(MB)))
    reg = MB <= CH  # keys in registers (tables up to CH_MAX blocks); wider tables stream a workspace
    # the streaming path's key workspace (the register path keeps its keys in registers)
    ws = ids if reg else torch.empty(B, H, MB, dtype=torch.int32, device=dev)
    if stats is not None:
        sparse, labels, acc = stats
        sparse, labels = sparse.contiguous(), labels.contiguous()
    else:
        sparse = labels = seq_lens
        acc = torch.empty(1, 4, dtype=torch.float64, device=dev)
    if pending is not None:
        if pending.ids.shape != ids.shape:
            raise ValueError("the pending selection cache must have the cache's shape")
        pids, pcounts, pkc, pkey = pending.ids, pending.counts, pending.kcounts, pending.key
    else:
        pids, pcounts, pkc, pkey = ids, counts, kcounts, ckey
    _select_kernel[(B, H)](
        scores, tags, block_table, seq_lens, clocks, budget_blocks, sink_blocks, window_blocks, mode, prior_blocks,
        req_tags, ctags, bnd, pmax, ws, ids, counts, kcounts, dense, rows, ckey, cols, sparse, labels, acc,
        pids, pcounts, pkc, pkey,
        scores.stride(0), scores.stride(-1), s_sc_m, s_tg_m, block_table.stride(0), block_table.stride(1),
        bnd.stride(0), bnd.stride(1), bnd.stride(2), pmax.stride(0), pmax.stride(1), pmax.stride(2), NS,
        ws.stride(0), ws.stride(1),
        ids.stride(0), ids.stride(1), ids.stride(2), counts.stride(0), ckey.stride(0), ckey.stride(1), acc.stride(0),
        MB, S, int(every), H, BS=block_size, CH=CH, ONE=MB <= CH, HAS_QKEY=has_q, USE_CACHE=cache is not None,
        HAS_COL=has_col, OVERFLOW_DENSE=overflow_dense, S_PAD=max(16, triton.next_power_of_2(S)),
        STATS=stats is not None, G=G, G_PAD=max(2, triton.next_power_of_2(G)),
        NS_PAD=max(2, triton.next_power_of_2(NS)), REG=reg, ADOPT=pending is not None and cache is not None,
        DUE_ONLY=bool(due_only) and cache is not None, num_warps=8 if CH >= 4096 else 4,
    )
    return ids, counts, kcounts, dense


# ----------------------------------------------------------------------------------------------------------
# Query-aware key, split over the block axis (flash-decoding style: every (row, KV head) spreads its context
# over ceil(MB / QB_CHUNK) programs, so batch 1 fills the GPU and the pass is bandwidth-bound)
# ----------------------------------------------------------------------------------------------------------

QB_CHUNK = 128  # logical blocks per program
QB_TILE = 32  # blocks per tile inside a program


@triton.jit
def _qbound_kernel(Q, KMIN, KMAX, BT, SEQ, CLOCK, MODE, BND, PMAX, ROW, CKEY, KCOUNTS, RTAG, BUDGET, SINK, WINDOW,
                   scale, beta, S, EVERY, NS,
                   s_q_b, s_q_h, s_bt_b, s_bt_n, s_mn_b, s_mn_h, s_mn_d, s_bd_b, s_bd_h, s_bd_g, s_pm_b, s_pm_h,
                   s_pm_s, s_ck_r, s_ck_h, s_cn_b, H: tl.constexpr, USE_CACHE: tl.constexpr, DUE_ONLY: tl.constexpr,
                   HEAD_SIZE: tl.constexpr,
                   D_PAD: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr,
                   TILE: tl.constexpr):
    """Per (row, KV head), program p of the grid's second axis takes chunks p, p + P, ... of CHUNK blocks (P
    programs per row and head: about 8 per SM in all, whatever the batch): each query head's scaled bound on every
    block of a chunk (``BND[b, h, g, j]``) and its chunk maximum (``PMAX[b, h, chunk, g]``, -inf past the
    context). Rows in prior mode (0), and with a cache the rows that keep their selection this step, do nothing
    (the selection reads neither output for them). Summaries are loaded once per tile for the whole GQA group."""
    bh = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    b = bh // H
    h = bh % H
    mode = tl.load(MODE + b)
    live = mode != MODE_PRIOR
    seq = tl.load(SEQ + b).to(tl.int32)
    nblk = (seq + BS - 1) // BS
    if DUE_ONLY:  # reselect_async's side launch: only the query-aware rows whose clock is due
        live = live & ((tl.load(CLOCK + b) % EVERY) == 0)
    elif USE_CACHE:  # rows that keep their cached selection this step (the selection kernel decides the same)
        packed = _packed(nblk, tl.load(BUDGET + b).to(tl.int32), tl.load(SINK + b).to(tl.int32),
                         tl.load(WINDOW + b).to(tl.int32))
        live = live & (_reuse(CKEY, KCOUNTS, tl.load(ROW + b), h, tl.load(RTAG + b).to(tl.int64), packed, nblk,
                              tl.load(CLOCK + b), mode, S, EVERY, s_ck_r, s_ck_h, s_cn_b) == 0)
    if live:
        offs_g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        dm = d < HEAD_SIZE
        hi = 0.5 + 0.5 * beta
        lo = 0.5 - 0.5 * beta
        for s in range(p, NS, P):
            start = s * CHUNK
            best = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
            for c in range(start, tl.minimum(start + CHUNK, nblk), TILE):
                j = c + tl.arange(0, TILE)
                jm = j < nblk
                phys = tl.load(BT + b * s_bt_b + j * s_bt_n, mask=jm, other=0).to(tl.int64)
                base = phys[:, None] * s_mn_b + h * s_mn_h + d[None, :] * s_mn_d
                mn = tl.load(KMIN + base, mask=jm[:, None] & dm[None, :], other=0.0).to(tl.float32)
                mx = tl.load(KMAX + base, mask=jm[:, None] & dm[None, :], other=0.0).to(tl.float32)
                kmin = mn * hi + mx * lo
                kmax = mx * hi + mn * lo
                for g in tl.static_range(G):
                    qv = tl.load(Q + b * s_q_b + (h * G + g) * s_q_h + d, mask=dm, other=0.0).to(tl.float32)
                    bg = tl.sum(tl.maximum(qv[None, :] * kmin, qv[None, :] * kmax), 1) * scale
                    tl.store(BND + b * s_bd_b + h * s_bd_h + g * s_bd_g + j, bg, mask=jm)
                    mg = tl.max(tl.where(jm, bg, float("-inf")), 0)
                    best = tl.where(offs_g == g, tl.maximum(best, mg), best)
            tl.store(PMAX + b * s_pm_b + h * s_pm_h + s * s_pm_s + offs_g, best, mask=offs_g < G)


@triton.jit
def _qkey_best(PMAX, b, h, s_pm_b, s_pm_h, s_pm_s, NS, NS_PAD: tl.constexpr, G: tl.constexpr,
               G_PAD: tl.constexpr):
    """[G_PAD] each query head's best bound over the row's context (the max of its chunk maxima; 0 past G)."""
    ss = tl.arange(0, NS_PAD)
    gg = tl.arange(0, G_PAD)
    pm = tl.load(PMAX + b * s_pm_b + h * s_pm_h + ss[:, None] * s_pm_s + gg[None, :],
                 mask=(ss[:, None] < NS) & (gg[None, :] < G), other=float("-inf"))
    best = tl.max(pm, 0)
    return tl.where(gg < G, best, 0.0)


@triton.jit
def _qkey_load(BND, best, b, h, j, jm, s_bd_b, s_bd_h, s_bd_g, G: tl.constexpr, G_PAD: tl.constexpr):
    """The group's query-aware key of blocks j: log-sum-exp over its query heads of (bound - head's best)."""
    gg = tl.arange(0, G_PAD)
    m = tl.full(j.shape, float("-inf"), dtype=tl.float32)
    acc = tl.zeros(j.shape, dtype=tl.float32)
    for g in tl.static_range(G):
        bg = tl.load(BND + b * s_bd_b + h * s_bd_h + g * s_bd_g + j, mask=jm, other=0.0)
        r = bg - tl.sum(tl.where(gg == g, best, 0.0), 0)
        m_new = tl.maximum(m, r)
        acc = acc * tl.exp(m - m_new) + tl.exp(r - m_new)
        m = m_new
    return m + tl.log(acc)


def quest_bounds_triton(q, kmin, kmax, block_table, seq_lens, mode, block_size: int, beta: float = 1.0,
                        reuse=None, due_only: bool = False):
    """Per-head scaled bounds ``[B, H, G, MB]`` and chunk maxima ``[B, H, NS, G]`` (float32) of the query-aware
    key (see :func:`prescore.kernels.selection.quest_bound`); rows in prior mode (0) are skipped (their outputs
    are not written). The selection
    kernel combines them into the group's key (:func:`quest_key_from_bounds` is the same in torch).

    ``reuse = (cache, rows, ctags, budget, sink, window, max_selected, every[, clocks])`` (``ctags``: the cache
    keys that ``select_blocks_triton`` gets, by default the request tags): also skip the rows that
    ``select_blocks_triton`` with the same arguments will serve from the cache this step. ``due_only`` (with
    ``reuse``): only the query-aware rows whose clock is a multiple of ``every`` (``reselect_async``'s side
    launch)."""
    import torch

    B, MB = block_table.shape
    NB, H, D = kmin.shape
    G = q.shape[1] // H
    NS = triton.cdiv(MB, QB_CHUNK)
    bnd = torch.empty(B, H, G, MB, dtype=torch.float32, device=q.device)
    pmax = torch.empty(B, H, NS, G, dtype=torch.float32, device=q.device)
    if B == 0:
        return bnd, pmax
    seq_lens, mode = seq_lens.contiguous(), mode.contiguous()
    if reuse is not None:
        cache, rows, rtag, budget, sink, window, S, every = reuse[:8]
        clocks = reuse[8] if len(reuse) > 8 and reuse[8] is not None else seq_lens
        rows, rtag, budget, sink, window, clocks = (t.contiguous() for t in (rows, rtag, budget, sink, window, clocks))
        ckey, kc = cache.key, cache.kcounts
    else:
        rows = rtag = budget = sink = window = clocks = seq_lens
        ckey, kc, S, every = pmax, seq_lens.view(1, -1), 1, 1
    # programs per (row, KV head): about 8 per SM over the whole grid, at most one per chunk (a full grid of
    # B x H x NS programs cost every step, re-selecting or not, ~B x H x 64 launches at 131k tables)
    per = max(1, min(NS, triton.cdiv(8 * _num_sms(q.device), B * H)))
    _qbound_kernel[(B * H, per)](
        q, kmin, kmax, block_table, seq_lens, clocks, mode, bnd, pmax, rows, ckey, kc, rtag, budget, sink, window,
        1.0 / math.sqrt(D), float(beta), int(S), int(every), NS,
        q.stride(0), q.stride(1), block_table.stride(0), block_table.stride(1), kmin.stride(0), kmin.stride(1),
        kmin.stride(2), bnd.stride(0), bnd.stride(1), bnd.stride(2), pmax.stride(0), pmax.stride(1), pmax.stride(2),
        ckey.stride(0), ckey.stride(1), kc.stride(0), H=H, USE_CACHE=reuse is not None,
        DUE_ONLY=bool(due_only) and reuse is not None, HEAD_SIZE=D, D_PAD=triton.next_power_of_2(D), G=G, G_PAD=max(2, triton.next_power_of_2(G)),
        BS=block_size, CHUNK=QB_CHUNK, TILE=QB_TILE, num_warps=4,
    )
    return bnd, pmax


def quest_key_from_bounds(bnd, pmax, seq_lens, block_size: int):
    """torch: the group key ``[B, H, MB]`` from :func:`quest_bounds_triton`'s output (checks and tests)."""
    import torch

    best = pmax.amax(2)  # [B, H, G]
    key = torch.logsumexp(bnd - best[..., None], dim=2)
    nblk = (seq_lens.long() + block_size - 1) // block_size
    j = torch.arange(bnd.shape[-1], device=bnd.device)
    return torch.where(j[None, None, :] < nblk[:, None, None], key, float("-inf"))
