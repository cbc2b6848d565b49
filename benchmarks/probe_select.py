"""Probe: device time of each launch of the query-aware decode path (bound, selection, sparse decode) per layer."""
import sys, torch, json
sys.path.insert(0, ".")
from kernels_bench import graph_time_ms, paged_cache, HQ, HKV, D, BS
from kernels.selection import MODES, BlockSummaries
from kernels.step_triton import quest_bound_triton
from kernels.select_triton import select_blocks_triton
from kernels.decode import sparse_decode

gen = torch.Generator(device="cuda").manual_seed(0)
for B, L, budget in ((1, 131072, 2048), (8, 32768, 2048), (32, 32768, 2048), (8, 131072, 2048)):
    kv, bt = paged_cache(B, L, gen)
    NB = kv.shape[0]
    seq = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(B, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
    kmin = kv[..., :D].amin(2).contiguous(); kmax = kv[..., :D].amax(2).contiguous()
    scores = torch.rand(NB, HKV, device="cuda", generator=gen)
    tags = torch.zeros(NB, dtype=torch.int64, device="cuda")
    z = torch.zeros(B, dtype=torch.long, device="cuda")
    bb = torch.full((B,), budget // BS, device="cuda"); sink = torch.full((B,), 1, device="cuda")
    win = torch.full((B,), 4, device="cuda"); share = torch.full((B,), 0, device="cuda")
    cap = bt.shape[1]
    row = {"B": B, "L": L}
    for mname in ("quest", "hybrid", "prior"):
        mode = torch.full((B,), MODES[mname], device="cuda")
        if mname == "hybrid": share.fill_(budget // BS // 8)
        qkey = quest_bound_triton(q, kmin, kmax, bt, seq, mode, BS, beta=0.5)
        row[f"bound_{mname}"] = graph_time_ms(lambda: quest_bound_triton(q, kmin, kmax, bt, seq, mode, BS, beta=0.5), 4)
        row[f"select_{mname}"] = graph_time_ms(lambda: select_blocks_triton(scores, tags, bt, seq, bb, sink, win, mode, share, z, cap, BS, qkey), 4)
    ids, counts, kc, dn = select_blocks_triton(scores, tags, bt, seq, bb, sink, win, mode, share, z, cap, BS, qkey)
    out = torch.empty_like(q)
    row["decode"] = graph_time_ms(lambda: sparse_decode(q, kv, bt, seq, ids, kc, out=out), 4)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    del kv, bt; torch.cuda.empty_cache()
