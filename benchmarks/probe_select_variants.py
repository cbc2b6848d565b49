"""Temporary probe (session 7): selection-kernel variants on the GPU (register keys, radix width, key bits, warps).
    python benchmarks/probe_select_variants.py"""
import os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kernels_bench import BS, D, HKV, HQ, graph_time_ms, paged_cache  # noqa: E402
from kernels.select_triton import quest_bounds_triton, select_blocks_triton  # noqa: E402
from kernels.selection import MODES  # noqa: E402

gen = torch.Generator(device="cuda").manual_seed(0)
VARIANTS = [(False, 2, 32), (True, 2, 32), (True, 4, 32), (True, 4, 16)]
for B, L, MBW in [(8, 32768, 2048), (8, 32768, 8192), (1, 131072, 8192), (8, 131072, 8192)]:
    kv, bt = paged_cache(B, L, gen)
    if MBW > bt.shape[1]:
        bt = torch.cat([bt, torch.zeros(B, MBW - bt.shape[1], dtype=bt.dtype, device="cuda")], 1)
    NB = kv.shape[0]
    seq = torch.full((B,), L - 16, dtype=torch.int32, device="cuda")
    q = torch.randn(B, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
    kmin = kv[..., :D].amin(2).contiguous()
    kmax = kv[..., :D].amax(2).contiguous()
    scores = torch.rand(NB, HKV, device="cuda", generator=gen)
    tags = torch.zeros(NB, dtype=torch.int64, device="cuda")
    rtag = torch.zeros(B, dtype=torch.long, device="cuda")
    bb = torch.full((B,), 128, device="cuda")
    sink = torch.full((B,), 1, device="cuda")
    win = torch.full((B,), 4, device="cuda")
    mode = torch.full((B,), MODES["hybrid"], device="cuda")
    prior = torch.full((B,), 16, device="cuda")
    cap = 128 + 1 + 4 + 2
    qb = quest_bounds_triton(q, kmin, kmax, bt, seq, mode, BS, beta=0.5)
    tb = graph_time_ms(lambda: quest_bounds_triton(q, kmin, kmax, bt, seq, mode, BS, beta=0.5), 4)
    ref = None
    for v in VARIANTS:
        try:
            out = select_blocks_triton(scores, tags, bt, seq, bb, sink, win, mode, prior, rtag, cap, BS, qb, variant=v + (8 if bt.shape[1] >= 4096 else 4,))
            same = ref is None or all(torch.equal(a, b) for a, b in zip(ref, out))
            if ref is None:
                ref = tuple(x.clone() for x in out)
            t = graph_time_ms(lambda: select_blocks_triton(scores, tags, bt, seq, bb, sink, win, mode, prior, rtag,
                                                           cap, BS, qb, variant=v + (8 if bt.shape[1] >= 4096 else 4,)), 4)
            print(f"B={B} L={L} MB={bt.shape[1]} bound={tb:.4f} variant={v} select_ms={t:.4f} same={same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"B={B} L={L} variant={v} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    del kv
    torch.cuda.empty_cache()
