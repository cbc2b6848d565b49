#!/usr/bin/env python3
"""How much does a stale query-aware selection lose, and does a fresh re-rank of a stale candidate list win it
back? A study on a real model (CPU, transformers, float32), not the serving path: it reads the decode queries,
keys and values of every layer from one dense forward pass, and for each decode position t compares block
selections by prescore's query-aware key (``kernels.selection.quest_bound``, beta 0.5, sink + window forced):

- ``fresh``: the top-B blocks by q_t (what ``reselect_every`` 1 in order does);
- ``stale1``: the top-B by q_{t-1} (``reselect_async``: one step old), ``stale16``: by the query of the last
  multiple of 16 (``reselect_every`` 16), each plus the blocks opened since;
- ``rerankXB@k``: the top-(B + X*B) by the query of the last multiple of k (k = 1: q_{t-1}) as candidates,
  re-ranked by q_t (a cheap in-order pass over B + C summaries instead of the whole context, the full scan
  running off the critical path every k steps).

Prints, per selection, the attention-output error ||o_sel - o_dense|| / ||o_dense|| (mean over layers, heads and
positions) and the share of the fresh top-B it holds.

    python3 scripts/stale_selection_study.py --context 4096 --steps 32 --budget 1024 --texts 3
"""

from __future__ import annotations

import argparse
import math

import torch


