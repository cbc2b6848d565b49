"""Budgeted block selection against the pure-python reference, then end to end with the sparse decode kernel."""

import pytest
import torch
import triton
import triton.language as tl

from kernel_utils import MODE_NAMES, QUERY_MODES, make_paged, rel_err
from prescore.kernels import (MODES, BlockSummaries, get_method, score_prefill, select_blocks, select_blocks_ref,
                              sparse_decode, sparse_decode_ref)
from prescore.kernels.select_triton import _threshold_reg, _top_reg, _ukey


def build(seq_lens, H=2, D=32, BS=16, G=3, seed=0, stale=(), other=()):
    """``stale`` (row, block): never scored (tag < 0); ``other``: scored by another request (its tag, >= 0)."""
    gen = torch.Generator().manual_seed(seed)
    kv, bt, seq = make_paged(seq_lens, H, D, BS, torch.float32, gen=gen)
    summ = BlockSummaries.allocate(kv.shape[0], H, D, torch.float32, "cpu")
    summ.scores.copy_(torch.rand(summ.scores.shape, generator=gen))  # distinct random priors
    tags = torch.arange(len(seq_lens)) + 100
    for b, L in enumerate(seq_lens):
        nblk = -(-L // BS)
        phys = bt[b, :nblk].long()
        k = kv[phys, :, :, :D]  # [n, H, BS, D]
        summ.kmin[phys] = k.amin(2)
        summ.kmax[phys] = k.amax(2)
        summ.tags[phys] = tags[b]
    for b, j in stale:
        summ.tags[bt[b, j].long()] = -5
    for b, j in other:
        summ.tags[bt[b, j].long()] = tags[b] + 1000
    q = torch.randn(len(seq_lens), H * G, D, generator=gen)
    return kv, bt, seq, summ, tags, q


IMPLS = pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])


def run(summ, bt, seq, tags, q, budgets, sinks, windows, modes, priors, BS=16, cap=64, triton=False, beta=1.0):
    t = lambda x: torch.tensor(x)
    return select_blocks(summ, bt, seq, t(budgets), t(sinks), t(windows), t([MODES[m] for m in modes]), t(priors),
                         tags, cap, q=q, block_size=BS, use_triton=triton, quest_beta=beta)


