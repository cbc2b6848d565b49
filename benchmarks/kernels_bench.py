"""Kernel benchmark on a CUDA GPU: checks, then times decode and scoring; prints a table, writes JSON.

    python benchmarks/kernels_bench.py --out results/kernels-h100.json   # full table (H100: ~4 min)
    python benchmarks/kernels_bench.py --quick                           # small smoke run
    python benchmarks/kernels_bench.py --sweep                           # tile/warp sweep only
    python benchmarks/kernels_bench.py --only-scoring                    # scoring rows only (~1 min)
    python benchmarks/kernels_bench.py --leverage-variants               # leverage: every stage variant
    python benchmarks/kernels_bench.py --profile                         # torch.profiler of scoring

(imports the installed ``prescore`` (``pip install -e .``): the kernels and the step are the package's)

Decode rows (Hq=32, Hkv=8, D=128, bf16, block 16, vLLM's GPU cache layout, shuffled physical blocks):
``dense_sdpa_ms``  torch SDPA (GQA) over contiguous K/V;
``dense_paged_ms`` our kernel, every block (dense mode);
``sparse_ms``      prior-mode selection + our kernel, per step of a 16-step decode run (the selection is kept
                   per request slot and recomputed when the row's block count changes, once per run here);
``sparse_nocache_ms`` the same with the selection recomputed on every call;
``step_prior_ms``  the backend's own decode step in prior mode (``step.decode``, server defaults), per step of a
                   16-step run;
``step_default_ms`` the same step in the DEFAULT mode and settings (hybrid, reselect_every, request clock), 16
                   steps from a length that is a multiple of 16: 16 / reselect_every query-aware re-selections;
``select_ms``      ``step_default_ms - sparse_kernel_ms``: everything from the query to the block table
                   (bound, selection, tail scoring), per layer and step, amortised;
``ideal_ms``       bytes of the selected K/V at the measured device-to-device copy bandwidth.
Every time is the median over CUDA-graph replays of R calls with rotating inputs (different queries and
selections each call), divided by R; the dense baseline is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from prescore.kernels.decode import sparse_decode, sparse_decode_ref
from prescore.kernels.scoring import BlockSummaries, get_method, score_prefill
from prescore.kernels.selection import MODES, SelectionCache, select_blocks

HQ, HKV, D, BS = 32, 8, 128, 16
SINK, WINDOW = 64, 256  # tokens (the backend's defaults)


def graph_time_ms(fn, reps: int, n_graph_calls: int = 1) -> float:
    """Median ms of one fn() call: CUDA graph of `reps` back-to-back calls, replayed; events around replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(5, n_graph_calls)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    del g
    return statistics.median(times)


def event_time_ms(fn, iters: int = 20, inner: int = 1) -> float:
    """Median over `iters` of (events around `inner` back-to-back calls) / inner: device time, or the host's
    launch time where that is the bottleneck (as it would be in a serving step)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def queued_time_ms(fn, iters: int = 10, inner: int = 4) -> float:
    """Median device ms of one fn() call without CUDA graphs: a GPU sleep first, then events around `inner`
    calls that the host queues while the GPU sleeps (the sleep is lengthened until the queueing fits in it)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times, sleep_ms = [], 20.0
    while len(times) < iters:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(sleep_ms * 2.0e6))  # ~2 GHz SM clock: cycles per ms (a slower clock sleeps longer)
        t0 = time.perf_counter()
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        host_ms = (time.perf_counter() - t0) * 1e3
        b.synchronize()
        if host_ms > 0.5 * sleep_ms:  # the GPU may have caught up with the host: discard, sleep longer
            sleep_ms *= 2
            continue
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def copy_gbps() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = event_time_ms(lambda: b.copy_(a), iters=30)
    del a, b
    return 2 * n / (ms * 1e-3) / 1e9


def paged_cache(B: int, L: int, gen: torch.Generator):
    nblk = L // BS
    NB = B * nblk
    kv = torch.empty(NB, BS, HKV, 2 * D, dtype=torch.bfloat16, device="cuda").normal_(generator=gen)
    kv = kv.permute(0, 2, 1, 3)  # logical [NB, Hkv, BS, 2D], token-major physical (vLLM GPU layout)
    bt = torch.randperm(NB, device="cuda", generator=gen).view(B, nblk).int()
    return kv, bt


