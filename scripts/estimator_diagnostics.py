"""Diagnostic: how good is the query-aware block key? Decode-mode perplexity of quest-mode selection with
different block keys, next to an ORACLE key, on one prefill (CPU or GPU, torch selection path).

Not a method of the backend: the oracle and the Gaussian keys read every key of the context (what sparse decode
avoids); they bound what any block key could reach at the same budget. The harness (prescore.eval) runs as
usual; this script only swaps the per-block key that ``select_blocks`` ranks by (``quest_bound``), per config:

- ``beta<b>``   the backend's key q.c + b |q|.r (c, r: block key midpoint and half range; b = 1: Quest's bound)
- ``gmm<a>``    a Gaussian log-mass estimate q.c + |q|^2 (a r)^2 / (2 sqrt(D)) from the same summaries
- ``gtrue``     the Gaussian estimate from each block's true key mean and per-dimension variance
- ``oracle``    the exact attention mass of each block for the current query (log-sum-exp of its scores)
- ``refine<m>`` two stages: ``beta0.5`` shortlists m x the selected-block count, the exact mass of the shortlisted
                blocks ranks them (what a second pass reading only the shortlist's keys would give)

Each is combined over the GQA group exactly like the backend's key (log-sum-exp of per-head keys relative to
each head's best block). Variants are ``key:sink:window`` (tokens), all at one total budget.

    python scripts/estimator_diagnostics.py --context 8064 --decode 64 --trials 4 --budget 1024 \\
        --out results/sweeps/estimator-diagnostics-smollm2-cpu.json      # ~8 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import torch

import prescore.kernels.selection as S
from prescore.eval import engine as E
from prescore.eval.cli import load_model, resolve_model
from prescore.eval.tasks import load_texts, ppl_task

DEFAULT = ("beta1:64:256,beta0.5:64:256,gmm0.5:64:256,gtrue:64:256,oracle:64:256,beta1:16:64,beta0.5:16:64,"
           "oracle:16:64")
_STATE: dict = {}
_ORIG_BOUND = S.quest_bound


def _block_keys(eng, layer, rows, seq, D):
    kv = eng.kv[layer]
    K = kv[eng.bt[rows].long()][..., :D].float()  # [b, MB, H, BS, D]
    MB, BS = K.shape[1], K.shape[3]
    pos = torch.arange(MB * BS, device=K.device).view(MB, BS)
    valid = pos[None] < seq.long()[:, None, None]  # [b, MB, BS]
    return K, valid


def _key(name: str, q, kmin, kmax, rows, seq):
    """Per query head key [b, H, G, MB] in the units of Quest's raw bound (divided by sqrt(D) later)."""
    D = q.shape[-1]
    c, r = (kmin + kmax) / 2, (kmax - kmin) / 2
    if name.startswith("beta"):
        b = float(name[4:])
        return q @ c.transpose(-1, -2) + b * (q.abs() @ r.transpose(-1, -2))
    if name.startswith("gmm"):
        a = float(name[3:])
        return q @ c.transpose(-1, -2) + 0.5 / math.sqrt(D) * ((q ** 2) @ ((a * r) ** 2).transpose(-1, -2))
    K, valid = _block_keys(_STATE["eng"], _STATE["layer"], rows, seq, D)
    if name == "gtrue":
        v = valid.float()[:, :, None, :, None]  # [b, MB, 1, BS, 1]
        n = v.sum(3).clamp_min(1)
        mu = (K * v).sum(3) / n
        var = (((K - mu[:, :, :, None]) ** 2) * v).sum(3) / n  # [b, MB, H, D]
        mu, var = mu.permute(0, 2, 1, 3), var.permute(0, 2, 1, 3)
        return q @ mu.transpose(-1, -2) + 0.5 / math.sqrt(D) * ((q ** 2) @ var.transpose(-1, -2))
    if name == "oracle":
        sc = torch.einsum("bhgd,bmhtd->bhgmt", q, K) / math.sqrt(D)  # the attention logits
        sc = sc.masked_fill(~valid[:, None, None], float("-inf"))
        return math.sqrt(D) * torch.logsumexp(sc, -1)  # log attention mass, in the raw bound's units
    raise ValueError(f"unknown key {name!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=8064)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--budget", type=int, default=1024, help="total tokens per KV head (sink + window + selected)")
    ap.add_argument("--variants", default=DEFAULT, help="key:sink:window,...")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [(k, int(s), int(w)) for k, s, w in (v.split(":") for v in args.variants.split(","))]
    configs = [E.Config("dense", "dense", None)] + [E.Config(f"v{i}", "quest", args.budget)
                                                    for i in range(len(variants))]

    def params(self, c):  # the config boundary: each variant's own sink / window, quest mode
        if c.mode == "dense":
            return orig_params(self, c)
        _, sink, window = variants[int(c.method[1:])]
        BS = self.BS
        sb, wb, tb = -(-sink // BS), -(-window // BS), c.budget // BS
        return replace(self.defaults, method="keynorm", mode="quest", sink=sink, window=window,
                       budget=(tb - sb - wb) * BS)

    orig_params, orig_select = E.SparseEvalEngine.params, E.EvalTorchOps.select

    def select(self, store, q, bt, sl, f, *args, **kw):  # every row of these configs is in the keynorm column
        eng = _STATE["eng"]
        _STATE.update(layer=eng.stores.index(store), rows=f("srow").long(), seq=sl)
        return orig_select(self, store, q, bt, sl, f, *args, **kw)

    def bound(q, kmin, kmax, in_ctx, beta=1.0):
        eng, rows = _STATE["eng"], _STATE["rows"]  # request slots: model rows, then fidelity rows, then padding
        fid = torch.tensor(eng.fid_cfg or [0]).to(rows.device)[((rows - eng.R) // eng.T).clamp(0, len(eng.fid_cfg) - 1)]
        cfg = torch.where(rows < eng.R, rows % eng.C, torch.where(rows < eng.slots, fid, 0)) - 1  # -1: dense
        out = torch.empty(q.shape[0], q.shape[1], kmin.shape[2], dtype=torch.float32, device=q.device)
        D = q.shape[-1]
        def group_key(name, sel):
            raw = _key(name, q[sel].float(), kmin[sel].float(), kmax[sel].float(), rows[sel], _STATE["seq"][sel])
            best = torch.where(in_ctx[sel][:, None, None, :], raw, float("-inf")).amax(-1, keepdim=True)
            return torch.logsumexp((raw - best) / math.sqrt(D), dim=2)

        out[cfg < 0] = 0.0  # dense rows (padding): never ranked
        for vi in [v for v in torch.unique(cfg).tolist() if v >= 0]:
            sel = (cfg == vi).nonzero()[:, 0]
            name, sink, window = variants[vi]
            if not name.startswith("refine"):
                out[sel] = group_key(name, sel)
                continue
            # two stages: the beta-0.5 key shortlists m x (selected blocks) candidates, their exact attention
            # mass (the oracle, now read for the shortlist only) ranks them
            n_sel = (args.budget - sink - window) // eng.BS
            approx = group_key("beta0.5", sel).masked_fill(~in_ctx[sel][:, None, :], float("-inf"))
            k = min(int(float(name[6:]) * n_sel), approx.shape[-1])
            short = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, approx.topk(k, dim=-1).indices, True)
            out[sel] = torch.where(short, group_key("oracle", sel), torch.full_like(approx, -1e30))
        return out

    E.SparseEvalEngine.params, E.EvalTorchOps.select = params, select
    S.quest_bound = bound
    name, path = resolve_model(args.model)
    tok, model = load_model(path, args.device, torch.float32 if args.device == "cpu" else torch.bfloat16)
    eng = E.SparseEvalEngine(model, block_size=16, use_triton=False)
    _STATE["eng"] = eng
    t0 = time.time()
    rows, fid, timing = ppl_task(eng, tok, load_texts(), configs, args.context, args.decode, args.trials,
                                 fidelity_steps=4, trial_batch=args.trials)
    out = []
    print(f"\ndecode-mode perplexity, {args.trials} windows x {args.decode} tokens after {args.context}, "
          f"budget {args.budget} total tokens per KV head, quest mode")
    print(f"  {'key':<10}{'sink':>6}{'window':>8}{'ppl':>9}{'ratio':>9}{'attn err':>10}")
    for r, c in zip(rows, configs):
        key, sink, window = ("dense", None, None) if c.mode == "dense" else variants[int(c.method[1:])]
        f = [x["value"] for x in fid if x["method"] == c.method]
        err = f[0] if f else None
        print(f"  {key:<10}{sink if sink is not None else '-':>6}{window if window is not None else '-':>8}"
              f"{r['value']:>9.3f}{r['ratio_to_dense']:>8.4f}x{err if err is not None else float('nan'):>10.4f}")
        out.append({"key": key, "sink": sink, "window": window, "budget": c.budget, "ppl": r["value"],
                    "ratio_to_dense": r["ratio_to_dense"], "per_trial": r["per_trial"], "attn_rel_err": err})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"model": name, "context": args.context, "decode": args.decode, "trials": args.trials,
                       "budget": args.budget, "device": args.device, "rows": out, "timing": timing,
                       "runtime_s": round(time.time() - t0, 1),
                       "command": "python scripts/estimator_diagnostics.py " + " ".join(
                           f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                           if v is not None and k != "out") + f" --out {args.out}"}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
