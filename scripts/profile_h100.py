#!/usr/bin/env python3
"""Decode-step anatomy on a GPU with the real vLLM: direct step timing and a per-kernel device-time profile.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 scripts/profile_h100.py --backend PRESCORE --budgets 2048,512 \
        --profile-budget 2048 --out $OUT/profile-prescore.json
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 scripts/profile_h100.py --backend FLASH_ATTN --out $OUT/profile-fa.json

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the script: the profiler must see its
kernels; host work is then serial with the GPU, so these step times are upper bounds -- e2e_h100.py times the
same way with vLLM's usual engine process). Requests go in through
``llm_engine.add_request``; ``step()`` is driven by hand. Step time = wall time between the step at which every
request has ``--warm`` tokens and the one at which every request has ``--warm + --steps`` tokens, divided by
the tokens in between: pure decode steps only, no prefill in the window (unlike (t2N - tN) / N, which
subtracts two runs that each include a ~10 s prefill). The profile (torch.profiler, CUPTI: kernels inside CUDA
graphs are recorded) covers ``--profile-steps`` pure decode steps and reports device time per kernel name
per step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time

_ids = itertools.count()


def add_batch(eng, prompts, sp):
    for p in prompts:
        eng.add_request(f"p{next(_ids)}", p, sp)


def drive(eng, n_req, until, on_step=None):
    """Step until every request has >= ``until`` tokens; returns per-step (time, min tokens)."""
    counts, marks = {}, []
    while eng.has_unfinished_requests():
        outs = eng.step()
        for o in outs:
            counts[o.request_id] = len(o.outputs[0].token_ids)
        c = min(counts.values()) if len(counts) >= n_req else 0
        marks.append((time.perf_counter(), c))
        if on_step:
            on_step(c)
        if c >= until:
            break
    return marks


def finish(eng):
    while eng.has_unfinished_requests():
        eng.step()


def step_ms(marks, warm, steps):
    t0 = next((t, c) for t, c in marks if c >= warm)
    t1 = next((t, c) for t, c in marks if c >= warm + steps)
    return (t1[0] - t0[0]) / max(1, t1[1] - t0[1]) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llama3-8b-dummy")
    ap.add_argument("--backend", default="PRESCORE")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--budgets", default="2048")
    ap.add_argument("--mode", default="prior")
    ap.add_argument("--method", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--warm", type=int, default=16)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--profile-budget", type=int, default=None, help="profile this budget (PRESCORE) / dense")
    ap.add_argument("--profile-steps", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=131072 + 128)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--config", help="server-wide prescore settings, k=v comma list (e.g. reselect_async=false); "
                    "kept in each PRESCORE row and the profile as `config`")
    ap.add_argument("--out")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the profiler must see the engine's kernels

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    from e2e_h100 import parse_config  # same folder (scripts/)

    config = parse_config(args.config) if args.backend == "PRESCORE" else {}
    extra = {"additional_config": {"prescore": config}} if config else {}
    llm = LLM(**extra, model=args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              enforce_eager=args.eager, enable_prefix_caching=False, gpu_memory_utilization=0.90, seed=0,
              attention_backend=args.backend, max_num_seqs=16, tensor_parallel_size=args.tensor_parallel_size)
    eng = llm.llm_engine
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(0, 100000) for _ in range(args.prompt_len)]}
               for _ in range(args.batch)]
    budgets = [int(b) for b in args.budgets.split(",")] if args.backend == "PRESCORE" else [None]

    def params(budget, n):
        xa = None
        if budget is not None:
            xa = {"prescore_budget": budget, "prescore_mode": args.mode}
            if args.method:
                xa["prescore_method"] = args.method
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=xa)

    # warm-up at this shape: compilations / first-use allocations
    add_batch(eng, prompts, params(budgets[0], 24))
    finish(eng)
    rows = []
    for b in budgets:
        add_batch(eng, prompts, params(b, args.warm + args.steps + 4))
        marks = drive(eng, args.batch, args.warm + args.steps)
        finish(eng)
        ms = step_ms(marks, args.warm, args.steps)
        row = dict(backend=args.backend, budget=b, mode=args.mode if b is not None else None,
                   cuda_graphs=not args.eager, batch=args.batch, prompt_len=args.prompt_len,
                   tp=args.tensor_parallel_size, step_ms=round(ms, 3), decode_tok_s=round(args.batch / ms * 1e3, 1),
                   timing="direct: pure decode steps %d..%d" % (args.warm, args.warm + args.steps))
        if config and b is not None:
            row["config"] = config
        print("ROW", json.dumps(row), flush=True)
        rows.append(row)
    res = {"vllm": vllm.__version__, "device": torch.cuda.get_device_name(), "runs": rows}

    if args.profile_budget is not None or args.backend != "PRESCORE":
        from torch.profiler import ProfilerActivity, profile

        b = args.profile_budget if args.backend == "PRESCORE" else None
        add_batch(eng, prompts, params(b, args.warm + args.profile_steps + 8))
        drive(eng, args.batch, args.warm)
        torch.cuda.synchronize()
        state = {}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            marks = drive(eng, args.batch, args.warm + args.profile_steps)
            torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - t
        finish(eng)
        nsteps = max(1, marks[-1][1] - args.warm) if marks else 1
        kernels = []
        for e in prof.key_averages():
            dev = getattr(e, "self_device_time_total", None)
            if dev is None:
                dev = getattr(e, "self_cuda_time_total", 0.0)
            if dev and dev > 0 and getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
                kernels.append(dict(name=e.key[:160], calls=e.count, us_total=round(dev, 1),
                                    us_per_step=round(dev / nsteps, 2), calls_per_step=round(e.count / nsteps, 2)))
        if not kernels:  # older event attributes: keep everything with device time
            for e in prof.key_averages():
                dev = getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
                if dev > 0:
                    kernels.append(dict(name=e.key[:160], calls=e.count, us_total=round(dev, 1),
                                        us_per_step=round(dev / nsteps, 2), calls_per_step=round(e.count / nsteps, 2)))
        kernels.sort(key=lambda r: -r["us_total"])
        total = sum(k["us_per_step"] for k in kernels)
        print(f"\nPROFILE backend={args.backend} budget={b} steps={nsteps} wall/step={state['wall'] / nsteps * 1e3:.3f} ms "
              f"device kernels/step={total / 1e3:.3f} ms")
        print(f"{'us/step':>9} {'calls/step':>10}  kernel")
        for k in kernels[:45]:
            print(f"{k['us_per_step']:9.1f} {k['calls_per_step']:10.1f}  {k['name'][:120]}")
        res["profile"] = dict(budget=b, config=config or None, mode=args.mode if b is not None else None,
                              steps=nsteps, wall_ms_per_step=round(state["wall"] / nsteps * 1e3, 3),
                              device_ms_per_step=round(total / 1e3, 3), kernels=kernels[:80])
        if os.environ.get("OUT"):
            try:
                prof.export_chrome_trace(os.path.join(os.environ["OUT"], f"trace-{args.backend}-{b}.json"))
            except Exception as e:  # noqa: BLE001
                print("trace export failed:", e)
    print("RESULT", json.dumps(res)[:2000], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
