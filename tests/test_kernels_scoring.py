"""Block pre-scoring against float64 references: every method, chunked prefill, decode-time tail blocks."""

import pytest
import torch

from kernel_utils import METHOD_NAMES, make_paged, rel_err
from prescore.kernels import METHODS, BlockSummaries, get_method, score_decode_tail, score_prefill
from prescore.kernels.scoring import KMeans, Leverage, block_scores_ref, gather_keys, kmeans_score_ref, leverage_ref

IMPLS = pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])


def seq_keys(kv, bt_row, L):
    nblk = -(-L // kv.shape[2])
    return gather_keys(kv, bt_row[:nblk])[:, :L].double()


def test_registry():
    assert set(METHODS) >= {"kmeans", "leverage", "keynorm"}
    with pytest.raises(ValueError, match="unknown scoring method"):
        get_method("nope")


def test_leverage_exact_matches_float64():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 300, 64, generator=gen) * torch.linspace(0.1, 3, 64)  # anisotropic
    keys[:, 7] *= 20  # an outlier key
    st, got = Leverage().fit_and_score(keys)
    assert rel_err(Leverage().score(keys, st), got) < 1e-6
    ref = leverage_ref(keys)
    assert rel_err(got, ref) < 1e-4
    assert (got.argmax(-1) == 7).all()


def test_leverage_state_scores_new_keys_exactly():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 257, 32, generator=gen) * torch.linspace(0.2, 2, 32)
    new = torch.randn(2, 9, 32, generator=gen)
    m = Leverage()
    st = m.fit(keys)
    assert st.shape == (2, m.state_size(32))
    k = keys.double()
    kc = k - k.mean(1, keepdim=True)
    g = kc.transpose(1, 2) @ kc
    lam = 1e-2 * g.diagonal(dim1=1, dim2=2).sum(-1) / 32
    inv = torch.linalg.inv(g + lam[:, None, None] * torch.eye(32, dtype=torch.float64))
    nc = new.double() - k.mean(1, keepdim=True)
    ref = torch.einsum("hnd,hde,hne->hn", nc, inv, nc)
    assert rel_err(m.score(new, st), ref) < 1e-4


def test_kmeanspp_triton_equals_torch_loop():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 300, 64, generator=gen)
    m = KMeans(k=8)
    a = m.init_centroids(x, 8, torch.Generator().manual_seed(1), use_triton=False)
    b = m.init_centroids(x, 8, torch.Generator().manual_seed(1), use_triton=True)
    assert torch.equal(a, b)
    assert torch.unique(a[0], dim=0).shape[0] == 8  # D^2 sampling never re-picks a chosen key


def test_kmeans_scores_match_reference_and_find_outliers():
    gen = torch.Generator().manual_seed(2)
    H, D = 2, 32
    centers = torch.randn(H, 6, D, generator=gen) * 10
    assign = torch.randint(0, 6, (H, 500), generator=gen)
    keys = torch.gather(centers, 1, assign[..., None].expand(H, 500, D)) + torch.randn(H, 500, D, generator=gen)
    keys[:, 123] += 40  # planted outlier
    m = get_method("kmeans", k=8, iters=8)
    st = m.fit(keys)
    assert st.shape == (H, m.state_size(D))
    cents = st[:, : 8 * D].view(H, 8, D)
    got = m.score(keys, st)
    assert rel_err(got, kmeans_score_ref(keys, cents)) < 1e-4
    assert (got.argmax(-1) == 123).all()
    assert torch.equal(st, m.fit(keys))  # seeded: deterministic


def test_kmeans_fewer_keys_than_clusters():
    keys = torch.randn(2, 3, 16)
    m = get_method("kmeans", k=8)
    s = m.score(keys, m.fit(keys))
    assert torch.isfinite(s).all()