def check_against_ref(summ, bt, seq, tags, q, budgets, sinks, windows, modes, priors, BS=16, triton=False, beta=1.0):
    sel = run(summ, bt, seq, tags, q, budgets, sinks, windows, modes, priors, BS, triton=triton, beta=beta)
    assert sel.ids.shape[2] == 64
    for b, L in enumerate(seq.tolist()):
        nblk = -(-L // BS)
        phys = bt[b, :nblk].long()
        ref = select_blocks_ref(summ.scores[phys], summ.kmin[phys], summ.kmax[phys], summ.tags[phys] == tags[b], L,
                                BS, budgets[b], sinks[b], windows[b], modes[b], priors[b], q[b], beta,
                                scored=summ.tags[phys] >= 0)
        if ref is None:
            assert sel.dense[b]
            assert (sel.counts[b] == nblk).all()
            continue
        assert not sel.dense[b]
        for h in range(summ.scores.shape[1]):
            n = int(sel.counts[b, h])
            got = sel.ids[b, h, :n].tolist()
            assert got == sorted(got)
            assert got == ref[h], (b, h, modes[b])
    return sel


@IMPLS
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_modes_match_reference(mode, triton):
    kv, bt, seq, summ, tags, q = build([400, 257, 90, 33], seed=1, stale=[(0, 5), (1, 7)])
    check_against_ref(summ, bt, seq, tags, q, budgets=[4, 3, 2, 8], sinks=[1, 2, 0, 1], windows=[2, 1, 1, 1],
                      modes=[mode] * 4, priors=[2, 1, 1, 4], triton=triton)


@IMPLS
@pytest.mark.parametrize("beta", [0.5, 0.0])
@pytest.mark.parametrize("mode", QUERY_MODES)
def test_quest_beta_matches_reference(mode, beta, triton):
    kv, bt, seq, summ, tags, q = build([400, 257, 90, 33], seed=4, stale=[(0, 5)])
    check_against_ref(summ, bt, seq, tags, q, budgets=[4, 3, 2, 8], sinks=[1, 2, 0, 1], windows=[2, 1, 1, 1],
                      modes=[mode] * 4, priors=[2, 1, 1, 4], triton=triton, beta=beta)


@IMPLS
def test_mixed_batch_budget_over_context_and_dense(triton):
    kv, bt, seq, summ, tags, q = build([1000, 17, 300, 500, 64], seed=2)
    sel = check_against_ref(summ, bt, seq, tags, q, budgets=[5, 2, 0, 100, 3], sinks=[1, 1, 1, 0, 1],
                            windows=[1, 1, 1, 2, 2], modes=["hybrid", "prior", "quest", "prior", "quest"],
                            priors=[3, 1, 0, 0, 0], triton=triton)
    assert sel.dense.tolist() == [False, True, True, True, True]
    assert sel.kernel_counts()[1:].lt(0).all() and sel.kernel_counts()[0].gt(0).all()


@IMPLS
def test_stale_blocks_are_must_attend(triton):
    kv, bt, seq, summ, tags, q = build([320], seed=3, stale=[(0, 4), (0, 9), (0, 13)])
    summ.scores[bt[0, [4, 9, 13]].long()] = -1e30  # a stale score must not matter
    sel = run(summ, bt, seq, tags, q, [2], [1], [1], ["prior"], [0], triton=triton)
    got = set(sel.ids[0, 0, : int(sel.counts[0, 0])].tolist())
    assert {0, 4, 9, 13, 19} <= got and len(got) == 5 + 2


@IMPLS
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_blocks_scored_by_another_request(mode, triton):
    """Prefix caching: blocks another request scored (its tag, >= 0) keep content-only key min/max, so a
    query-aware row ranks them on its query-aware key (not forced, not in hybrid's prior share); a prior row
    attends them (their pre-score is the other request's fit); never-scored blocks (tag < 0) are forced in every
    mode. Row 1 has fewer own blocks than its prior share: the rest of its budget goes to the query-aware key."""
    other = [(0, j) for j in (3, 6, 9, 12, 15)] + [(1, j) for j in range(1, 16)] + [(2, 1)]
    kv, bt, seq, summ, tags, q = build([400, 320, 257], seed=6, stale=[(0, 20)], other=other)
    sel = check_against_ref(summ, bt, seq, tags, q, budgets=[5, 6, 4], sinks=[1, 1, 1], windows=[2, 2, 1],
                            modes=[mode] * 3, priors=[3, 4, 2], triton=triton)
    for b, L in enumerate([400, 320, 257]):
        nblk = -(-L // 16)
        mine = {j for j in range(nblk) if (b, j) not in other}
        for h in range(2):
            got = set(sel.ids[b, h, : int(sel.counts[b, h])].tolist())
            theirs = got - mine
            if mode == "prior":
                assert {j for bb, j in other if bb == b} <= got  # must-attend
            else:
                assert len(got) == 1 + 2 - (b == 2) + [5, 6, 4][b] + (b == 0)  # nothing forced but sink/window/stale
                if mode == "quest" and b == 1:
                    assert theirs  # they compete (and win) on the query-aware key
    # row 1: 20 blocks, 15 of them another request's, 2 own outside sink + window: the hybrid prior share (4) takes
    # both own blocks, the query-aware stage the other 4 of the budget from the 15


@IMPLS
def test_freed_block_reused_by_new_request_is_not_trusted(triton):
    gen = torch.Generator().manual_seed(4)
    kv, bt, seq = make_paged([256], 2, 32, 16, torch.float32, gen=gen)
    summ = BlockSummaries.allocate(kv.shape[0], 2, 32, torch.float32, "cpu")
    score_prefill(kv, summ, bt[0], 0, 256, get_method("keynorm"), tag=1, final=True)
    # request 2 gets the same physical blocks but only prefilled (scored) the first 128 tokens so far
    score_prefill(kv, summ, bt[0], 0, 128, get_method("keynorm"), tag=2, final=True)
    t = lambda x: torch.tensor(x)
    sel = select_blocks(summ, bt, t([256]).int(), t([1]), t([1]), t([1]), t([0]), t([0]), t([2]), 32, block_size=16,
                        use_triton=triton)
    got = sel.ids[0, 0, : int(sel.counts[0, 0])].tolist()
    assert set(range(8, 16)) <= set(got)  # blocks 8..15 still carry request 1's tags -> attended


@IMPLS
def test_selection_then_sparse_decode_end_to_end(triton):
    kv, bt, seq, summ, tags, q = build([700, 45, 333], H=2, D=64, G=4, seed=5)
    kv = kv.to(torch.bfloat16)
    q = q.to(torch.bfloat16)
    sel = run(summ, bt, seq, tags, q, [6, 4, 3], [1, 1, 1], [2, 2, 2], ["hybrid", "prior", "quest"], [3, 0, 0],
              triton=triton)
    out = sparse_decode(q, kv, bt, seq, sel.ids, sel.kernel_counts(), num_splits=3)
    ref = sparse_decode_ref(q, kv, bt, seq, sel.ids, sel.kernel_counts())
    assert rel_err(out, ref) < 1.5e-2
    dense_ref = sparse_decode_ref(q, kv, bt, seq)
    assert rel_err(out[1], dense_ref[1]) < 1.5e-2  # row 1 fits in its budget: dense
    assert rel_err(out[0], dense_ref[0]) > 1e-2  # row 0 is really sparse


@pytest.mark.parametrize("seed", range(3))
def test_triton_equals_torch_on_random_batches(seed):
    """Fresh random batches (distinct priors): both implementations select exactly the same blocks."""
    gen = torch.Generator().manual_seed(100 + seed)
    lens = torch.randint(1, 900, (6,), generator=gen).tolist()
    kv, bt, seq, summ, tags, q = build(lens, seed=seed, stale=[(0, 0)],
                                       other=[(b, j) for b in range(6) for j in (1, 4, 5) if j * 16 < lens[b]])
    B = len(lens)
    r = lambda lo, hi: torch.randint(lo, hi, (B,), generator=gen)
    args = (summ, bt, seq, r(0, 12), r(0, 3), r(0, 4), r(0, 3), r(0, 6), tags, 20)
    a = select_blocks(*args, q=q, block_size=16, use_triton=False)
    b = select_blocks(*args, q=q, block_size=16, use_triton=True)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts) and torch.equal(a.dense, b.dense)


def test_triton_streaming_path_for_long_rows(monkeypatch):
    """Rows longer than the in-register capacity stream the workspace: same result."""
    import prescore.kernels.select_triton as st

    monkeypatch.setattr(st, "CH_MAX", 64)
    kv, bt, seq, summ, tags, q = build([3000, 1500, 200], seed=7, stale=[(1, 3)], other=[(0, j) for j in range(5, 30)]
                                       + [(1, 9), (2, 4)])
    t = torch.tensor
    for mode in ("prior", "hybrid", "quest"):
        args = (summ, bt, seq, t([20, 9, 3]), t([1, 2, 1]), t([2, 2, 1]), t([MODES[mode]] * 3), t([5, 4, 1]), tags, 40)
        a = select_blocks(*args, q=q, block_size=16, use_triton=False)
        b = select_blocks(*args, q=q, block_size=16, use_triton=True)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts)


