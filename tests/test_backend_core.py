"""The backend core as the CUDA path runs it, on CPU: vLLM's GPU cache layout (token-major, K|V in the last dim)
with padded pages, block summaries in the padding, host planning from CommonAttentionMetadata-like inputs,
and the Triton sparse decode (under TRITON_INTERPRET=1) against the torch reference."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import requires_vllm

pytestmark = [requires_vllm, pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not
                                                torch.cuda.is_available(), reason="Triton needs a GPU or the interpreter")]

H, D, BS, HQ = 2, 32, 16, 4


def _gpu_layout_cache(nb, dtype=torch.bfloat16):
    """[NB, H, BS, 2D] view, token-major inside a block (LBNHC), pages padded for the summaries."""
    from prescore.backend.store import extra_page_bytes

    el = torch.empty((), dtype=dtype).element_size()
    page = H * BS * 2 * D * el
    padded = page + extra_page_bytes(H, D, BS, dtype, mirror=False)
    raw = torch.zeros(nb * padded // el, dtype=dtype)
    kv = raw.as_strided((nb, H, BS, 2 * D), (padded // el, 2 * D, H * 2 * D, 1))
    return raw, kv


def _cm(qlens, seqs, bt, req_idx):
    qsl = torch.tensor([0] + list(np.cumsum(qlens)), dtype=torch.int32)
    return SimpleNamespace(num_reqs=len(qlens), query_start_loc_cpu=qsl, query_start_loc=qsl,
                           seq_lens=torch.tensor(seqs, dtype=torch.int32), seq_lens_cpu_upper_bound=None,
                           block_table_tensor=bt, req_idx=np.array(req_idx))


def _plan(cm, bufs, fused_dense=True, capture=False, max_selected=20):
    from prescore.backend.plan import plan
    from prescore.backend.requests import TABLE

    return plan(cm, BS, bufs, TABLE, max_selected=max_selected, fused_dense=fused_dense, capture=capture)


def test_cuda_style_path_on_cpu():
    from prescore.backend import params as P
    from prescore.backend import step as S
    from prescore.backend.plan import DecodeBuffers
    from prescore.backend.requests import TABLE
    from prescore.backend.store import LayerStore
    from prescore.kernels.decode import sparse_decode_ref

    g = torch.Generator().manual_seed(0)
    NB, L = 40, 300  # 19 blocks per request
    raw, kv = _gpu_layout_cache(NB)
    kv.copy_(torch.randn(kv.shape, generator=g).to(kv.dtype))
    before = kv.clone()
    perm = torch.randperm(NB, generator=g)
    bt = torch.stack([perm[:20], perm[20:40]]).int()

    TABLE.configure(4, P.PrescoreParams(hybrid_min_budget=0))  # the small hybrid budget keeps a prior share
    sp = lambda **x: SimpleNamespace(extra_args={f"prescore_{k}": v for k, v in x.items()})  # noqa: E731
    TABLE.set(1, sp(budget=32, sink=16, window=32, method="leverage", mode="prior"), L)
    TABLE.set(3, sp(budget=48, sink=16, window=16, method="kmeans", mode="hybrid"), L)
    store = LayerStore(kv, mirror=False, num_slots=4)
    assert store.in_page
    bufs = DecodeBuffers(8, "cpu")

    # step 1: both prompts prefill (vLLM's kernel attends them; the step scores their blocks)
    plan = _plan(_cm([L, L], [L, L], bt, [1, 3]), bufs)
    assert plan.dense_rows == [0, 1] and len(plan.prefill) == 2 and plan.num_rows == 0 and not plan.uniform
    q = torch.randn(2 * L, HQ, D, generator=g).to(torch.bfloat16)
    out = torch.zeros_like(q)
    S.run(store, plan, q, kv, bt, torch.tensor([L, L]), out, D ** -0.5, BS, S.TRITON)
    assert torch.equal(kv, before)  # summaries live in the padding, never in K/V
    for m, row in (("leverage", 0), ("kmeans", 1)):
        assert bool((store.summ[m].tags[bt[row, :19].long()] == TABLE.tag[[1, 3][row]]).all())

    # step 2: one decode token each (KV of the new token written by the attention layer beforehand), planned as
    # the CPU backend does (a mixed plan: the step attends the sparse rows), torch ops
    S.CAPTURE = []
    plan = _plan(_cm([1, 1], [L + 1, L + 1], bt, [1, 3]), bufs, fused_dense=False)
    assert plan.dense_rows == [] and plan.num_rows == plan.num_attend == 2 and plan.rows.tolist() == [0, 1]
    q = torch.randn(2, HQ, D, generator=g).to(torch.bfloat16)
    out = torch.zeros_like(q)
    S.run(store, plan, q, kv, bt, torch.tensor([L + 1, L + 1]), out, D ** -0.5, BS, S.TORCH)
    cap, S.CAPTURE = S.CAPTURE, None
    assert sorted(c["method"] for c in cap) == ["kmeans", "leverage"]
    for c in cap:
        row = 0 if c["method"] == "leverage" else 1
        sink, window, budget = (1, 2, 2) if row == 0 else (1, 1, 3)
        assert (c["sink"], c["window"], c["budget"]) == (sink, window, budget)
        assert c["counts"].tolist() == [sink + window + budget] * H
        ref = sparse_decode_ref(q[row:row + 1], kv, bt[row:row + 1], torch.tensor([L + 1], dtype=torch.int32),
                                c["ids"][None], c["counts"][None], D ** -0.5)
        torch.testing.assert_close(out[row].double(), ref[0], atol=3e-2, rtol=3e-2)  # bf16 output

    # the same step as a uniform plan (what FULL decode CUDA graphs replay: column i of the persistent buffers is
    # batch row i) through the Triton ops, plus a dense-by-request row and a padded row
    TABLE.set(2, sp(budget=0), 49)
    bt4 = torch.cat([bt, bt[:1], torch.zeros_like(bt[:1])])
    seq4 = torch.tensor([L + 1, L + 1, 50, 0], dtype=torch.int32)
    assert not _plan(_cm([L, 1], [L, L + 1], bt, [1, 3]), bufs).uniform  # a prefill row: no
    plan = _plan(_cm([1, 1, 1, 0], seq4.tolist(), bt4, [1, 3, 2, -1]), bufs)
    assert plan.uniform and plan.num_rows == plan.num_attend == 4 and plan.dense_rows == []
    q4 = torch.cat([q, torch.randn(2, HQ, D, generator=g).to(torch.bfloat16)])
    out4 = torch.zeros_like(q4)
    S.run(store, plan, q4, kv, bt4, seq4, out4, D ** -0.5, BS, S.TRITON)
    torch.testing.assert_close(out4[:2].float(), out.float(), atol=2e-2, rtol=2e-2)
    dense = sparse_decode_ref(q4[2:3], kv, bt4[2:3], seq4[2:3], scale=D ** -0.5)
    torch.testing.assert_close(out4[2].double(), dense[0], atol=3e-2, rtol=3e-2)
    assert bool(torch.isfinite(out4[3].float()).all())
    # a mixed step (a new prompt prefilling beside the two decode rows): the decode rows take the same step on a
    # prefix of the same buffers and give the same output as the uniform step above; vLLM's kernel gets the rest
    TABLE.set(0, sp(budget=32, sink=16, window=32, method="keynorm", mode="prior"), 40)
    bt3 = torch.cat([bt, bt[:1]])
    plan = _plan(_cm([1, 1, 40], [L + 1, L + 1, 40], bt3, [1, 3, 0]), bufs)
    assert plan.dense_rows == [2] and plan.rows.tolist() == [0, 1] and plan.tokens.tolist() == [0, 1]
    assert [p.slot for p in plan.prefill] == [0] and plan.num_attend == 2 and not plan.uniform
    assert bufs.field("slot", 2).tolist() == [1, 3]
    q3 = torch.cat([q, torch.randn(40, HQ, D, generator=g).to(torch.bfloat16)])
    o = torch.zeros_like(q3)
    store.cache.invalidate()
    S.run(store, plan, q3, kv, bt3, torch.tensor([L + 1, L + 1, 40]), o, D ** -0.5, BS, S.TRITON)
    torch.testing.assert_close(o[:2].float(), out4[:2].float(), atol=0, rtol=0)
    assert not o[2:].any()  # vLLM's kernel's rows: untouched by the step


def test_capture_plans_every_row_as_padding():
    """CUDA graph capture: whatever the request table holds (vLLM's sampler warmup leaves requests there), the
    dummy decode batch is planned as padding so the graph records the fused decode path."""
    from prescore.backend import params as P
    from prescore.backend.plan import DecodeBuffers
    from prescore.backend.requests import TABLE

    TABLE.configure(4, P.PrescoreParams())
    TABLE.set(0, SimpleNamespace(extra_args=None), 16)  # a "warmup" request still prefilling per the table
    bt = torch.zeros(3, 4, dtype=torch.int32)
    bufs = DecodeBuffers(8, "cpu")
    assert not _plan(_cm([1, 1, 1], [1, 1, 1], bt, [0, 1, 2]), bufs).uniform
    assert _plan(_cm([1, 1, 1], [1, 1, 1], bt, [0, 1, 2]), bufs, capture=True).uniform
    assert bufs.field("method", 3).tolist() == [-1, -1, -1] and bufs.field("budget", 3).tolist() == [0, 0, 0]
    assert bufs.field("srow", 3).tolist() == [4, 5, 6]  # private scratch rows past the 4 slots
    assert not _plan(_cm([2, 1, 1], [2, 1, 1], bt, [0, 1, 2]), bufs, capture=True).uniform


def test_requests_that_cannot_go_sparse_are_summarised_not_fitted():
    """prompt + max_tokens within sink + window + budget (a stateful method): the prompt's chunk is summarised under
    tag 0 (no owner) and not fitted (final False), and its decode rows' tail blocks get tag 0 too; a request that
    can outgrow its budget, one without max_tokens, and a stateless method keep their tags and the fit."""
    from prescore.backend import params as P
    from prescore.backend.plan import DecodeBuffers
    from prescore.backend.requests import TABLE

    TABLE.configure(4, P.PrescoreParams())
    sp = lambda m, n: SimpleNamespace(extra_args={"prescore_budget": 64, "prescore_method": m}, max_tokens=n)  # noqa: E731
    # sink 16 + window 64 + budget 64 = 9 blocks of 16 = 144 tokens
    TABLE.set(0, sp("kmeans", 44), 100)  # 144 tokens at most: never sparse
    TABLE.set(1, sp("kmeans", 45), 100)  # 145: may go sparse
    TABLE.set(2, sp("keynorm", 4), 100)  # stateless: its scores need no fit
    TABLE.set(3, SimpleNamespace(extra_args=None), 100)  # max_tokens unknown
    bt = torch.zeros(4, 16, dtype=torch.int32)
    bufs = DecodeBuffers(8, "cpu")
    plan = _plan(_cm([100] * 4, [100] * 4, bt, [0, 1, 2, 3]), bufs)
    got = {r.slot: (r.final, r.tag) for r in plan.prefill}
    assert got[0] == (False, 0)
    assert got[1] == (True, TABLE.tag[1]) and TABLE.tag[1] not in (0, 2)
    assert got[2] == (True, 2) and got[3] == (True, TABLE.tag[3])
    _plan(_cm([1] * 4, [101] * 4, bt, [0, 1, 2, 3]), bufs)
    assert bufs.field("tag", 4).tolist() == [0, TABLE.tag[1], 2, TABLE.tag[3]]


def test_plan_fills_one_step_clock_for_every_row():
    """reselect_clock "step": one tick per planned step, the same value in every row of the step (rows of
    different lengths re-select on the same steps); "request" (default): the plan says so and the step passes no
    clock, so the kernels re-select on each row's length (their default; see test_query_aware_reuse_schedule)."""
    from prescore.backend import params as P
    from prescore.backend.plan import DecodeBuffers
    from prescore.backend.requests import TABLE

    TABLE.configure(4, P.PrescoreParams(reselect_clock="step"))
    bt = torch.zeros(3, 40, dtype=torch.int32)
    bufs = DecodeBuffers(8, "cpu")
    clocks = []
    for k in range(3):
        assert _plan(_cm([1, 1, 1], [300 + k, 517 + k, 41 + k], bt, [0, 1, 2]), bufs).step_clock
        c = bufs.field("clock", 3).tolist()
        assert len(set(c)) == 1
        clocks.append(c[0])
    assert clocks[1] == clocks[0] + 1 and clocks[2] == clocks[1] + 1
    TABLE.configure(4, P.PrescoreParams())  # the default: by the row's length (reproducible)
    assert not _plan(_cm([1, 1, 1], [300, 517, 41], bt, [0, 1, 2]), bufs).step_clock


@pytest.mark.parametrize("every,clock,asyn", [(1, "request", False), (4, "request", False), (4, "step", False),
                                             (4, "request", True), (2, "step", True)])
def test_step_triton_ops_equal_torch_ops(every, clock, asyn):
    """The one step, run on the same plans with the Triton ops (the CUDA path; interpreter) and with the torch
    ops (the CPU path): rows of every method and mode, a dense-by-request row and a padding row, over decode
    steps that cross a block boundary (uniform plans) and a step with a prompt prefilling beside them (a mixed
    plan): same selections, same outputs, same device counters."""
    from prescore.backend import params as P
    from prescore.backend import step as S
    from prescore.backend.plan import DecodeBuffers
    from prescore.backend.requests import TABLE
    from prescore.backend.store import LayerStore

    g = torch.Generator().manual_seed(7)
    reqs = [("kmeans", "prior"), ("leverage", "quest"), ("keynorm", "hybrid"), ("kmeans", "hybrid"),
            ("leverage", "prior"), ("keynorm", "quest")]
    lens = [200 + 23 * i for i in range(len(reqs))] + [90]  # + a dense-by-request row
    R, MB, STEPS = len(lens), 24, 6
    NB = (R + 2) * MB
    raw, kv = _gpu_layout_cache(NB)
    kv.copy_(torch.randn(kv.shape, generator=g).to(kv.dtype))
    bt = torch.randperm(NB, generator=g)[: (R + 2) * MB].view(R + 2, MB).int()  # + a padding row, a new prompt
    TABLE.configure(16, P.PrescoreParams(hybrid_min_budget=0, reselect_every=every, reselect_clock=clock,
                                         reselect_async=asyn))
    sp = lambda **x: SimpleNamespace(extra_args={f"prescore_{k}": v for k, v in x.items()})  # noqa: E731
    for i, (m, md) in enumerate(reqs):
        TABLE.set(i, sp(budget=48, sink=16, window=32, method=m, mode=md), lens[i])
    TABLE.set(R - 1, sp(budget=0), lens[-1])
    raws = [raw, raw.clone()]
    kvs = [kv, raws[1].as_strided(kv.shape, kv.stride())]
    stores = [LayerStore(k, mirror=False, num_slots=16) for k in kvs]
    bufs = DecodeBuffers(16, "cpu")
    ops = (S.TRITON, S.TORCH)

    def step(qlens, seq, slots, n_bt):
        plan = _plan(_cm(qlens, seq, bt[:n_bt], slots), bufs, max_selected=40)
        # a padding row's query token, as in vLLM's padded decode batches
        q = torch.randn(max(sum(qlens), len(qlens)), HQ, D, generator=g).to(torch.bfloat16)
        outs = []
        for st, k, o in zip(stores, kvs, ops):
            out = torch.zeros_like(q)
            S.run(st, plan, q, k, bt[:n_bt], torch.tensor(seq, dtype=torch.int32), out, D ** -0.5, BS, o)
            outs.append(out)
        return plan, outs

    step(lens, lens, list(range(R)), R)  # prefill
    noise = torch.rand(stores[0].scores3.shape, generator=g) * 1e-3  # no tied priors (k-means scores 1 often)
    for st in stores:
        st.scores3 += noise
    seq = list(lens) + [0]
    for s in range(STEPS):
        seq = [L + 1 for L in seq[:R]] + [0]
        if s == STEPS - 1:  # a prompt prefilling beside the decode rows: a mixed plan
            TABLE.set(R + 1, sp(budget=48, method="kmeans", mode="hybrid"), 70)
            plan, outs = step([1] * R + [0, 70], seq + [70], list(range(R)) + [-1, R + 1], R + 2)
            assert not plan.uniform and plan.num_rows == R - 1 and plan.dense_rows == [R - 1, R, R + 1]
        else:
            plan, outs = step([1] * R + [0], seq, list(range(R)) + [-1], R + 1)
            assert plan.uniform and plan.num_rows == R + 1
        caches = [st.cache for st in stores]
        cols = list(range(R)) if plan.uniform else plan.rows.tolist()
        for b in range(R - 1):  # (the dense-by-request row is vLLM's in the mixed plan)
            srow = int(bufs.field("srow", plan.num_rows)[cols.index(b)])
            assert int(caches[0].kcounts[srow, 0]) == int(caches[1].kcounts[srow, 0]), (s, b)
            for h in range(H):
                n = int(caches[0].counts[srow, h])
                assert n == int(caches[1].counts[srow, h])
                assert set(caches[0].ids[srow, h, :n].tolist()) == set(caches[1].ids[srow, h, :n].tolist()), (s, b, h)
        torch.testing.assert_close(outs[0][:R].float(), outs[1][:R].float(), atol=2e-2, rtol=2e-2)
    assert stores[0].acc.abs().sum() > 0
    torch.testing.assert_close(stores[0].acc, stores[1].acc)


@pytest.mark.cuda
def test_uniform_step_replays_in_a_cuda_graph():
    """GPU: the uniform step (Triton ops) captured in a CUDA graph and replayed after the buffers are refilled
    gives what the same step gives eagerly (the launches read only the persistent buffers)."""
    from prescore.backend import params as P
    from prescore.backend import step as S
    from prescore.backend.plan import DecodeBuffers
    from prescore.backend.requests import TABLE
    from prescore.backend.store import LayerStore

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    NB, L = 64, 300
    raw, kv = _gpu_layout_cache(NB)
    kv.copy_(torch.randn(kv.shape, generator=g).to(kv.dtype))
    raw = raw.to(dev)
    kv = raw.as_strided(kv.shape, kv.stride())
    bt = torch.randperm(NB, generator=g)[:60].view(2, 30).int().to(dev)
    TABLE.configure(4, P.PrescoreParams(hybrid_min_budget=0))
    sp = lambda **x: SimpleNamespace(extra_args={f"prescore_{k}": v for k, v in x.items()})  # noqa: E731
    TABLE.set(0, sp(budget=48, sink=16, window=32, method="kmeans", mode="hybrid"), L)
    TABLE.set(1, sp(budget=48, sink=16, window=32, method="leverage", mode="prior"), L)
    store = LayerStore(kv, mirror=False, num_slots=4)
    bufs = DecodeBuffers(8, dev)
    q = torch.randn(L * 2, HQ, D, generator=g).to(torch.bfloat16).to(dev)
    prefill = _plan(_cm([L, L], [L, L], bt.cpu(), [0, 1]), bufs, max_selected=40)
    S.run(store, prefill, q, kv, bt, torch.tensor([L, L], device=dev), torch.zeros_like(q), D ** -0.5, BS, S.TRITON)
    seq = torch.tensor([L + 1, L + 1], dtype=torch.int32, device=dev)
    q1 = torch.randn(2, HQ, D, generator=g).to(torch.bfloat16).to(dev)
    plan = _plan(_cm([1, 1], seq.tolist(), bt.cpu(), [0, 1]), bufs, max_selected=40)
    assert plan.uniform
    store.selection_cache(40, bufs.max_rows)
    eager = torch.zeros_like(q1)
    S.run(store, plan, q1, kv, bt, seq, eager, D ** -0.5, BS, S.TRITON)
    store.cache.invalidate()
    out = torch.zeros_like(q1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        S.run(store, plan, q1, kv, bt, seq, out, D ** -0.5, BS, S.TRITON)
    store.cache.invalidate()
    _plan(_cm([1, 1], seq.tolist(), bt.cpu(), [0, 1]), bufs, max_selected=40)  # refill the same buffers
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), eager.float(), atol=0, rtol=0)