@IMPLS
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("BS,layout", [(16, "NHD"), (32, "HND")])
def test_prefill_scores_every_block(method, BS, layout, triton):
    gen = torch.Generator().manual_seed(3)
    L, H, D = 203, 2, 64  # partial last block
    kv, bt, _ = make_paged([L], H, D, BS, torch.bfloat16, layout, gen=gen)
    summ = BlockSummaries.allocate(kv.shape[0], H, D, torch.bfloat16, "cpu")
    m = get_method(method)
    state = score_prefill(kv, summ, bt[0], 0, L, m, tag=11, final=True, use_triton=triton)
    assert state.shape == (H, m.state_size(D))
    keys = seq_keys(kv, bt[0], L)
    # the prompt's own scores: k-means scores them by its last assignment (not a fresh one from the state)
    ks = m.fit_and_score(keys.to(kv.dtype))[1] if isinstance(m, KMeans) else m.score(keys.float(), state)
    ref = block_scores_ref(ks.double(), L, BS)
    nblk = ref.shape[1]
    phys = bt[0, :nblk].long()
    assert rel_err(summ.scores[phys].T, ref) < 1e-5
    assert (summ.tags[phys] == 11).all()
    for j in range(nblk):
        blk = keys[:, j * BS:min(L, (j + 1) * BS)]
        assert torch.equal(summ.kmin[phys[j]].double(), blk.amin(1))
        assert torch.equal(summ.kmax[phys[j]].double(), blk.amax(1))
    untouched = torch.ones(kv.shape[0], dtype=torch.bool)
    untouched[phys] = False
    assert (summ.tags[untouched] == -1).all()
    if method == "keynorm":
        assert rel_err(ks, keys.norm(dim=-1)) < 1e-5


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_chunked_prefill_equals_one_shot(method):
    gen = torch.Generator().manual_seed(4)
    L, H, D, BS = 150, 2, 32, 16
    kv, bt, _ = make_paged([L], H, D, BS, torch.float16, gen=gen)
    m = get_method(method)
    a = BlockSummaries.allocate(kv.shape[0], H, D, torch.float16, "cpu")
    b = BlockSummaries.allocate(kv.shape[0], H, D, torch.float16, "cpu")
    sa = score_prefill(kv, a, bt[0], 0, L, m, tag=1, final=True)
    assert score_prefill(kv, b, bt[0], 0, 40, m, tag=1, final=False) is None
    # a non-final chunk scores the blocks it wrote (first 3 blocks, the 3rd partially)
    assert (b.tags[bt[0, :3].long()] == 1).all() and (b.tags[bt[0, 3:10].long()] == -1).all()
    score_prefill(kv, b, bt[0], 40, 100, m, tag=1, final=False)
    sb = score_prefill(kv, b, bt[0], 100, L, m, tag=1, final=True)
    assert torch.equal(sa, sb)
    phys = bt[0, :10].long()
    assert torch.equal(a.scores[phys], b.scores[phys])
    assert torch.equal(a.kmin[phys], b.kmin[phys]) and torch.equal(a.kmax[phys], b.kmax[phys])