@pytest.mark.parametrize("sms", [1, 64])
def test_bound_programs_take_several_chunks(monkeypatch, sms):
    """The bound kernel's programs each take every P-th chunk of a row (P from the SM count): with 4-block chunks
    and 1 or 64 SMs (P = 1..NS), query-aware selections equal the torch reference."""
    import prescore.kernels.select_triton as st

    monkeypatch.setattr(st, "QB_CHUNK", 4)
    monkeypatch.setattr(st, "QB_TILE", 4)
    monkeypatch.setattr(st, "_num_sms", lambda device: sms)
    kv, bt, seq, summ, tags, q = build([700, 1203, 90, 16 * 13], seed=5, other=[(1, 7), (0, 2)])
    t = torch.tensor
    n = 4
    for mode in ("hybrid", "quest"):
        args = (summ, bt, seq, t([6, 9, 2, 4]), t([1] * n), t([2] * n), t([MODES[mode], MODES[mode], MODES["prior"],
                MODES[mode]]), t([2] * n), tags, 20)
        a = select_blocks(*args, q=q, block_size=16, use_triton=False)
        b = select_blocks(*args, q=q, block_size=16, use_triton=True)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts) and torch.equal(a.dense, b.dense)


def test_triton_register_tiers_in_a_wide_table(monkeypatch):
    """Rows of a wide block table search the smallest register tier that holds them (CH_LO, CH_MID, CH): same
    result as the torch reference on each side of every tier edge (tiers shrunk to 8 / 16 / 32 blocks)."""
    import triton.language as tl

    import prescore.kernels.select_triton as st

    monkeypatch.setattr(st, "CH_LO", tl.constexpr(8))
    monkeypatch.setattr(st, "CH_MID", tl.constexpr(16))
    monkeypatch.setattr(st, "CH_MAX", 32)
    lens = [16 * 8, 16 * 8 + 1, 16 * 16, 16 * 16 + 5, 16 * 30 + 3, 40]  # blocks 8 | 9, 16 | 17, 31, 3
    kv, bt, seq, summ, tags, q = build(lens, seed=11, stale=[(3, 2)], other=[(4, 6), (1, 3)])
    assert 16 < bt.shape[1] <= 32
    t = torch.tensor
    n = len(lens)
    for mode in ("prior", "hybrid", "quest"):
        args = (summ, bt, seq, t([4, 3, 5, 6, 9, 2]), t([1] * n), t([2] * n), t([MODES[mode]] * n), t([2] * n),
                tags, 20)
        a = select_blocks(*args, q=q, block_size=16, use_triton=False)
        b = select_blocks(*args, q=q, block_size=16, use_triton=True)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts) and torch.equal(a.dense, b.dense)


