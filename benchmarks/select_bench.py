"""Query-aware selection per layer on a CUDA GPU: everything from the query to the block table, next to the
sparse decode and dense SDPA measured in the same run. Prints a table, writes JSON.

    python benchmarks/select_bench.py --out results/select-h100.json

Shapes: Hq=32, Hkv=8, D=128, bf16, block 16 (Llama-3-8B attention), shuffled physical blocks, summaries in the
cache dtype as the backend keeps them. Per (B, L): ``bound_ms`` (split query-aware bound, every row
re-selecting), ``select_ms`` (selection kernel on those bounds), ``decode_ms`` (sparse decode of the chosen
blocks), and ``step_ms`` = one layer of one decode step as the backend runs it: ``prescore.backend.step.decode``
with the Triton ops (tail scoring, bound + selection into the per-slot cache with ``reselect_every``, sparse
decode) on a ``LayerStore`` with the server's default settings (``shared_step``), averaged over 16 consecutive
decode steps captured in one CUDA graph (rows cross a block boundary inside the run). Needs prescore installed
(``pip install -e .``, or ``--target DIR`` on ``PYTHONPATH``). ``sel_ms`` = step_ms - decode_ms: the amortised
query-aware selection. ``old_bound_ms`` (results/select-h100.json): the previous one-program-per-(row, KV
head) bound kernel, measured in the same run before it was deleted.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from prescore.backend.params import PrescoreParams  # noqa: E402  (the installed prescore: the step is the backend's)
from kernels_bench import BS, D, HKV, HQ, graph_time_ms, paged_cache  # noqa: E402
from prescore.kernels.decode import sparse_decode  # noqa: E402
from prescore.kernels.select_triton import quest_bounds_triton, select_blocks_triton  # noqa: E402
from prescore.kernels.selection import MODES  # noqa: E402


def shared_step(kv, bt, scores, kmin, kmax, budget: int, mode_name: str, every: int, device, ops=None,
                clock: str = "request"):
    """The backend's decode step (``prescore.backend.step.decode`` with the Triton ops: tail scoring, query-aware
    bound + selection into the per-slot cache, sparse decode) on a :class:`LayerStore` over ``kv``, a uniform plan
    of ``B = bt.shape[0]`` budgeted rows with the server's default settings (``PrescoreParams``) at ``budget`` /
    ``mode_name`` / ``every``. Returns ``step(q, seq_lens, out)``. ``ops``: the step's op set (default Triton).
    ``clock``: ``reselect_clock`` ("request": the rows' lengths; "step": the planner's step clock, one plan per
    phase, taken in turn call after call)."""
    from prescore.backend import params as P
    from prescore.backend import step as core
    from prescore.backend.plan import DecodeBuffers, Plan
    from prescore.backend.store import LayerStore
    from prescore.kernels import METHODS

    B = bt.shape[0]
    BS = kv.shape[2]
    p = PrescoreParams(budget=budget, mode=mode_name, reselect_every=every, reselect_clock=clock)
    store = LayerStore(kv, mirror=False, num_slots=B)
    store.scores3.copy_(scores[:, None, :].expand_as(store.scores3))
    store.kmin.copy_(kmin)
    store.kmax.copy_(kmax)
    store.tags2.fill_(7)  # every block scored by its row's request (tag 7)
    bb, sink, win, prior = p.blocks(BS)
    col = P.METHOD_NAMES.index(p.method)
    plans = []
    for phase in range(max(every, 1) if clock == "step" else 1):  # the step clock's phases, as the planner fills it
        bufs = DecodeBuffers(B, device)
        bufs.fill([(b, METHODS[p.method].method_id, col, b, bb, sink, win, MODES[mode_name], prior, 7, 0, 1, 100 + b)
                   for b in range(B)], clock=phase)
        plans.append(Plan(bufs=bufs, num_rows=B, num_attend=B, rows=None, tokens=None, prefill=[], dense_rows=[],
                          max_selected=p.capacity_blocks(BS), quest_beta=p.quest_beta, every=every,
                          step_clock=clock == "step"))
    store.selection_cache(plans[0].max_selected, B)
    scale = (kv.shape[-1] // 2) ** -0.5
    tick = [0]

    def step(q, seq_lens, out):
        core.decode(store, plans[tick[0] % len(plans)], q, kv, bt, seq_lens, out, scale, BS, ops or core.TRITON)
        tick[0] += 1

    return step


def run(B, L, budget, mode_name, every, gen, width=0, phases="spread", profile=False, clock="request"):
    kv, bt = paged_cache(B, L, gen)
    if width > bt.shape[1]:  # the block table of a server with a longer max_model_len (width x block size)
        bt = torch.cat([bt, torch.zeros(B, width - bt.shape[1], dtype=bt.dtype, device="cuda")], 1)
    NB = kv.shape[0]
    seq0 = torch.full((B,), L - 16, dtype=torch.int32, device="cuda")
    if phases == "spread":  # rows of different lengths (as in serving); "aligned": one prompt length (scripts/e2e)
        seq0 -= torch.arange(B, dtype=torch.int32, device="cuda") * 3
    q = torch.randn(16, B, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
    kmin = kv[..., :D].amin(2).contiguous()
    kmax = kv[..., :D].amax(2).contiguous()
    scores = torch.rand(NB, HKV, device="cuda", generator=gen)
    tags = torch.zeros(NB, dtype=torch.int64, device="cuda")
    rtag = torch.zeros(B, dtype=torch.long, device="cuda")
    p = PrescoreParams(budget=budget, mode=mode_name)  # the server's defaults at this budget and mode
    bb, sink, win, prior = (torch.full((B,), v, device="cuda") for v in p.blocks(BS))
    mode = torch.full((B,), MODES[mode_name], device="cuda")
    cap = p.capacity_blocks(BS)  # the server's selection capacity
    beta = p.quest_beta
    out = torch.empty(B, HQ, D, dtype=torch.bfloat16, device="cuda")
    seqs = [seq0 + i for i in range(16)]
    row = dict(B=B, L=L, budget=budget, mode=mode_name, reselect_every=every, width=bt.shape[1], phases=phases,
               reselect_clock=clock)
    qb = quest_bounds_triton(q[0], kmin, kmax, bt, seqs[0], mode, BS, beta=beta)
    row["bound_ms"] = graph_time_ms(lambda: quest_bounds_triton(q[0], kmin, kmax, bt, seqs[0], mode, BS, beta=beta), 4)
    row["select_ms"] = graph_time_ms(lambda: select_blocks_triton(scores, tags, bt, seqs[0], bb, sink, win, mode,
                                                                  prior, rtag, cap, BS, qb), 4)
    ids, counts, kc, _ = select_blocks_triton(scores, tags, bt, seqs[0], bb, sink, win, mode, prior, rtag, cap, BS, qb)
    row["decode_ms"] = graph_time_ms(lambda: sparse_decode(q[0], kv, bt, seqs[0], ids, kc, out=out), 4)

    step = shared_step(kv, bt, scores, kmin, kmax, budget, mode_name, every, "cuda", clock=clock)

    def steps():
        for i in range(16):
            step(q[i], seqs[i], out)

    row["step_ms"] = graph_time_ms(steps, 1) / 16
    if profile:
        row["kernels_us"], row["calls_us"] = kernel_profile(steps, 16)
    row["sel_ms"] = row["step_ms"] - row["decode_ms"]
    ctx = bt[:, : L // BS].long()  # the context's blocks (a --width table is padded past them)
    k_c = kv[..., :D][ctx].permute(0, 2, 1, 3, 4).reshape(B, HKV, L, D).contiguous()
    v_c = kv[..., D:][ctx].permute(0, 2, 1, 3, 4).reshape(B, HKV, L, D).contiguous()
    row["dense_sdpa_ms"] = graph_time_ms(lambda: F.scaled_dot_product_attention(q[0][:, :, None], k_c, v_c,
                                                                                  enable_gqa=True), 4)
    row["speedup_vs_sdpa"] = row["dense_sdpa_ms"] / row["step_ms"]
    del k_c, v_c, kv
    torch.cuda.empty_cache()
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}


def kernel_profile(fn, steps: int) -> tuple[dict, dict]:
    """Device time per kernel name (us per step) of ``fn`` run eagerly (torch.profiler, CUDA activity), and each
    call's device time in launch order (us) per kernel: a selection schedule shows as re-selecting calls among
    the cheap calls of steps that keep their blocks."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    calls: dict = {}
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            calls.setdefault(e.name[:60], []).append(t)
    per_step = {k: round(sum(v) / steps, 2) for k, v in calls.items()}
    return (dict(sorted(per_step.items(), key=lambda kv: -kv[1])),
            {k: [round(t, 2) for t in v] for k, v in calls.items()})