@IMPLS
def test_decode_tail_rescores_newest_block(triton):
    gen = torch.Generator().manual_seed(5)
    H, D, BS = 2, 64, 16
    lens = [40, 64, 17, 100, 0]  # tail blocks: partial, exactly full, 1 token, partial; a padding row
    kv, bt, seq = make_paged(lens, H, D, BS, torch.bfloat16, gen=gen)
    summ = BlockSummaries.allocate(kv.shape[0], H, D, torch.bfloat16, "cpu")
    names = [METHOD_NAMES[i % len(METHOD_NAMES)] for i in range(4)]
    methods = {get_method(n).method_id: get_method(n) for n in set(names)}
    S = max(mm.state_size(D) for mm in methods.values())
    states = torch.zeros(len(lens), H, S)
    names = names + ["keynorm"]
    for b, (L, n) in enumerate(zip(lens[:4], names)):
        m = get_method(n)
        st = score_prefill(kv, summ, bt[b], 0, L - 1, m, tag=b, final=True)
        states[b, :, : st.shape[1]] = st
    mids = torch.tensor([get_method(n).method_id for n in names])
    bt[4] = bt[0]  # the padding row's table points at a live block: it must not touch it
    before = (summ.scores.clone(), summ.tags.clone())
    score_decode_tail(kv, summ, bt, seq, mids, states, torch.arange(5), methods, use_triton=triton)
    others = torch.ones(kv.shape[0], dtype=torch.bool)
    others[[int(bt[b, (L - 1) // BS]) for b, L in enumerate(lens[:4])]] = False
    assert torch.equal(summ.scores[others], before[0][others]) and torch.equal(summ.tags[others], before[1][others])
    for b, (L, n) in enumerate(zip(lens[:4], names)):
        m = get_method(n)
        j = (L - 1) // BS
        keys = gather_keys(kv, bt[b, j:j + 1])[:, : L - j * BS].float()
        ref = m.score(keys, states[b, :, : m.state_size(D)]).amax(-1)
        phys = int(bt[b, j])
        assert rel_err(summ.scores[phys], ref) < 1e-5
        assert torch.equal(summ.kmax[phys].float(), keys.amax(1))
        assert torch.equal(summ.kmin[phys].float(), keys.amin(1))
        assert summ.tags[phys] == b


@pytest.mark.parametrize("D", [64, 128])
def test_kmeans_triton_lloyd_equals_torch(D, monkeypatch):
    import prescore.kernels.kmeans_triton as kt

    monkeypatch.setattr(kt, "PROGRAMS_PER_HEAD", 3)  # several tiles per program
    gen = torch.Generator().manual_seed(D)
    keys = torch.randn(2, 700, D, generator=gen) * torch.linspace(0.5, 2, D)
    keys[:, 5] *= 8
    sa, ka = KMeans(k=12, use_triton=False).fit_and_score(keys)
    sb, kb = KMeans(k=12, use_triton=True).fit_and_score(keys)
    assert torch.allclose(sa, sb, rtol=1e-4, atol=1e-4)
    assert rel_err(kb, ka) < 1e-4


@pytest.mark.parametrize("D", [32, 64])
def test_leverage_triton_equals_torch(D):
    gen = torch.Generator().manual_seed(D + 1)
    L, BS = 333, 16
    kv, bt, _ = make_paged([L], 2, D, BS, torch.bfloat16, gen=gen)
    kv[..., :D] = kv[..., :D] * torch.linspace(0.3, 2, D).to(torch.bfloat16) + 0.5
    phys = bt[0, : -(-L // BS)]
    sa, la = Leverage().fit_and_score_paged(kv, phys, L, use_triton=False)
    sb, lb = Leverage().fit_and_score_paged(kv, phys, L, use_triton=True)
    assert rel_err(sb, sa) < 1e-3
    assert rel_err(lb, la) < 1e-3
    assert rel_err(la, leverage_ref(gather_keys(kv, phys)[:, :L].float())) < 1e-5
    new = torch.randn(2, 5, D, generator=gen)
    assert rel_err(Leverage().score(new, sb), Leverage().score(new, sa)) < 1e-3


def test_leverage_triton_long_sequence_tiles():
    gen = torch.Generator().manual_seed(77)
    L, BS, D = 4500, 16, 32  # several tiles per program
    kv, bt, _ = make_paged([L], 1, D, BS, torch.float16, gen=gen)
    phys = bt[0, : -(-L // BS)]
    sa, la = Leverage().fit_and_score_paged(kv, phys, L, use_triton=False)
    sb, lb = Leverage().fit_and_score_paged(kv, phys, L, use_triton=True)
    assert rel_err(sb, sa) < 1e-3 and rel_err(lb, la) < 1e-3


# ----------------------------------------------------------------------------------------------------------
# leverage on Triton: every config / path against the float64 reference
# ----------------------------------------------------------------------------------------------------------

def _spd(H, D, gen, cond_scale=3.0):
    x = torch.randn(H, 4 * D, D, generator=gen, dtype=torch.float64) * torch.logspace(0, cond_scale, D,
                                                                                        dtype=torch.float64)
    g = x.transpose(1, 2) @ x
    return g + 1e-2 * g.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(D, dtype=torch.float64)


@pytest.mark.parametrize("block", [0, 16, 32])
@pytest.mark.parametrize("D", [16, 80, 128])
def test_fit_kernel_inverse_sweeps(block, D):
    """The fit kernel's in-register inverse (scalar sweep, blocked sweeps) on ill-conditioned SPD matrices, with
    no ridge: exactly (A)^-1 (the rest of the fit is tested against float64 below)."""
    import prescore.kernels.leverage_triton as lt

    a = _spd(2, D, torch.Generator().manual_seed(D + block))
    ref = torch.linalg.inv(a)
    D_PAD = lt._d_pad(D)
    gc = torch.nn.functional.pad(a.float(), (0, D_PAD - D, 0, D_PAD - D)).contiguous()
    state = torch.zeros(2, D + D * D)
    lt._fit_kernel[(2,)](gc, state, 0.0, state.stride(0), HEAD_SIZE=D, D_PAD=D_PAD, SB=min(block, D_PAD), num_warps=4)
    got = state[:, D:].view(2, D, D)
    assert rel_err(got, ref) < 1e-4
    assert torch.allclose(got, got.transpose(1, 2), rtol=1e-4, atol=1e-6 * float(got.abs().max()))


def _lev_cache(L, H, D, BS, dtype, seed, scale=1.0, layout="NHD"):
    gen = torch.Generator().manual_seed(seed)
    kv, bt, _ = make_paged([L], H, D, BS, dtype, layout, gen=gen)
    # anisotropic, correlated, off-centre keys (a real model's keys are all three)
    mix = torch.eye(D) + 0.3 * torch.randn(D, D, generator=gen) / D ** 0.5
    k = (kv[..., :D].float() @ mix) * torch.linspace(0.3, 2, D) + torch.linspace(-1, 3, D)
    kv[..., :D] = (k * scale).to(dtype)
    return kv, bt[0, : -(-L // BS)]


def _lev_ref(kv, phys, L):
    """float64 state and key scores of the first L tokens."""
    return Leverage().fit_and_score(gather_keys(kv, phys)[:, :L].double())


CFG_CASES = {  # (gram, fit, quad) configs: every tile height, pivot block and warps the tuner may pick
    "default": (0, 0, 0),
    "t128-sb32": (3, 1, 3),
    "w4-scalar": (4, 4, 1),
}


@pytest.mark.parametrize("cfgs", list(CFG_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 80])
def test_leverage_triton_configs_match_float64(cfgs, dtype, D, monkeypatch):
    import prescore.kernels.leverage_triton as lt

    g, f, q = CFG_CASES[cfgs]
    monkeypatch.setattr(lt, "GRAM_CONFIGS", [lt.GRAM_CONFIGS[g]])
    monkeypatch.setattr(lt, "FIT_CONFIGS", [lt.FIT_CONFIGS[f]])
    monkeypatch.setattr(lt, "QUAD_CONFIGS", [lt.QUAD_CONFIGS[q]])
    L = 301  # odd, partial last block, several tiles and chunks
    kv, phys = _lev_cache(L, 2, D, 16, dtype, seed=D)
    st_ref, lev_ref = _lev_ref(kv, phys, L)
    st, lev = Leverage().fit_and_score_paged(kv, phys, L, use_triton=True)
    assert rel_err(st[:, :D], st_ref[:, :D]) < 1e-5  # mu
    assert rel_err(st[:, D:], st_ref[:, D:]) < 1e-4  # A^-1
    assert rel_err(lev, lev_ref) < 1e-4
    assert lev.shape == (2, L)


def test_leverage_quad_triton_fp16_scaling():
    """fp16 keys large enough that A^-1 is below fp16's normal range without the power-of-two scaling."""
    from prescore.kernels.leverage_triton import fit_triton, quad_triton

    L, H, D, BS = 77, 1, 32, 16
    kv, phys = _lev_cache(L, H, D, BS, torch.float16, seed=11, scale=300.0)
    st = fit_triton(kv, phys, L, 1e-2)
    st_ref, lev_ref = _lev_ref(kv, phys, L)
    assert float(st_ref[:, D:].abs().max()) < 6e-5
    assert rel_err(st, st_ref) < 1e-4
    assert rel_err(quad_triton(kv, phys, L, st[:, :D], st[:, D:]), lev_ref) < 1e-4


def test_leverage_tuner_picks_fastest_and_never_tunes_in_capture(monkeypatch):
    import prescore.kernels.leverage_triton as lt

    monkeypatch.setattr(lt, "_INTERPRET", False)
    monkeypatch.setattr(lt, "_TUNE", True)
    monkeypatch.setattr(lt, "_BEST", {})
    cost = {"a": 3.0, "b": 1.0, "c": float("nan")}
    ran = []

    def fake_time(fn):
        fn()
        return cost[ran[-1]]

    def run(c):
        ran.append(c)
        if c == "c":
            raise RuntimeError("out of resources")

    monkeypatch.setattr(lt, "_time_ms", fake_time)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert lt._pick("s", (1,), ["a", "b", "c"], run) == "a" and not ran  # capture: the default, nothing timed
    capturing[0] = False
    assert lt._pick("s", (1,), ["a", "b", "c"], run) == "b"
    n = len(ran)
    assert lt._pick("s", (1,), ["a", "b", "c"], run) == "b" and len(ran) == n  # cached
    assert lt.tuned_configs() == {("s", 1): "b"}


@pytest.mark.parametrize("L", [1, 5, 16, 17])
def test_leverage_triton_tiny_prompts(L):
    """One key (centred Gram 0: the ridge floor alone), fewer keys than channels, one exact block. With fewer
    keys than channels only the ridge conditions A (cond ~1e3 here): fp32 gives ~1e-4..1e-3, as the torch
    fp32 inverse would."""
    kv, phys = _lev_cache(L, 2, 32, 16, torch.bfloat16, seed=L)
    st_ref, lev_ref = _lev_ref(kv, phys, L)
    st, lev = Leverage().fit_and_score_paged(kv, phys, L, use_triton=True)
    assert torch.isfinite(st).all() and torch.isfinite(lev).all()
    assert rel_err(st, st_ref) < 1e-3
    assert float((lev.double() - lev_ref).abs().max()) < 5e-3  # leverage of a key is in [0, 1)