def test_selection_cache_is_exact_across_decode_steps():
    """Cached prior rows are reused only while their block count is unchanged; results always equal a fresh
    selection, step after step (a block fills, a row is re-slotted to a new request, modes mix)."""
    from prescore.kernels import SelectionCache

    kv, bt, seq, summ, tags, q = build([300, 500, 170], seed=11)
    t = torch.tensor
    cache = SelectionCache.allocate(8, 2, 30, "cpu")
    rows = t([5, 0, 3], dtype=torch.int32)
    modes = t([MODES["prior"], MODES["hybrid"], MODES["prior"]])
    for step in range(20):
        s = seq + step
        if step == 12:  # slot 3 gets a new request: new tag, different scores
            tags = tags.clone()
            tags[2] = 555
            summ.tags[bt[2].long()] = 555
            summ.scores[bt[2].long()] = torch.rand(bt.shape[1], 2)
        args = (summ, bt, s, t([6, 5, 3]), t([1, 1, 1]), t([2, 2, 2]), modes, t([2, 2, 0]), tags, 30)
        fresh = select_blocks(*args, q=q, block_size=16, use_triton=True)
        sel = select_blocks(*args, q=q, block_size=16, use_triton=True, cache=cache, rows=rows)
        cached = sel.per_row()
        assert torch.equal(fresh.ids, cached.ids) and torch.equal(fresh.counts, cached.counts)
        assert torch.equal(fresh.kernel_counts(), cached.kernel_counts())
        if step in (3, 15):  # the decode kernel reads the per-slot buffers in place
            kvb, qb = kv.to(torch.bfloat16), torch.randn(3, 6, 32).to(torch.bfloat16)
            a = sparse_decode(qb, kvb, bt, s, sel.ids, sel.kernel_counts(), sel_rows=sel.rows)
            b = sparse_decode(qb, kvb, bt, s, fresh.ids, fresh.kernel_counts())
            assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_incremental_selection_equals_full_every_step(seed):
    """Decode rows reach block boundaries at different steps; a cached prior-mode selection that gained one
    block is updated in place (the block leaving the window against the weakest chosen block). Step after step
    it equals a fresh full selection: blocks scored as they fill, tied scores, sinks 0..2, windows 2..4, a
    quest row beside them, rows that turn from dense to sparse."""
    from prescore.kernels import SelectionCache

    BS, H = 16, 2
    lens = [300, 517, 170, 401, 60]
    kv, bt, _, summ, tags, q = build([L + 48 for L in lens], H=H, seed=seed)  # room to grow, own blocks
    seq = torch.tensor(lens, dtype=torch.int32)
    for b, L in enumerate(lens):  # blocks past the prompt: not scored yet
        summ.tags[bt[b, -(-L // BS):].long()] = -5
    gen = torch.Generator().manual_seed(seed + 7)
    summ.scores.copy_(torch.randint(0, 5, summ.scores.shape, generator=gen).float() / 5)  # many ties
    t = torch.tensor
    cache = SelectionCache.allocate(8, H, 30, "cpu")
    rows = t([5, 0, 3, 1, 2], dtype=torch.int32)
    modes = t([0, 0, 0, 1, 0])
    budgets, sinks, windows = t([6, 5, 3, 4, 3]), t([1, 0, 2, 1, 1]), t([2, 3, 2, 4, 2])
    for step in range(40):
        s = seq + step
        for b in range(len(s)):  # the tail kernel scores a block when the token that fills it is written
            if int(s[b]) % BS == 0:
                phys = bt[b, int(s[b]) // BS - 1].long()
                summ.tags[phys] = tags[b]
                summ.scores[phys] = torch.randint(0, 5, (H,), generator=gen).float() / 5
        args = (summ, bt, s, budgets, sinks, windows, modes, t([0] * 5), tags, 30)
        fresh = select_blocks(*args, q=q, block_size=BS, use_triton=True)
        cached = select_blocks(*args, q=q, block_size=BS, use_triton=True, cache=cache, rows=rows).per_row()
        assert torch.equal(fresh.counts, cached.counts) and torch.equal(fresh.kernel_counts(), cached.kernel_counts())
        for b in range(len(s)):
            for h in range(H):
                n = int(fresh.counts[b, h])
                assert fresh.ids[b, h, :n].tolist() == cached.ids[b, h, :n].tolist(), (step, b, h)


def test_incremental_selection_is_taken():
    """The in-place update really runs: it assumes candidate scores outside the window do not change between
    steps (true in decode: only the block that just filled, inside the window, is scored), so a score changed
    behind its back is not seen by it -- but is by a full selection."""
    from prescore.kernels import SelectionCache

    BS, H = 16, 2
    kv, bt, seq, summ, tags, q = build([320], H=H, seed=3)  # 20 blocks, all scored
    t = torch.tensor
    cache = SelectionCache.allocate(2, H, 30, "cpu")
    args = lambda s: (summ, bt, s, t([3]), t([1]), t([2]), t([0]), t([0]), tags, 30)  # noqa: E731
    s = t([320], dtype=torch.int32)
    select_blocks(*args(s), q=q, block_size=BS, use_triton=True, cache=cache, rows=t([0], dtype=torch.int32))
    s2 = t([321], dtype=torch.int32)  # block 20 starts: x = 21 - 1 - 2 = 18 leaves the window
    summ.tags[bt[0, 20].long()] = tags[0]
    loser = [j for j in range(1, 18) if j not in cache.ids[0, 0, :int(cache.counts[0, 0])].tolist()][0]
    summ.scores[bt[0, loser].long()] = 10.0  # behind the cache's back
    inc = select_blocks(*args(s2), q=q, block_size=BS, use_triton=True, cache=cache,
                        rows=t([0], dtype=torch.int32)).per_row()
    full = select_blocks(*args(s2), q=q, block_size=BS, use_triton=True)
    assert loser in full.ids[0, 0, :int(full.counts[0, 0])].tolist()
    assert loser not in inc.ids[0, 0, :int(inc.counts[0, 0])].tolist()
    assert int(inc.counts[0, 0]) == int(full.counts[0, 0])


@pytest.mark.parametrize("clocked", [True, False], ids=["step-clock", "length-clock"])
@pytest.mark.parametrize("triton", [True, False])
@pytest.mark.parametrize("every", [1, 4, 5])
def test_query_aware_reuse_schedule(every, triton, clocked):
    """``every`` > 1 (reselect_every): a quest/hybrid row re-selects when its clock is a multiple of ``every``
    (then it equals a fresh selection exactly) and otherwise keeps its cached blocks, plus the block a new
    token opened; prior rows are unaffected; a new request in the slot (new tag) re-selects at once. The clock:
    the step clock the backend's planner fills (the same for every row: rows of different lengths re-select on
    the same steps), or by default the row's length."""
    from prescore.kernels import SelectionCache

    BS, H = 16, 2
    lens = [300, 517, 170, 401]
    kv, bt, _, summ, tags, q = build([L + 64 for L in lens], H=H, seed=5)
    seq = torch.tensor(lens, dtype=torch.int32)
    t = torch.tensor
    cache = SelectionCache.allocate(8, H, 40, "cpu")
    rows = t([5, 0, 3, 1], dtype=torch.int32)
    modes = t([1, 2, 0, 1])
    gen = torch.Generator().manual_seed(9)
    last = None
    ctags = torch.arange(4, dtype=torch.int64) + 1000  # the cache's key per row (one per admission)
    for step in range(36):
        s = seq + step
        qs = torch.randn(q.shape, generator=gen)  # a new query every step
        if step == 20:  # slot 1 gets a new request
            tags = tags.clone()
            tags[3] = 777
            summ.tags[bt[3].long()] = 777
            ctags[3] += 100
        if step == 27:  # slot 5 gets a new request with the same prompt: same content tag, new admission
            ctags[0] += 100
        args = (summ, bt, s, t([6, 5, 3, 4]), t([1, 1, 1, 1]), t([2, 2, 2, 2]), modes, t([0, 2, 0, 0]), tags, 40)
        fresh = select_blocks(*args, q=qs, block_size=BS, use_triton=True)
        clk = torch.full((len(lens),), step + 3, dtype=torch.int64) if clocked else None
        got = select_blocks(*args, q=qs, block_size=BS, use_triton=triton, cache=cache, rows=rows,
                            every=every, ctags=ctags.clone(), clocks=clk).per_row()
        for b in range(len(lens)):
            new_req = (step == 20 and b == 3) or (step == 27 and b == 0)
            tick = step + 3 if clocked else int(s[b])
            if every == 1 or int(modes[b]) == 0 or tick % every == 0 or step == 0 or new_req:
                assert torch.equal(fresh.counts[b], got.counts[b]), (step, b)
                assert torch.equal(fresh.ids[b], got.ids[b]), (step, b)
                continue
            nb = -(-int(s[b]) // BS)
            for h in range(H):
                prev = last.ids[b, h, :int(last.counts[b, h])].tolist()
                now = got.ids[b, h, :int(got.counts[b, h])].tolist()
                assert now == (prev if nb - 1 in prev else prev + [nb - 1]), (step, b, h)
        last = got


@triton.jit
def _top_n(X, OUT, n, total, CH: tl.constexpr):
    """One program over the register path's helpers: OUT[j] = 1 for the top ``total`` of X[:n]."""
    j = tl.arange(0, CH)
    valid = j < n
    u = _ukey(tl.load(X + j, mask=valid, other=float("-inf")))
    thr, ties = _threshold_reg(u, valid, total)
    tl.store(OUT + j, _top_reg(u, valid, thr, ties, total).to(tl.int32), mask=valid)

def test_register_threshold_picks_the_top_n_with_index_order_ties():
    """The register path's radix threshold (which stops as soon as the keys above its prefix are exactly n) +
    _top_reg: the top n keys, ties taken in index order, on random keys, many ties, FORCED keys next to keys
    1e-6 apart, n from 0 to all."""
    g = torch.Generator().manual_seed(0)
    for trial in range(150):
        n = int(torch.randint(1, 200, (1,), generator=g))
        x = [torch.randn(n, generator=g), torch.randint(0, 5, (n,), generator=g).float(),
             torch.where(torch.rand(n, generator=g) < 0.3, torch.tensor(3e38), torch.randn(n, generator=g) * 1e-6)
             ][trial % 3]
        total = int(torch.randint(0, n + 1, (1,), generator=g))
        out = torch.zeros(n, dtype=torch.int32)
        _top_n[(1,)](x, out, n, total, CH=256)
        ref = torch.zeros(n, dtype=torch.int32)
        ref[sorted(range(n), key=lambda i: (-float(x[i]), i))[:total]] = 1
        assert torch.equal(out, ref), (trial, n, total)
