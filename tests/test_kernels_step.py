"""The decode fast path's fused kernels (kernels/step_triton.py) and the selection's per-row method columns /
overflow-to-dense, against the torch references (TRITON_INTERPRET=1 on CPU)."""

import textwrap

import pytest
import torch

from kernel_utils import MATRIX, METHOD_NAMES, make_paged, registered, rel_err, run_compile_check
from prescore.kernels import (METHODS, MODES, BlockSummaries, ScoringMethod, get_method, score_prefill, select_blocks,
                              sparse_decode, sparse_decode_ref)
from prescore.kernels.scoring import Leverage, gather_keys, score_decode_tail
from prescore.kernels.select_triton import quest_bounds_triton, select_blocks_triton
from prescore.kernels.step_triton import score_tail_triton, tail_tiles


class RidgeOne(Leverage):
    """A method registered by a test: leverage with another ridge (another fitted state), the leverage tile."""

    name = "leverage_ridge1"
    ridge: float = 1.0


class AbsMax(ScoringMethod):
    """A method registered by a test without a Triton tile: largest |channel| of the key (stateless)."""

    name = "absmax"

    def score(self, keys, state):
        return keys.float().abs().amax(-1)


EXTRA = {"registry": None, "new-tiled-method": RidgeOne}


def _setup(lens, names, H=2, D=64, BS=16, seed=5, dtype=torch.bfloat16):
    """Paged cache, per-method summaries (columns in registry order, as the backend's store) and each row's
    fitted state after a prefill of all but its last token; ``names[b]`` None = a padding row."""
    cols_all = tuple(METHODS)
    gen = torch.Generator().manual_seed(seed)
    kv, bt, seq = make_paged(lens, H, D, BS, dtype, gen=gen)
    NB, M = kv.shape[0], len(cols_all)
    scores = torch.zeros(NB, M, H)
    kmin = torch.zeros(NB, H, D, dtype=dtype)
    kmax = torch.zeros(NB, H, D, dtype=dtype)
    tags = torch.full((M, NB), -1, dtype=torch.int64)
    S = max(get_method(n).state_size(D) for n in cols_all)
    states = torch.zeros(len(lens) + 3, H, S)
    srows = torch.arange(len(lens)) + 2  # state rows != batch rows
    for b, (L, n) in enumerate(zip(lens, names)):
        if n is None or L == 0:
            continue
        c = cols_all.index(n)
        summ = BlockSummaries(scores[:, c], kmin, kmax, tags[c])
        st = score_prefill(kv, summ, bt[b], 0, L - 1, get_method(n), tag=b, final=True)
        states[srows[b], :, : st.shape[1]] = st
    mids = torch.tensor([get_method(n).method_id if n else -1 for n in names])
    cols = torch.tensor([cols_all.index(n) if n else 0 for n in names])
    return kv, bt, seq, scores, kmin, kmax, tags, states, srows, mids, cols


def _tail_rows(BS):
    """Two rows per registered method (a partial and a full tail block), a padding row in between."""
    lens, names = [], []
    for i, n in enumerate(METHODS):
        lens += [BS + 1 + 7 * i, BS * (2 + i)]
        names += [n, n]
    return lens[:3] + [0] + lens[3:], names[:3] + [None] + names[3:]