@pytest.mark.parametrize("ops_name", ["TRITON", "TORCH"])
def test_async_reselect_adopts_last_steps_selection(ops_name):
    """reselect_async: a due row decodes with its kept selection (+ the block a new token opens) and adopts, on its
    next step, exactly what the in-order schedule selected on the due step (from that step's query)."""
    import dataclasses

    from prescore.backend import params as P
    from prescore.backend import step as S
    from prescore.backend.plan import DecodeBuffers
    from prescore.backend.requests import TABLE
    from prescore.backend.store import LayerStore

    g = torch.Generator().manual_seed(3)
    R, MB, every = 2, 64, 4
    NB = R * MB
    raw, kv = _gpu_layout_cache(NB)
    kv.copy_(torch.randn(kv.shape, generator=g).to(kv.dtype))
    bt = torch.randperm(NB, generator=g).view(R, MB).int()
    TABLE.configure(4, P.PrescoreParams(hybrid_min_budget=0, reselect_every=every))
    sp = lambda **x: SimpleNamespace(extra_args={f"prescore_{k}": v for k, v in x.items()})  # noqa: E731
    lens = [600, 611]
    for i, md in enumerate(["hybrid", "quest"]):
        TABLE.set(i, sp(budget=128, sink=16, window=32, method="kmeans", mode=md), lens[i])
    stores = [LayerStore(kv, mirror=False, num_slots=4) for _ in range(2)]  # in order / async, one cache
    stores[1].summ, stores[1].scores3, stores[1].tags2 = stores[0].summ, stores[0].scores3, stores[0].tags2
    stores[1].kmin, stores[1].kmax, stores[1].states = stores[0].kmin, stores[0].kmax, stores[0].states
    bufs = DecodeBuffers(8, "cpu")
    ops = getattr(S, ops_name)
    q0 = torch.randn(sum(lens), HQ, D, generator=g).to(torch.bfloat16)
    S.run(stores[0], _plan(_cm(lens, lens, bt, [0, 1]), bufs), q0, kv, bt, torch.tensor(lens, dtype=torch.int32),
          torch.zeros_like(q0), D ** -0.5, BS, ops)  # prefill (scores the shared summaries once)
    seq = list(lens)
    hist = []
    for _ in range(14):
        seq = [L + 1 for L in seq]
        plan = _plan(_cm([1, 1], seq, bt, [0, 1]), bufs, max_selected=64)
        q = torch.randn(R, HQ, D, generator=g).to(torch.bfloat16)
        sl = torch.tensor(seq, dtype=torch.int32)
        for st, asyn in zip(stores, (False, True)):
            p = dataclasses.replace(plan, async_select=asyn)
            S.run(st, p, q, kv, bt, sl, torch.zeros_like(q), D ** -0.5, BS, ops)
        hist.append([[[set(st.cache.ids[r, h, : int(st.cache.counts[r, h])].tolist()) for h in range(H)]
                      for r in range(R)] for st in stores])
    due = [[s % every == 0 for s in (L + k + 1 for k in range(14))] for L in lens]
    adopted = 0
    for k in range(1, 14):
        for r in range(R):
            sync_prev, asyn_now = hist[k - 1][0][r], hist[k][1][r]
            nblk = -(-(lens[r] + k + 1) // BS)
            if due[r][k - 1]:  # the async row now holds what the in-order row selected one step ago
                assert all(a - {nblk - 1} == s - {nblk - 1} for a, s in zip(asyn_now, sync_prev)), (k, r)
                adopted += 1
            if due[r][k]:  # due now: the async row decodes with its kept selection
                assert all(a - {nblk - 1} == p - {nblk - 1} for a, p in zip(asyn_now, hist[k - 1][1][r])), (k, r)
    assert adopted >= 4
