#!/usr/bin/env python3
"""End-to-end decode benchmark with the real vLLM on a GPU: PRESCORE (budgets) vs FLASH_ATTN vs TRITON_ATTN.

    python3 scripts/e2e_h100.py --backend PRESCORE --graphs --out $OUT/e2e-prescore-graphs.json
    python3 scripts/e2e_h100.py --merge results/e2e-h100.json $OUT/e2e-*.json

One engine per (backend, CUDA graphs on/off) on Llama-3-8B-shaped dummy weights (``load_format="dummy"``,
bf16, prefix caching off). For each workload (batch x prompt length), random-token prompts:
t1 = time of a pass with max_tokens=1 (TTFT: the whole batch's prefill + first token). Decode step
``step_ms``: the batch goes in through ``llm_engine.add_request`` and the engine is stepped by hand; step =
wall time from the output at which every request has 16 tokens to the one at which every request has
16 + N (N = --gen, 64), divided by the tokens in between: pure decode steps, nothing else in the window.
(Session 2 used (t2N - tN) / N, two runs each including a ~10 s 8 x 32k prefill, whose run-to-run noise
lands in the step: kept as ``step_diff_ms`` for comparison.) decode tok/s = batch / step.
PRESCORE budgets go per request (``SamplingParams.extra_args``), so one engine serves every budget.
Rows: backend, budget, cuda_graphs, batch, prompt_len, new_tokens, decode_tok_s, step_ms, ttft_s.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from profile_h100 import add_batch, drive, finish, step_ms  # same folder (scripts/)


def run(args):
    from vllm import LLM, SamplingParams
    import vllm

    kw = dict(model=args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              enforce_eager=not args.graphs, enable_prefix_caching=False, gpu_memory_utilization=0.90, seed=0,
              attention_backend=args.backend, max_num_seqs=args.max_num_seqs,
              tensor_parallel_size=args.tensor_parallel_size)
    config = parse_config(args.config)
    if config:
        kw["additional_config"] = {"prescore": config}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    rng = random.Random(0)
    rows = []
    result = {"vllm": vllm.__version__, "engine_start_s": round(start_s, 1), "runs": rows}
    budgets = [int(b) for b in args.budgets.split(",")] if args.backend == "PRESCORE" else [None]
    llm.generate([{"prompt_token_ids": [rng.randrange(0, 100000) for _ in range(512)]}],
                 SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    for wl in args.workloads.split(","):
        shape, _, wl_modes = wl.partition(":")  # "8x32768:hybrid+prior" overrides --mode for this workload
        modes = (wl_modes.replace("+", ",") or args.mode).split(",")
        batch, plen = (int(x) for x in shape.split("x"))
        prompts = [{"prompt_token_ids": [rng.randrange(0, 100000) for _ in range(plen)]} for _ in range(batch)]
        # warm-up at this shape (first-use compilations / allocations must not land in a timed pass)
        wx = {"prescore_budget": budgets[0], "prescore_mode": modes[0]} if budgets[0] is not None else None
        llm.generate(prompts, SamplingParams(max_tokens=48, ignore_eos=True, extra_args=wx), use_tqdm=False)
        for budget, mode in [(b, m) for b in budgets for m in (modes if b is not None else [None])]:
            xargs = {"prescore_budget": budget, "prescore_mode": mode} if budget is not None else None

            def timed(n):
                sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=xargs)
                t = time.perf_counter()
                out = llm.generate(prompts, sp, use_tqdm=False)
                assert all(len(o.outputs[0].token_ids) == n for o in out)
                return time.perf_counter() - t

            t1 = min(timed(1) for _ in range(args.repeat))
            steps = []
            for _ in range(args.repeat):
                sp = SamplingParams(max_tokens=16 + args.gen + 2, temperature=0.0, ignore_eos=True, extra_args=xargs)
                add_batch(llm.llm_engine, prompts, sp)
                marks = drive(llm.llm_engine, batch, 16 + args.gen)
                finish(llm.llm_engine)
                steps.append(step_ms(marks, 16, args.gen) / 1e3)
            step = min(steps)  # steady state: every prompt prefilled, pure decode steps
            if args.diff_timing:
                tn, t2n = timed(args.gen), timed(2 * args.gen)
                step_diff = (t2n - tn) / args.gen
            row = dict(backend=args.backend, budget=budget, cuda_graphs=bool(args.graphs), tp=args.tensor_parallel_size,
                       batch=batch,
                       prompt_len=plen, new_tokens=16 + args.gen, decode_tok_s=round(batch / step, 1),
                       step_ms=round(step * 1e3, 3), ttft_s=round(t1, 3), mode=mode if budget else None,
                       timing="direct (pure decode steps 16..%d)" % (16 + args.gen))
            if config and budget is not None:
                row["config"] = config
            if args.diff_timing:
                row["step_diff_ms"] = round(step_diff * 1e3, 3)
            print("ROW", json.dumps(row), flush=True)
            rows.append(row)
            if args.out:  # rows so far: a lease cut short still brings back what ran
                with open(args.out + ".part", "w") as f:
                    json.dump(result, f)
    return result


def parse_config(text: str | None) -> dict:
    """``reselect_every=8,reselect_clock=step`` -> server-wide prescore defaults (``--additional-config``)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        k, _, v = item.partition("=")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


def merge(out_path, parts, command=None, ran_with=None):
    import torch

    runs, meta = [], {}
    for p in parts:
        with open(p) as f:
            d = json.load(f)
        for r in d["runs"]:  # a PRESCORE row without `config` ran the defaults of its commit: say which they were
            if ran_with and r.get("backend") == "PRESCORE" and "config" not in r:
                r["config"] = dict(ran_with)
        runs += d["runs"]
        meta.update({k: v for k, v in d.items() if k != "runs"})
    res = {"vllm": meta.get("vllm"), "device": meta.get("device"), "runs": runs,
           "greedy_identical": meta.get("greedy_identical"),
           "command": command or "scripts/e2e_h100.py (one run per backend, then --merge)"}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    _ = torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llama3-8b-dummy")
    ap.add_argument("--backend", default="PRESCORE")
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs (+ torch.compile); default eager")
    ap.add_argument("--budgets", default="512,2048,4096")
    ap.add_argument("--mode", default="hybrid", help="comma list; one engine serves every mode (a request field)")
    ap.add_argument("--workloads", default="8x16384,8x32768,1x131072",
                    help="BxL[:mode+mode] comma list; the suffix overrides --mode for that workload")
    ap.add_argument("--config", help="server-wide prescore defaults, k=v comma list (e.g. reselect_every=8); "
                    "kept in each PRESCORE row as `config`")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=131072 + 128)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--diff-timing", action="store_true", help="also the old (t2N - tN) / N step")
    ap.add_argument("--out")
    ap.add_argument("--merge", nargs="+", metavar=("OUT", "PART"))
    ap.add_argument("--command", help="with --merge: the command that produced the parts, kept in OUT")
    ap.add_argument("--ran-with", help="with --merge: k=v list, the settings that PRESCORE rows without `config` ran "
                    "with (the defaults of the commit that produced them), written into those rows")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge[0], args.merge[1:], args.command,
              parse_config(args.ran_with) if args.ran_with else None)
        return
    import torch

    res = run(args)
    res["device"] = torch.cuda.get_device_name()
    print("RESULT", json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