@pytest.mark.parametrize("extra", list(EXTRA))
@pytest.mark.parametrize("only_full", [False, True])
def test_tail_kernel_scores_each_rows_own_method(only_full, extra):
    """Every registered method (and one a test registers: it reaches the kernel's dispatch through the
    registry alone) scores its rows' tail blocks with its own tile, as its torch ``score`` does."""
    BS, D = 16, 64
    with registered(EXTRA[extra]) if EXTRA[extra] else _nothing():
        lens, names = _tail_rows(BS)
        kv, bt, seq, scores, kmin, kmax, tags, states, srows, mids, cols = _setup(lens, names, D=D, BS=BS)
        pad = names.index(None)
        bt[pad] = bt[0]  # the padding row's table points at a live block: it must not touch it
        before = (scores.clone(), tags.clone(), kmin.clone())
        rtags = torch.arange(len(lens)) + 100
        score_tail_triton(kv, scores, kmin, kmax, tags, bt, seq, mids, cols, states, srows, rtags,
                          only_full=only_full)
        written = [b for b, L in enumerate(lens) if L and (not only_full or L % BS == 0)]
        touched = {int(bt[b, (lens[b] - 1) // BS]) for b in written}
        others = torch.tensor([i not in touched for i in range(kv.shape[0])])
        assert torch.equal(scores[others], before[0][others]) and torch.equal(tags[:, others], before[1][:, others])
        assert torch.equal(kmin[others], before[2][others])
        M = len(METHODS)
        for b in written:
            L, m = lens[b], get_method(names[b])
            j, c = (L - 1) // BS, int(cols[b])
            keys = gather_keys(kv, bt[b, j:j + 1])[:, : L - j * BS].float()
            ref = m.score(keys, states[srows[b], :, : m.state_size(D)]).amax(-1)
            phys = int(bt[b, j])
            assert rel_err(scores[phys, c], ref) < 1e-4, names[b]
            assert torch.equal(kmax[phys].float(), keys.amax(1)) and torch.equal(kmin[phys].float(), keys.amin(1))
            assert tags[c, phys] == rtags[b]
            rest = [i for i in range(M) if i != c]
            assert (tags[rest, phys] == before[1][rest, phys]).all()
        if EXTRA[extra]:  # the new method's scores are not another method's (its own state and tile)
            b = names.index(EXTRA[extra].name) + 1
            j = (lens[b] - 1) // BS
            keys = gather_keys(kv, bt[b, j:j + 1]).float()
            assert rel_err(keys.norm(dim=-1).amax(-1), scores[int(bt[b, j]), int(cols[b])]) > 1e-2


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_tail_kernel_compiles_for_cuda_with_every_registered_tile():
    """The tail kernel's constexpr dispatch over the registry, a newly registered method included, builds for
    an H100 (sm_90): Triton's NVIDIA compiler on this machine, no GPU (a process without the interpreter)."""
    code = textwrap.dedent("""
        from kernel_utils import compile_for_cuda, registered
        from prescore.kernels import METHODS
        from prescore.kernels.step_triton import _tail_kernel, tail_tiles
        from test_kernels_step import RidgeOne

        D = 128
        ptrs = {"KV": "*bf16", "BT": "*i32", "SEQ": "*i32", "MID": "*i64", "COL": "*i64", "STATES": "*fp32",
                "SROW": "*i64", "RTAG": "*i64", "SCORES": "*fp32", "KMIN": "*bf16", "KMAX": "*bf16", "TAGS": "*i64"}
        with registered(RidgeOne):
            tiles, sizes = tail_tiles(D)
            assert len(tiles) == len(METHODS) and tiles[RidgeOne.method_id] == int(RidgeOne.tile)
            try:
                out = compile_for_cuda(_tail_kernel, ptrs, dict(HEAD_SIZE=D, D_PAD=D, BS=16, DC=32, KM_PAD=32,
                                                               ONLY_FULL=True, TILES=tiles, STATES_S=sizes))
            except ImportError as e:
                raise SystemExit(f"SKIP {e}")
        assert out.asm["cubin"]
        print("compiled", tiles)
    """)
    run_compile_check(code)


def test_method_without_tile_is_refused_on_cuda_and_scored_by_torch():
    """A registered method without a Triton tile: the CUDA engine's start check (``tail_tiles``, called by
    the CUDA builder) and the tail launch refuse it by name, never scoring it as another method; the torch
    paths (CPU backend) score it with its own ``score``."""
    BS, H, D = 16, 2, 32
    with registered(AbsMax):
        with pytest.raises(ValueError, match="absmax.*no Triton tail tile"):
            tail_tiles(D)
        gen = torch.Generator().manual_seed(8)
        kv, bt, seq = make_paged([70, 40], H, D, BS, torch.float32, gen=gen)
        summ = BlockSummaries.allocate(kv.shape[0], H, D, torch.float32, "cpu")
        m = get_method("absmax")
        for b, L in enumerate(seq.tolist()):
            score_prefill(kv, summ, bt[b], 0, L - 1, m, tag=b, final=True)
        states = torch.zeros(2, H, 0)
        mids = torch.full((2,), m.method_id)
        with pytest.raises(ValueError, match="absmax"):
            score_tail_triton(kv, summ.scores[:, None], summ.kmin, summ.kmax, summ.tags[None], bt, seq, mids,
                              torch.zeros(2, dtype=torch.long), states, torch.arange(2), torch.arange(2))
        score_decode_tail(kv, summ, bt, seq, mids, states, torch.arange(2), {m.method_id: m}, use_triton=False)
        for b, L in enumerate(seq.tolist()):
            nblk = -(-L // BS)
            keys = gather_keys(kv, bt[b, :nblk])[:, :L]
            ref = torch.stack([keys[:, j * BS:(j + 1) * BS].abs().amax((1, 2)) for j in range(nblk)], 1)
            assert torch.allclose(summ.scores[bt[b, :nblk].long()].T, ref), b


@pytest.mark.parametrize("method,mode", MATRIX)
def test_decode_step_triton_equals_torch(method, mode):
    """One decode step of rows with this method and mode: the CUDA path's launches (tail tile, split bound,
    selection on the method's column, sparse decode; interpreter) against the torch path the CPU backend runs
    (score_decode_tail, select_blocks, sparse_decode_ref): same summaries, same blocks, same output."""
    BS, H, D, G, B = 16, 2, 64, 2, 3
    kv, bt, seq, scores, kmin, kmax, tags, states, srows, mids, cols = _setup([300, 257, 170], [method] * B, H=H,
                                                                              D=D, BS=BS)
    c, mid, rtag = int(cols[0]), int(mids[0]), torch.arange(B)  # _setup's prefills tagged row b with b
    gen = torch.Generator().manual_seed(1)
    scores += torch.rand(scores.shape, generator=gen) * 1e-3  # no tied priors (k-means scores 1 often): the two
    # selections break ties differently, both right
    t = torch.tensor
    ctl = (t([4, 3, 2]), t([1, 1, 1]), t([2, 1, 2]), t([MODES[mode]] * B), t([2, 1, 1]), rtag)
    q = torch.randn(B, H * G, D, generator=gen).to(kv.dtype)
    ref = BlockSummaries(scores[:, c].clone(), kmin.clone(), kmax.clone(), tags[c].clone())
    score_decode_tail(kv, ref, bt, seq, mids, states[srows], rtag, {mid: get_method(method)}, use_triton=False)
    sel = select_blocks(ref, bt, seq, *ctl, 40, q=q, block_size=BS, use_triton=False)
    out_ref = sparse_decode_ref(q, kv, bt, seq, sel.ids, sel.kernel_counts())

    score_tail_triton(kv, scores, kmin, kmax, tags, bt, seq, mids, cols, states, srows, rtag, only_full=False)
    qb = quest_bounds_triton(q, kmin, kmax, bt, seq, ctl[3], BS) if mode != "prior" else None
    ids, counts, kcounts, dense = select_blocks_triton(scores, tags, bt, seq, *ctl, 40, BS, qb, cols=cols)
    out = sparse_decode(q, kv, bt, seq, ids, kcounts)

    assert rel_err(scores[:, c], ref.scores) < 1e-5 and torch.equal(tags[c], ref.tags)
    assert torch.equal(kmin, ref.kmin) and torch.equal(kmax, ref.kmax)
    assert torch.equal(counts, sel.counts) and not dense.any() and not sel.dense.any()
    for b in range(B):
        for h in range(H):
            assert torch.equal(ids[b, h, : int(counts[b, h])], sel.ids[b, h, : int(counts[b, h])]), (b, h)
    assert rel_err(out, out_ref) < 1.5e-2


def test_select_per_row_columns_equal_per_method_selection():
    BS, H = 16, 2
    names = [METHOD_NAMES[i % len(METHOD_NAMES)] for i in range(4)]
    lens = [300, 257, 160, 500]
    M = len(METHOD_NAMES)
    gen = torch.Generator().manual_seed(2)
    kv, bt, seq = make_paged(lens, H, 32, BS, torch.float32, gen=gen)
    NB = kv.shape[0]
    scores = torch.rand(NB, M, H, generator=gen)
    tags = torch.randint(0, 3, (M, NB), generator=gen) + 100  # some blocks stale per column
    cols = torch.tensor([METHOD_NAMES.index(n) for n in names])
    rtag = torch.full((4,), 101)
    t = lambda x: torch.tensor(x)  # noqa: E731
    args = (t([4, 3, 2, 6]), t([1, 0, 2, 1]), t([2, 1, 0, 2]), t([MODES["prior"]] * 4), t([4, 3, 2, 6]), rtag)
    ids, counts, kcounts, dense = select_blocks_triton(scores, tags, bt, seq, *args, 40, BS, cols=cols)
    for b in range(4):
        c = int(cols[b])
        summ = BlockSummaries(scores[:, c], torch.zeros(NB, H, 32), torch.zeros(NB, H, 32), tags[c])
        ref = select_blocks(summ, bt[b:b + 1], seq[b:b + 1], *(a[b:b + 1] for a in args), 40, block_size=BS,
                            need_query=False, use_triton=False)
        assert torch.equal(counts[b], ref.counts[0])
        for h in range(H):
            n = int(counts[b, h])
            assert torch.equal(ids[b, h, :n], ref.ids[0, h, :n])


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_overflow_dense_never_drops_must_attend_blocks(use_triton):
    BS, H = 16, 2
    lens = [640, 640]
    gen = torch.Generator().manual_seed(3)
    kv, bt, seq = make_paged(lens, H, 32, BS, torch.float32, gen=gen)
    summ = BlockSummaries.allocate(kv.shape[0], H, 32, torch.float32, "cpu")
    summ.scores.copy_(torch.rand(summ.scores.shape, generator=gen))
    summ.tags.fill_(7)
    summ.tags[bt[1, 5:25].long()] = -1  # row 1: 20 never-scored blocks, more than the capacity holds
    t = lambda x: torch.tensor(x)  # noqa: E731
    sel = select_blocks(summ, bt, seq, t([4, 4]), t([1, 1]), t([2, 2]), t([0, 0]), t([4, 4]), t([7, 7]), 12,
                        block_size=BS, need_query=False, use_triton=use_triton, overflow_dense=True)
    assert not bool(sel.dense[0]) and (sel.counts[0] == 4 + 1 + 2).all()
    assert bool(sel.dense[1]) and (sel.kernel_counts()[1] == -1).all()


def test_tail_block_is_attended_with_zero_window():
    BS, H = 16, 2
    gen = torch.Generator().manual_seed(4)
    kv, bt, seq = make_paged([250], H, 32, BS, torch.float32, gen=gen)
    summ = BlockSummaries.allocate(kv.shape[0], H, 32, torch.float32, "cpu")
    summ.scores.copy_(torch.rand(summ.scores.shape, generator=gen))
    summ.scores[bt[0, 15].long()] = -1.0  # the tail block ranks last by its prior
    summ.tags.fill_(7)
    t = lambda x: torch.tensor(x)  # noqa: E731
    for use_triton in (False, True):
        sel = select_blocks(summ, bt, seq, t([3]), t([0]), t([0]), t([0]), t([3]), t([7]), 20, block_size=BS,
                            need_query=False, use_triton=use_triton)
        assert (sel.counts == 4).all() and (sel.ids[0, :, 3] == 15).all()


@pytest.mark.parametrize("G,beta", [(1, 1.0), (3, 1.0), (4, 1.0), (3, 0.5), (4, 0.0), (8, 0.5)])
def test_split_quest_bound_matches_torch(G, beta):
    """The split bound kernel (chunks of QB_CHUNK blocks over the grid) + the group key built from its per-head
    bounds and chunk maxima equal the torch reference; rows longer than one chunk, a 1-block row, prior rows."""
    from prescore.kernels import select_triton as st
    from prescore.kernels.selection import quest_bound

    BS, H, D = 16, 2, 32
    lens = [300, 17, 1100 + 16 * st.QB_CHUNK, 5]
    gen = torch.Generator().manual_seed(G)
    kv, bt, seq = make_paged(lens, H, D, BS, torch.float32, gen=gen)
    kmin = kv[..., :D].amin(2)
    kmax = kv[..., :D].amax(2)
    B = len(lens)
    q = torch.randn(B, H * G, D, generator=gen) * 3
    mode = torch.tensor([MODES[m] for m in ("quest", "hybrid", "hybrid", "prior")])
    bnd, pmax = st.quest_bounds_triton(q, kmin, kmax, bt, seq, mode, BS, beta=beta)
    assert pmax.shape[2] == -(-bt.shape[1] // st.QB_CHUNK) > 1
    out = st.quest_key_from_bounds(bnd, pmax, seq, BS)
    MB = bt.shape[1]
    nblk = (seq.long() + BS - 1) // BS
    in_ctx = torch.arange(MB)[None, :] < nblk[:, None]
    phys = bt.long()
    ref = quest_bound(q.view(B, H, G, D), kmin[phys].transpose(1, 2), kmax[phys].transpose(1, 2), in_ctx, beta)
    if beta == 1.0:  # Quest's bound: sum_d max(q_d kmin_d, q_d kmax_d), from scratch in float64
        qd = q.double().view(B, H, G, 1, D)
        raw = torch.maximum(qd * kmin[phys].transpose(1, 2).double()[:, :, None],
                            qd * kmax[phys].transpose(1, 2).double()[:, :, None]).sum(-1) / D ** 0.5
        raw = raw.masked_fill(~in_ctx[:, None, None], float("-inf"))
        exp = torch.logsumexp(raw - raw.amax(-1, keepdim=True), 2)
        assert torch.allclose(ref[:2, :, :int(nblk[1])].double(), exp[:2, :, :int(nblk[1])], atol=1e-4)
    for b in range(3):  # row 3 is prior mode: skipped
        n = int(nblk[b])
        assert torch.allclose(out[b, :, :n], ref[b, :, :n], atol=1e-4, rtol=1e-4)


def _stats_ref(kcounts, rows, seq, sparse, labels, L, BS):
    """The backend's device counters from the selection counts, in torch: per sparse row and KV head the
    selection did not turn dense, acc[label] += (selected tokens, context tokens, selected blocks, context
    blocks) / H (the tail block's unfilled slots are not tokens)."""
    H = kcounts.shape[1]
    acc = torch.zeros(L, 4, dtype=torch.float64)
    for b in range(seq.numel()):
        if not sparse[b]:
            continue
        S, nblk = int(seq[b]), -(-int(seq[b]) // BS)
        for kc in kcounts[int(rows[b])].tolist():
            if kc >= 0:
                acc[labels[b]] += torch.tensor([kc * BS - (nblk * BS - S), S, kc, nblk], dtype=torch.float64) / H
    return acc


def test_selection_launch_adds_the_row_stats():
    """``select_blocks_triton(stats=...)`` adds the backend's device counters (torch computation beside it):
    a sparse row, a dense-by-request row, a row the overflow turns dense, on full, cached and grown steps."""
    from prescore.kernels import SelectionCache

    BS, H = 16, 2
    names = [METHOD_NAMES[i % len(METHOD_NAMES)] for i in range(4)]
    kv, bt, seq, scores, kmin, kmax, tags, states, srows, mids, cols = _setup([700, 333, 90, 900], names, H=H)
    tags[cols[3], bt[3, 5:45].long()] = -1  # row 3: 40 never-scored blocks, over the capacity: turned dense
    t = torch.tensor
    cache = SelectionCache.allocate(7, H, 40, "cpu")
    rows = srows.to(torch.int32)
    sparse, labels = t([1, 1, 0, 1]), t([2, 0, 1, 3])
    ctl = (t([4, 3, 2, 4]), t([1, 1, 1, 1]), t([2, 2, 2, 2]), t([MODES["prior"]] * 4), t([0] * 4), t([0, 1, 2, 3]))
    for step in range(3):  # full, cached and one-block-more steps
        s = seq + 16 * step
        got = torch.zeros(4, 4, dtype=torch.float64)
        select_blocks_triton(scores, tags, bt, s, *ctl, 40, BS, cache=cache, rows=rows, cols=cols,
                             overflow_dense=True, stats=(sparse, labels, got))
        assert (cache.kcounts[rows[3].long()] < 0).all() and (cache.kcounts[rows[:3].long()] > 0).all()
        exp = _stats_ref(cache.kcounts, rows, s, sparse, labels, 4, BS)
        assert torch.allclose(got, exp) and got[[2, 0]].abs().sum() > 0 and not got[1:2].any() and not got[3].any()