def check(gen) -> None:
    """Compiled kernels vs the torch reference: the split bound's group key, and the whole selection."""
    from prescore.kernels.selection import BlockSummaries, quest_bound, select_blocks
    from prescore.kernels.select_triton import quest_key_from_bounds

    B, L = 3, 40000
    kv, bt = paged_cache(B, L, gen)
    seq = torch.tensor([L, 5000, 17], dtype=torch.int32, device="cuda")
    q = torch.randn(B, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
    kmin, kmax = kv[..., :D].amin(2).contiguous(), kv[..., :D].amax(2).contiguous()
    mode = torch.tensor([1, 2, 1], device="cuda")
    bnd, pmax = quest_bounds_triton(q, kmin, kmax, bt, seq, mode, BS, beta=0.5)
    got = quest_key_from_bounds(bnd, pmax, seq, BS)
    nblk = (seq.long() + BS - 1) // BS
    in_ctx = torch.arange(bt.shape[1], device="cuda")[None, :] < nblk[:, None]
    ref = quest_bound(q.float().view(B, HKV, HQ // HKV, D), kmin[bt.long()].transpose(1, 2),
                      kmax[bt.long()].transpose(1, 2), in_ctx, 0.5)
    m = in_ctx[:, None, :].expand_as(ref)
    err = float((got[m] - ref[m]).abs().max())
    summ = BlockSummaries(scores=torch.rand(kv.shape[0], HKV, device="cuda", generator=gen), kmin=kmin, kmax=kmax,
                          tags=torch.zeros(kv.shape[0], dtype=torch.int64, device="cuda"))
    t = lambda v: torch.tensor(v, device="cuda")  # noqa: E731
    args = (summ, bt, seq, t([128, 64, 8]), t([1, 1, 1]), t([4, 4, 4]), mode, t([0, 16, 0]), t([0, 0, 0]), 200)
    a = select_blocks(*args, q=q, block_size=BS, use_triton=True, quest_beta=0.5)
    b = select_blocks(*args, q=q, block_size=BS, use_triton=False, quest_beta=0.5)
    same = sum(len(set(a.ids[i, h, :int(a.counts[i, h])].tolist()) & set(b.ids[i, h, :int(b.counts[i, h])].tolist()))
               for i in range(B) for h in range(HKV))
    total = int(b.counts.sum())
    print(f"CHECK split bound key max abs err {err:.2e}; triton vs torch selection overlap {same}/{total} "
          f"(counts equal: {bool(torch.equal(a.counts, b.counts))})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--every", default="1,4,8")
    ap.add_argument("--modes", default="hybrid,quest")
    ap.add_argument("--shapes", default="1x32768,8x32768,32x32768,1x131072,8x131072")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--width", type=int, default=0, help="block-table width in blocks (max_model_len / 16; "
                    "default: the context's own)")
    ap.add_argument("--phases", choices=("spread", "aligned"), default="spread",
                    help="rows at different lengths (re-select on different steps) or one length")
    ap.add_argument("--clocks", default="request", help="reselect_clock values to run (request,step)")
    ap.add_argument("--profile", action="store_true", help="also the device time per kernel (us per step)")
    a = ap.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    check(gen)
    rows = []
    hdr = f"{'B':>3} {'L':>7} {'mode':>7} {'every':>5} {'clock':>7} {'bound':>8} {'select':>8} {'decode':>8} " \
          f"{'sel/step':>8} {'step':>8} {'sdpa':>8} {'x sdpa':>6}"
    print(torch.cuda.get_device_name(), torch.__version__, f"width {a.width or 'context'}, phases {a.phases}",
          flush=True)
    print(hdr, flush=True)
    for shape in a.shapes.split(","):
        B, L = (int(x) for x in shape.split("x"))
        for m in a.modes.split(","):
            for e in (int(x) for x in a.every.split(",")):
                for c in a.clocks.split(","):
                    r = run(B, L, a.budget, m, e, gen, a.width, a.phases, a.profile, c)
                    rows.append(r)
                    print(f"{B:>3} {L:>7} {m:>7} {e:>5} {c:>7} {r['bound_ms']:8.4f} {r['select_ms']:8.4f} "
                          f"{r['decode_ms']:8.4f} {r['sel_ms']:8.4f} {r['step_ms']:8.4f} {r['dense_sdpa_ms']:8.4f} "
                          f"{r['speedup_vs_sdpa']:6.2f}", flush=True)
                    for name, us in (r.get("kernels_us") or {}).items():
                        c_us = sorted(r["calls_us"].get(name, []))
                        spread = f"  calls {len(c_us)}: min {c_us[0]:.1f} median {c_us[len(c_us) // 2]:.1f} max " \
                                 f"{c_us[-1]:.1f} us" if c_us else ""
                        print(f"      {us:9.2f} us/step  {name}{spread}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "command": "python benchmarks/select_bench.py " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