def check(gen: torch.Generator) -> list[str]:
    """Compiled kernels vs the float64 reference on fresh random inputs (odd sizes, GQA 1..8, D 64/128/256)."""
    from prescore.kernels.selection import Selection  # noqa: F401

    lines = []
    cases = [(64, 1, 16, [1, 17, 1000]), (64, 3, 16, [333, 5]), (128, 4, 16, [4099, 16, 70]),
             (128, 7, 32, [2000, 31]), (256, 8, 32, [513, 1024]), (256, 2, 16, [77])]
    for dt in (torch.bfloat16, torch.float16):
        for (d, g, bs, lens) in cases:
            hkv = 2
            nblk = [-(-x // bs) for x in lens]
            NB = sum(nblk) + 2
            kv = torch.randn(NB, bs, hkv, 2 * d, device="cuda", generator=gen).to(dt).permute(0, 2, 1, 3)
            perm = torch.randperm(NB, device="cuda", generator=gen)
            MB = max(nblk)
            bt = torch.zeros(len(lens), MB, dtype=torch.int32, device="cuda")
            o = 0
            for i, n in enumerate(nblk):
                bt[i, :n] = perm[o:o + n].int()
                o += n
            seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
            q = torch.randn(len(lens), g * hkv, d, device="cuda", generator=gen).to(dt)
            summ = BlockSummaries.allocate(NB, hkv, d, dt, "cuda")
            summ.scores.uniform_(generator=gen)
            summ.tags.zero_()
            t = lambda v: torch.tensor(v, device="cuda")  # noqa: E731
            B = len(lens)
            for mode in ("prior", "hybrid"):
                sel = select_blocks(summ, bt, seq, t([5] * B), t([1] * B), t([2] * B), t([MODES[mode]] * B),
                                    t([2] * B), t([0] * B), 8, q=q, block_size=bs)
                out = sparse_decode(q, kv, bt, seq, sel.ids, sel.kernel_counts())
                ref = sparse_decode_ref(q, kv, bt, seq, sel.ids, sel.kernel_counts())
                err = float((out.double() - ref).norm() / ref.norm())
                tol = 1.5e-2 if dt == torch.bfloat16 else 2e-3
                ok = err < tol and torch.isfinite(out).all()
                lines.append(f"check {str(dt)[6:]:8s} D={d:3d} G={g} BS={bs} {mode:6s} rel_err={err:.2e} "
                             f"{'ok' if ok else 'FAIL'}")
                if not ok:
                    raise SystemExit("\n".join(lines))
            dense = sparse_decode(q, kv, bt, seq)
            ref = sparse_decode_ref(q, kv, bt, seq)
            err = float((dense.double() - ref).norm() / ref.norm())
            lines.append(f"check {str(dt)[6:]:8s} D={d:3d} G={g} BS={bs} dense  rel_err={err:.2e}")
            if err > 1.5e-2:
                raise SystemExit("\n".join(lines))
    # selection, summaries and k-means++ init: Triton vs the torch versions, on the GPU
    from prescore.kernels.kmeans_triton import kmeanspp_triton  # noqa: F401
    from prescore.kernels.scoring import KMeans
    from prescore.kernels.summarize import summarize_torch, summarize_triton

    for L in (4099, 20000):
        kv, bt = paged_cache(2, L - L % BS + BS, gen)
        seq = torch.tensor([L, L // 3], dtype=torch.int32, device="cuda")
        NB = kv.shape[0]
        a = BlockSummaries.allocate(NB, HKV, D, torch.bfloat16, "cuda")
        b = BlockSummaries.allocate(NB, HKV, D, torch.bfloat16, "cuda")
        phys = bt.reshape(-1)
        nvalid = torch.randint(0, BS + 1, (phys.numel(),), device="cuda", generator=gen).int()
        itags = torch.arange(phys.numel(), device="cuda")
        summarize_torch(kv, a, phys, nvalid, itags)
        summarize_triton(kv, b, phys, nvalid, itags)
        ok = torch.equal(a.kmin, b.kmin) and torch.equal(a.kmax, b.kmax) and torch.equal(a.tags, b.tags) \
            and torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
        lines.append(f"check summarize L={L} {'ok' if ok else 'FAIL'}")
        a.scores.uniform_(generator=gen)
        a.tags.zero_()
        t = lambda v: torch.tensor(v, device="cuda")  # noqa: E731
        q = torch.randn(2, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
        for mode in ("prior", "quest", "hybrid"):
            args = (a, bt, seq, t([64, 16]), t([2, 2]), t([16, 16]), t([MODES[mode]] * 2), t([32, 8]), t([0, 0]), 100)
            x = select_blocks(*args, q=q, block_size=BS, use_triton=False)
            y = select_blocks(*args, q=q, block_size=BS, use_triton=True)
            same = torch.equal(x.ids, y.ids) and torch.equal(x.counts, y.counts)
            ok = ok and same
            lines.append(f"check select {mode} L={L} triton==torch {'ok' if same else 'FAIL'}")
        keys = torch.randn(HKV, 2048, D, device="cuda", generator=gen)
        m = KMeans()
        c1 = m.init_centroids(keys, 32, torch.Generator(device="cuda").manual_seed(3), use_triton=False)
        c2 = m.init_centroids(keys, 32, torch.Generator(device="cuda").manual_seed(3), use_triton=True)
        same = torch.allclose(c1, c2)
        lines.append(f"check kmeans++ init triton==torch {'ok' if same else 'FAIL'}")
        if not (ok and same):
            raise SystemExit("\n".join(lines))
    return lines


def decode_row(B: int, L: int, budgets: list[int], gbps: float, gen: torch.Generator, rot: int = 4,
               cfg: dict | None = None) -> list[dict]:
    cfg = cfg or {}
    kv, bt = paged_cache(B, L, gen)
    seq = torch.full((B,), L, dtype=torch.int32, device="cuda")
    qs = [torch.randn(B, HQ, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(rot)]
    out = torch.empty_like(qs[0])

    # dense SDPA over contiguous K/V (same values as the paged cache, copied out)
    k_c = kv[..., :D][bt.long()].permute(0, 2, 1, 3, 4).reshape(B, HKV, L, D).contiguous()
    v_c = kv[..., D:][bt.long()].permute(0, 2, 1, 3, 4).reshape(B, HKV, L, D).contiguous()
    q4 = [q[:, :, None, :] for q in qs]
    it = [0]

    def sdpa():
        i = it[0] = (it[0] + 1) % rot
        return F.scaled_dot_product_attention(q4[i], k_c, v_c, enable_gqa=True)

    # correctness of the dense paged kernel against SDPA on this exact data (bf16 vs bf16)
    ref = F.scaled_dot_product_attention(q4[0], k_c, v_c, enable_gqa=True)[:, :, 0].float()
    got = sparse_decode(qs[0], kv, bt, seq, **cfg).float()
    dense_err = float((got - ref).norm() / ref.norm())
    dense_sdpa = graph_time_ms(sdpa, reps=rot * 2)
    del k_c, v_c

    def paged():
        i = it[0] = (it[0] + 1) % rot
        sparse_decode(qs[i], kv, bt, seq, out=out, **cfg)

    dense_paged = graph_time_ms(paged, reps=rot * 2)

    rows = []
    NB = kv.shape[0]
    summs = []
    kmin = kv[..., :D].amin(2)  # real Quest summaries of this cache: [NB, Hkv, D]
    kmax = kv[..., :D].amax(2)
    for _ in range(rot):  # rotating priors -> different selected blocks each call
        s = BlockSummaries(scores=torch.rand(NB, HKV, device="cuda", generator=gen), kmin=kmin, kmax=kmax,
                           tags=torch.zeros(NB, dtype=torch.int64, device="cuda"))
        summs.append(s)
    zeros = torch.zeros(B, dtype=torch.long, device="cuda")
    for budget in budgets:
        bb = torch.full((B,), budget // BS, device="cuda")
        sink = torch.full((B,), SINK // BS, device="cuda")
        win = torch.full((B,), WINDOW // BS, device="cuda")
        mode = torch.full((B,), MODES["prior"], device="cuda")
        cap = budget // BS + SINK // BS + WINDOW // BS
        sel0 = select_blocks(summs[0], bt, seq, bb, sink, win, mode, zeros, zeros, cap, block_size=BS,
                             need_query=False)
        sel_tokens = int(sel0.counts.sum()) * BS  # every selected block is full here (L % BS == 0)
        ideal = sel_tokens * 2 * D * 2 / (gbps * 1e9) * 1e3

        def sparse():  # selection recomputed every call
            i = it[0] = (it[0] + 1) % rot
            sel = select_blocks(summs[i], bt, seq, bb, sink, win, mode, zeros, zeros, cap, block_size=BS,
                                need_query=False)
            sparse_decode(qs[i], kv, bt, seq, sel.ids, sel.kernel_counts(), out=out, **cfg)

        # a decode run: 16 consecutive steps (context L-24 .. L-9, one block boundary), the selection kept per
        # request slot and recomputed when the block count changes; `nsets` independent request sets in turn
        # (different priors, tags and cache rows) so that no set's blocks stay in L2 between its steps.
        nsets = max(rot, min(16, -(-3 * 50_000_000 // max(1, sel_tokens * 2 * D * 2))))
        cache = SelectionCache.allocate(nsets * B, HKV, cap, "cuda")
        set_rows = [torch.arange(i * B, (i + 1) * B, dtype=torch.int32, device="cuda") for i in range(nsets)]
        set_tags = [torch.full((B,), i, dtype=torch.long, device="cuda") for i in range(nsets)]
        step_seqs = [torch.full((B,), L - 24 + j, dtype=torch.int32, device="cuda") for j in range(BS)]
        set_summ = [BlockSummaries(scores=summs[i % rot].scores, kmin=kmin, kmax=kmax,
                                   tags=torch.full((NB,), i, dtype=torch.int64, device="cuda")) for i in range(nsets)]

        def decode_run():
            for j in range(BS):
                for i in range(nsets):
                    sel = select_blocks(set_summ[i], bt, step_seqs[j], bb, sink, win, mode, zeros, set_tags[i], cap,
                                        block_size=BS, need_query=False, cache=cache, rows=set_rows[i])
                    sparse_decode(qs[i % rot], kv, bt, step_seqs[j], sel.ids, sel.kcounts, out=out,
                                  sel_rows=sel.rows, **cfg)

        def sparse_kernel_only():
            i = it[0] = (it[0] + 1) % rot
            sparse_decode(qs[i], kv, bt, seq, sels[i].ids, sels[i].counts, out=out, **cfg)

        sels = [select_blocks(s, bt, seq, bb, sink, win, mode, zeros, zeros, cap, block_size=BS, need_query=False)
                for s in summs]
        sp_nocache = graph_time_ms(sparse, reps=rot * 2)
        cache.invalidate()
        sp = graph_time_ms(decode_run, reps=1) / (BS * nsets)
        spk = graph_time_ms(sparse_kernel_only, reps=rot * 2)
        hyb = torch.full((B,), MODES["hybrid"], device="cuda")
        share = torch.full((B,), budget // BS // 2, device="cuda")

        def sparse_hybrid():
            i = it[0] = (it[0] + 1) % rot
            sel = select_blocks(summs[i], bt, seq, bb, sink, win, hyb, share, zeros, cap, q=qs[i], block_size=BS,
                                need_query=True)
            sparse_decode(qs[i], kv, bt, seq, sel.ids, sel.kcounts, out=out, **cfg)

        sph = graph_time_ms(sparse_hybrid, reps=rot)
        stp = backend_step_ms(kv, bt, summs[0], budget, qs, L)
        std = backend_step_ms(kv, bt, summs[0], budget, qs, L, mode=None)
        rows.append(dict(B=B, L=L, budget=budget, selected_tokens_per_head=sel_tokens // (B * HKV),
                         dense_sdpa_ms=round(dense_sdpa, 5), dense_paged_ms=round(dense_paged, 5),
                         sparse_ms=round(sp, 5), sparse_nocache_ms=round(sp_nocache, 5),
                         sparse_kernel_ms=round(spk, 5), sparse_hybrid_ms=round(sph, 5),
                         step_prior_ms=round(stp, 5), step_default_ms=round(std, 5),
                         select_ms=round(std - spk, 5),
                         ideal_ms=round(ideal, 5),
                         bw_fraction=round(ideal / sp, 4), speedup_vs_sdpa=round(dense_sdpa / sp, 2),
                         dense_paged_vs_sdpa=round(dense_paged / dense_sdpa, 4), dense_paged_rel_err=dense_err))
    del kv, bt, summs, kmin, kmax
    torch.cuda.empty_cache()
    return rows


def backend_step_ms(kv, bt, summ, budget: int, qs, L: int, mode: str | None = "prior") -> float:
    """``step_prior_ms`` / ``step_default_ms`` (``mode`` None: the server's default mode and reselect_every): one
    layer of a decode step as the server runs it at ``budget`` (the backend's ``step.decode``: tail scoring,
    selection into the per-slot cache, sparse decode; server defaults for the rest), 16 consecutive steps in one
    CUDA graph (``select_bench.shared_step``)."""
    from prescore.backend.params import PrescoreParams
    from select_bench import shared_step  # same folder
    B = bt.shape[0]
    d = PrescoreParams()
    mode, every = (d.mode, d.reselect_every) if mode is None else (mode, 1)
    step = shared_step(kv, bt, summ.scores, summ.kmin.contiguous(), summ.kmax.contiguous(), budget, mode, every,
                       "cuda")
    out = torch.empty(B, HQ, D, dtype=torch.bfloat16, device="cuda")
    # prior: lengths L-24..L-9 (one block boundary); default: L-16..L-1, so the 16 steps re-select as often as
    # the schedule says (once at reselect_every 16: graph replays restart the lengths, which forces a
    # re-selection at the first step)
    first = L - 24 if mode == "prior" else L - 16
    seqs = [torch.full((B,), first + j, dtype=torch.int32, device="cuda") for j in range(16)]

    def steps():
        for j in range(16):
            step(qs[j % len(qs)], seqs[j], out)

    return graph_time_ms(steps, reps=1) / 16


def scoring_rows(L: int, gen: torch.Generator) -> list[dict]:
    kv, bt = paged_cache(1, L, gen)
    NB = kv.shape[0]
    summ = BlockSummaries.allocate(NB, HKV, D, torch.bfloat16, "cuda")
    q = torch.randn(1, HQ, L, D, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, HKV, L, D, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(1, HKV, L, D, device="cuda", generator=gen).to(torch.bfloat16)
    attn = event_time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 10, 3)
    attn_graph = graph_time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 2)
    rows = []
    for name in ("keynorm", "leverage", "kmeans"):
        m = get_method(name)
        fn = lambda m=m: score_prefill(kv, summ, bt[0], 0, L, m, tag=1, final=True)  # noqa: E731
        eager = event_time_ms(fn, 10, 4)  # host + device: Python/Triton launch time shows where it dominates
        # device time: the calls queued behind a GPU sleep, so the host has launched them all before the GPU
        # reaches the first event. In a serving prefill the host runs ahead of the GPU the same way (each
        # layer's attention + GEMMs take ms), so the launch time is hidden and the device time is the cost.
        ms = queued_time_ms(fn, 10, 4)
        row = dict(method=name, L=L, score_ms=round(ms, 4), prefill_attn_ms=round(attn, 4),
                   ratio=round(ms / attn, 4), score_eager_ms=round(eager, 4),
                   prefill_attn_graph_ms=round(attn_graph, 4), timing="score_ms: device time (calls queued "
                   "behind a GPU sleep, events around them); score_eager_ms: eager events (host launches + device)")
        if name == "leverage":  # CUDA-graph capturable (k-means is not: it draws its k-means++ init on the host)
            row["score_graph_ms"] = round(graph_time_ms(fn, 4, 20), 4)
        rows.append(row)
    # the same on model-like keys (correlated, anisotropic, off-centre: leverage_keys) instead of N(0, 1)
    del kv, bt
    kv, bt = leverage_keys(L, gen)
    for r in rows:
        m = get_method(r["method"])
        fn = lambda m=m: score_prefill(kv, summ, bt[0], 0, L, m, tag=1, final=True)  # noqa: E731
        r["score_ms_model_keys"] = round(queued_time_ms(fn, 10, 4), 4)
        r["score_eager_ms_model_keys"] = round(event_time_ms(fn, 10, 4), 4)
    return rows


def print_scoring(scoring: list[dict]):
    print(f"\n{'method':>9} {'L':>6} {'score ms':>9} {'eager ms':>9} {'prefill attn ms':>15} {'ratio':>6}"
          "   (score ms: device time, calls queued behind a GPU sleep; eager: host launches + device)")
    for r in scoring:
        print(f"{r['method']:>9} {r['L']:>6} {r['score_ms']:>9.4f} {r.get('score_eager_ms', float('nan')):>9.4f} "
              f"{r['prefill_attn_ms']:>15.4f} {r['ratio']:>6.3f}")


def profile_scoring(L: int, gen: torch.Generator):
    from torch.profiler import ProfilerActivity, profile

    kv, bt = paged_cache(1, L, gen)
    summ = BlockSummaries.allocate(kv.shape[0], HKV, D, torch.bfloat16, "cuda")
    for name in ("leverage", "kmeans"):
        m = get_method(name)
        for _ in range(2):  # (the first call also picks the leverage kernels' configs)
            score_prefill(kv, summ, bt[0], 0, L, m, tag=1, final=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            score_prefill(kv, summ, bt[0], 0, L, m, tag=1, final=True)
            torch.cuda.synchronize()
        print(f"--- profile {name} L={L}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print_tuned()


def print_tuned():
    from prescore.kernels.leverage_triton import tuned_configs

    for k, v in sorted(tuned_configs().items(), key=str):
        print(f"leverage tuned {k[0]:5s} T<2^{k[1]} H={k[2]} D={k[3]} BS={k[4]} {str(k[5])[6:]} {k[7:]}: {v}")


def leverage_keys(L: int, gen: torch.Generator, dt=torch.bfloat16):
    """A paged cache for one L-token sequence (last block partial when BS does not divide L) whose keys look
    like a model's: correlated, anisotropic, off-centre channels."""
    kv, bt = paged_cache(1, -(-L // BS) * BS, gen)
    kv = kv.to(dt) if dt != kv.dtype else kv
    mix = torch.eye(D, device="cuda") + 0.3 * torch.randn(D, D, device="cuda", generator=gen) / D ** 0.5
    scale = torch.logspace(-0.5, 0.5, D, device="cuda")
    shift = torch.linspace(-2, 6, D, device="cuda")
    kv[..., :D] = ((kv[..., :D].float() @ mix) * scale + shift).to(dt)
    return kv, bt


def _per_block(x: torch.Tensor) -> torch.Tensor:
    """[H, T] key scores -> [n, H, BS] (zero padded), the layout summarize takes."""
    H, T = x.shape
    n = -(-T // BS)
    return F.pad(x.float(), (0, n * BS - T)).view(H, n, BS).transpose(0, 1)


def _rel(x, y) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def check_leverage(gen: torch.Generator) -> tuple[list[str], bool]:
    """Triton leverage (tuned configs) + the summarize pass, as the backend runs them, against the float64
    reference on the GPU."""
    from prescore.kernels.scoring import Leverage, gather_keys, score_prefill
    from prescore.kernels.summarize import summarize_torch

    lines, ok = [], True
    for dt, L in ((torch.bfloat16, 4099), (torch.bfloat16, 32768), (torch.float16, 4099)):
        kv, bt = leverage_keys(L, gen, dt)
        phys = bt[0]
        st_ref, lev_ref = Leverage().fit_and_score(gather_keys(kv, phys)[:, :L].double())
        ref = BlockSummaries.allocate(kv.shape[0], HKV, D, dt, "cuda")
        summarize_torch(kv, ref, phys, L, 3, _per_block(lev_ref))
        summ = BlockSummaries.allocate(kv.shape[0], HKV, D, dt, "cuda")
        m = Leverage()
        st, lev = m.fit_and_score_paged(kv, phys, L, use_triton=True)
        score_prefill(kv, summ, torch.cat([phys, phys[:1]]), 0, L, m, tag=3, final=True)
        errs = (_rel(st, st_ref), _rel(lev, lev_ref), _rel(summ.scores[phys.long()], ref.scores[phys.long()]))
        same = torch.equal(summ.kmin, ref.kmin) and torch.equal(summ.kmax, ref.kmax) \
            and torch.equal(summ.tags, ref.tags)
        good = max(errs) < 1e-4 and same
        ok = ok and good
        lines.append(f"check leverage {str(dt)[6:]:8s} L={L:5d} rel_err state={errs[0]:.1e} "
                     f"scores={errs[1]:.1e} block scores={errs[2]:.1e}, min/max/tags "
                     f"{'equal' if same else 'DIFFER'} {'ok' if good else 'FAIL'}")
        del kv, bt
    return lines, ok


def leverage_variants(L: int, gen: torch.Generator):
    """Device time of every variant of every leverage stage (median of CUDA-graph replays), its error against
    float64, and the end-to-end paths; one table, so that one GPU run can decide the defaults."""
    from prescore.kernels import leverage_triton as lt
    from prescore.kernels.scoring import Leverage, gather_keys
    from prescore.kernels.summarize import summarize_triton

    kv, bt = leverage_keys(L, gen)
    phys = bt[0]
    keys = gather_keys(kv, phys)[:, :L].double()
    st_ref, lev_ref = Leverage().fit_and_score(keys)
    summ = BlockSummaries.allocate(kv.shape[0], HKV, D, torch.bfloat16, "cuda")
    rows = []

    def row(stage, variant, fn, err=None, graph=True):
        try:
            ms = graph_time_ms(fn, 8, 20) if graph else event_time_ms(fn, 30, 4)
        except Exception as e:  # noqa: BLE001
            print(f"  {stage} {variant}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            ms = float("inf")
        rows.append((stage, variant, ms, err))
        how = "" if graph else "  (eager: host + device)"
        print(f"{stage:9s} {variant:45s} {ms * 1e3:9.1f} us" + (f"  rel_err {err:.1e}" if err is not None else "")
              + how, flush=True)

    print(f"--- leverage variants, L={L}, H={HKV}, D={D}, bf16, block {BS} (device us: CUDA-graph replays)")
    for c in lt.GRAM_CONFIGS:
        row("gram", f"{tuple(c)}", lambda c=c: lt._gram_partials(kv, phys, L, c))
    pg, ps, P = lt._gram_partials(kv, phys, L, lt.GRAM_CONFIGS[0])
    state = torch.empty(HKV, D + D * D, device="cuda")
    row("reduce", f"P={P}", lambda: lt._reduce(pg, ps, P, L, state, D))
    gc = lt._reduce(pg, ps, P, L, state, D)
    for c in lt.FIT_CONFIGS:
        def fit(c=c):
            lt._fit_kernel[(HKV,)](gc, state, 1e-2, state.stride(0), HEAD_SIZE=D, D_PAD=D, SB=c.block,
                                   num_warps=c.warps)
        fit()
        row("fit", f"pivot block {c.block or 'scalar'}, {c.warps} warps", fit, _rel(state[:, D:], st_ref[:, D:]))
    st = st_ref.float()
    mu, ainv = st[:, :D], st[:, D:]
    kc = keys - mu[:, None, :].double()
    q_ref = ((kc @ ainv.double().view(HKV, D, D)) * kc).sum(-1)  # what the quad kernel should reproduce
    del kc, keys
    out = torch.empty(HKV, L, device="cuda")
    for c in lt.QUAD_CONFIGS:
        lt._quad_launch(kv, phys, L, mu, ainv, out, c)
        row("quad", f"{tuple(c)} keys", lambda c=c: lt._quad_launch(kv, phys, L, mu, ainv, out, c), _rel(out, q_ref))
    ks = _per_block(out)
    row("summ", "separate summarize pass", lambda: summarize_triton(kv, summ, phys, L, 1, ks))
    row("summ", "torch.zeros_like (launch floor)", lambda: torch.zeros_like(mu))
    # end to end with the tuned configs, as the backend calls it: device time, then host + device (eager)
    m = Leverage()
    fn = lambda: score_prefill(kv, summ, bt[0], 0, L, m, tag=1, final=True)  # noqa: E731
    fn()
    row("e2e", "score_prefill", fn)
    row("e2e-eager", "score_prefill", fn, graph=False)
    print_tuned()
    print("\n--- best per stage")
    for stage in ("gram", "fit", "quad", "e2e", "e2e-eager"):
        r = min((r for r in rows if r[0] == stage), key=lambda r: r[2])
        print(f"{stage:9s} {r[1]:45s} {r[2] * 1e3:9.1f} us")
    return rows


def sweep(gen: torch.Generator):
    print("sweep: dense paged kernel, (blocks_per_iter, num_warps, num_stages) -> ms", flush=True)
    for B, L in ((1, 32768), (8, 32768), (32, 32768), (8, 131072)):
        kv, bt = paged_cache(B, L, gen)
        seq = torch.full((B,), L, dtype=torch.int32, device="cuda")
        q = torch.randn(B, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
        out = torch.empty_like(q)
        k_c = kv[..., :D][bt.long()].permute(0, 2, 1, 3, 4).reshape(B, HKV, L, D).contiguous()
        v_c = kv[..., D:][bt.long()].permute(0, 2, 1, 3, 4).reshape(B, HKV, L, D).contiguous()
        sd = graph_time_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], k_c, v_c, enable_gqa=True), 4)
        del k_c, v_c
        res = []
        for bpi in (2, 4, 8):
            for nw in (4, 8):
                for ns in (2, 3, 4):
                    for split_mult in (1, 2):
                        from prescore.kernels.decode import choose_num_splits
                        nsp = choose_num_splits(B, HKV, bt.shape[1], q.device, bpi) * split_mult
                        try:
                            t = graph_time_ms(lambda: sparse_decode(q, kv, bt, seq, out=out, blocks_per_iter=bpi,
                                                                    num_warps=nw, num_stages=ns, num_splits=nsp), 4)
                        except Exception as e:  # noqa: BLE001 (shared-memory limits etc.)
                            t = float("inf")
                            print("  fail", bpi, nw, ns, type(e).__name__)
                        res.append((t, bpi, nw, ns, nsp))
        res.sort()
        print(f"  B={B} L={L} sdpa={sd:.4f}ms best: " + "; ".join(f"{t:.4f}ms bpi={a} w={b} s={c} splits={d}"
                                                                  for t, a, b, c, d in res[:4]), flush=True)
        del kv, bt
        torch.cuda.empty_cache()


def main(argv=None):
    from prescore.kernels import leverage_triton

    # the benchmark tunes the leverage configs on this GPU (off in a serving engine)
    leverage_triton._TUNE = True
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile the scoring methods and exit")
    ap.add_argument("--only-scoring", action="store_true", help="leverage check + scoring rows only")
    ap.add_argument("--leverage-variants", action="store_true", help="time every leverage stage variant and exit")
    ap.add_argument("--scoring-len", type=int, default=32768)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(time.time()))  # fresh inputs every run
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}", flush=True)
    if args.leverage_variants:
        leverage_variants(args.scoring_len, gen)
        return
    if args.only_scoring:
        lines, ok = check_leverage(gen) if not args.no_check else ([], True)
        for line in lines:
            print(line, flush=True)
        scoring = scoring_rows(args.scoring_len, gen)
        print_scoring(scoring)
        print_tuned()
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": dev, "torch": torch.__version__, "scoring": scoring, "leverage_check": lines},
                          f, indent=1)
        if not ok:
            sys.exit("leverage check FAILED (see above)")
        return
    if not args.no_check:
        for line in check(gen):
            print(line)
        lines, ok = check_leverage(gen)
        for line in lines:
            print(line)
        if not ok:
            print("leverage check FAILED (see above); going on with the timings", flush=True)
    if args.sweep:
        sweep(gen)
        return
    if args.profile:
        profile_scoring(args.scoring_len, gen)
        return
    gbps = copy_gbps()
    print(f"device-to-device copy: {gbps:.0f} GB/s (read + write)", flush=True)
    Bs, Ls, budgets = ((1, 8, 32), (32768, 131072), (512, 2048, 4096))
    if args.quick:
        Bs, Ls, budgets = (1, 8), (32768,), (2048,)
    decode = []
    for L in Ls:
        for B in Bs:
            rows = decode_row(B, L, list(budgets), gbps, gen)
            decode += rows
            for r in rows:
                print(json.dumps(r), flush=True)
    try:
        scoring = scoring_rows(args.scoring_len, gen)
    except Exception:  # noqa: BLE001 -- keep the decode rows of this run
        import traceback
        traceback.print_exc()
        scoring = []
    hdr = f"{'B':>3} {'L':>7} {'budget':>6} {'sdpa ms':>8} {'paged ms':>9} {'sparse ms':>9} {'ideal ms':>8} " \
          f"{'bw frac':>7} {'x sdpa':>7} {'paged/sdpa':>10} {'step ms':>8} {'default':>8} {'select':>8}"
    print("\n" + hdr)
    for r in decode:
        stp = r.get("step_prior_ms")
        print(f"{r['B']:>3} {r['L']:>7} {r['budget']:>6} {r['dense_sdpa_ms']:>8.4f} {r['dense_paged_ms']:>9.4f} "
              f"{r['sparse_ms']:>9.4f} {r['ideal_ms']:>8.4f} {r['bw_fraction']:>7.2f} {r['speedup_vs_sdpa']:>7.1f} "
              f"{r['dense_paged_vs_sdpa']:>10.3f} {'-' if stp is None else f'{stp:8.4f}':>8} "
              f"{r.get('step_default_ms', float('nan')):>8.4f} {r.get('select_ms', float('nan')):>8.4f}")
    print_scoring(scoring)
    res = {"device": dev, "copy_gbps": round(gbps, 1), "torch": torch.__version__,
           "command": "python benchmarks/kernels_bench.py --out results/kernels-h100.json",
           "decode": decode, "scoring": scoring}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()