def capture(model, ids):
    """Per layer: post-RoPE q [Hq, T, D], k and v [Hkv, T, D] of one dense forward pass."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out = {}

    def hook(mod, args, kwargs, _res):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        shp = (*h.shape[:-1], -1, mod.head_dim)
        q = mod.q_proj(h).view(shp).transpose(1, 2)
        k = mod.k_proj(h).view(shp).transpose(1, 2)
        v = mod.v_proj(h).view(shp).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out[mod.layer_idx] = (q[0].detach(), k[0].detach(), v[0].detach())

    hs = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hs:
        h.remove()
    return [out[i] for i in range(len(out))]


def summaries(k, n, bs):
    """Block min/max of keys [Hkv, n, D] -> [Hkv, nblk, D] each (the last block partial)."""
    nblk = -(-n // bs)
    pad = nblk * bs - n
    kk = torch.nn.functional.pad(k[:, :n], (0, 0, 0, pad), value=float("nan"))
    kk = kk.view(k.shape[0], nblk, bs, -1)
    return torch.nan_to_num(kk, nan=float("inf")).amin(2), torch.nan_to_num(kk, nan=float("-inf")).amax(2)


def group_key(q, kmin, kmax, beta):
    """q [Hq, D] -> the query-aware key per (KV head, block) [Hkv, nblk] (kernels.selection.quest_bound)."""
    from prescore.kernels.selection import quest_bound

    H = kmin.shape[0]
    qg = q.view(H, -1, q.shape[-1])[None]
    in_ctx = torch.ones(1, kmin.shape[1], dtype=torch.bool)
    return quest_bound(qg, kmin[None], kmax[None], in_ctx, beta)[0]


def top(key, forced, n):
    """Per KV head the set of the n best non-forced blocks by key [Hkv, nblk]."""
    k = key.clone()
    k[:, forced] = float("-inf")
    n = min(n, int((~forced).sum()))
    return [set(k[h].topk(n).indices.tolist()) for h in range(k.shape[0])]


def attend(q, k, v, n, blocks, forced, bs):
    """Attention of q [Hq, D] over keys [0, n) restricted to the union of blocks + forced, per KV head."""
    Hq, D = q.shape
    H = k.shape[0]
    G = Hq // H
    out = torch.empty(Hq, D)
    for h in range(H):
        keep = forced.clone()
        if blocks is not None:
            keep[list(blocks[h])] = True
        tok = keep.repeat_interleave(bs)[:n]
        s = q[h * G:(h + 1) * G] @ k[h, :n].T / math.sqrt(D)
        s = s.masked_fill(~tok, float("-inf"))
        out[h * G:(h + 1) * G] = torch.softmax(s, -1) @ v[h, :n]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--budget", type=int, default=1024, help="total tokens (sink + window + selected)")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--texts", type=int, default=3)
    ap.add_argument("--extra", default="0.5,1,2", help="C as a fraction of B for the re-rank candidates")
    ap.add_argument("--cand-every", default="1,4,16", help="the candidates' scan interval k (1: one step old)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prescore.eval.cli import resolve_model
    from prescore.eval.tasks import load_texts

    _, path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    bs = a.block
    B = (a.budget - a.sink - a.window) // bs
    extras = [float(x) for x in a.extra.split(",")]
    everys = [int(x) for x in a.cand_every.split(",")]
    names = ["fresh", "stale1", "stale16"] + [f"rerank{x:g}B@{e}" for e in everys for x in extras]
    err = {n: [] for n in names}
    hold = {n: [] for n in names}
    texts = list(load_texts().values())
    for ti in range(a.texts):
        ids = tok(texts[ti % len(texts)]).input_ids[ti * 997:][: a.context + a.steps]
        layers = capture(model, ids)
        for q, k, v in layers:
            for t in range(a.context, a.context + a.steps):
                n = t + 1  # keys 0..t (the decode token's own key included)
                nblk = -(-n // bs)
                forced = torch.zeros(nblk, dtype=torch.bool)
                forced[: -(-a.sink // bs)] = True
                forced[nblk - -(-a.window // bs):] = True
                kmin, kmax = summaries(k, n, bs)
                dense = attend(q[:, t], k, v, n, None, torch.ones(nblk, dtype=torch.bool), bs)
                key_t = group_key(q[:, t], kmin, kmax, a.beta)
                sel = {"fresh": top(key_t, forced, B)}
                scans = {}

                def scan(every):  # the state kept from the last scan of a schedule (its window too) and its key
                    tq = t - 1 - ((t - 1 - a.context) % every)  # every 1: the previous step
                    if tq not in scans:
                        kmn, kmx = summaries(k, tq + 1, bs)
                        f2 = torch.zeros(kmn.shape[1], dtype=torch.bool)
                        f2[: -(-a.sink // bs)] = True
                        f2[kmn.shape[1] - -(-a.window // bs):] = True
                        scans[tq] = (group_key(q[:, tq], kmn, kmx, a.beta), f2,
                                     set(torch.nonzero(f2).flatten().tolist()))
                    return scans[tq]

                for name, every in (("stale1", 1), ("stale16", 16)):
                    ks, fs, was = scan(every)
                    sel[name] = [x | was for x in top(ks, fs, B)]
                for e in everys:
                    ks, fs, was = scan(e)
                    for x in extras:
                        c = [c | was for c in top(ks, fs, B + int(round(x * B)))]
                        kk = key_t.clone()
                        mask = torch.ones_like(kk, dtype=torch.bool)
                        for h in range(kk.shape[0]):
                            mask[h, list(c[h])] = False
                        kk[mask] = float("-inf")
                        sel[f"rerank{x:g}B@{e}"] = top(kk, forced, B)
                for name in names:
                    o = attend(q[:, t], k, v, n, sel[name], forced, bs)
                    err[name].append(float((o - dense).norm() / dense.norm()))
                    hold[name].append(sum(len(s & f) for s, f in zip(sel[name], sel["fresh"])) /
                                      sum(len(f) for f in sel["fresh"]))
        print(f"text {ti}: {len(layers)} layers x {a.steps} steps done", flush=True)
    print(f"\n{a.model}, context {a.context}, budget {a.budget} (B = {B} blocks + sink {a.sink} + window {a.window}),"
          f" beta {a.beta}, {a.texts} texts x {a.steps} decode positions x every layer")
    print(f"  {'selection':<14}{'attn-output err':>16}{'holds fresh top-B':>20}")
    for name in names:
        print(f"  {name:<14}{sum(err[name]) / len(err[name]):>16.4f}{sum(hold[name]) / len(hold[name]):>20.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
