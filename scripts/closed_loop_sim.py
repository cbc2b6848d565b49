#!/usr/bin/env python3
"""A model (not a measurement) of why TTFT p50 can rise when only the decode step gets faster, under `vllm bench
serve --max-concurrency C` with fixed-length outputs (`--ignore-eos`): a discrete-event model of vLLM's chunked
scheduling (every running decode row gets its token, then waiting prompts are chunked first come first served into
the rest of the token budget), fed with step costs measured on the GPU, where a finished request's replacement
becomes schedulable ``delay_ms`` later (the client's next request: HTTP, tokenising a 32k prompt).

    python3 scripts/closed_loop_sim.py                 # session 12's H100 costs (FA3, prescore) at several delays

The mechanism it shows: prompts that prefill together start decoding a few steps apart, so they finish a few decode
steps apart; the faster the decode step, the more of them finish inside one replacement's arrival delay, so their
replacements arrive together and queue behind each other's prefills. Inputs: ``decode_ms`` (pure decode step of C
rows, results/e2e-h100.json) and ``prefill_s`` (one prompt's prefill under serving: the spacing of the first wave's
last completions in results/h100/session12/bench-*.json); a mixed step costs its chunk's share of ``prefill_s``
plus a decode step.
"""

from __future__ import annotations

import argparse
import statistics


def simulate(decode_ms: float, prefill_s: float, delay_ms: float = 0.0, prompt: int = 32768, out: int = 1024,
             conc: int = 8, requests: int = 32, budget: int = 8192) -> dict:
    t, sent, done = 0.0, 0, []
    pending: list[tuple[float, dict]] = []  # (schedulable at, request)
    waiting: list[dict] = []  # FIFO: prompts not yet fully prefilled
    running: list[dict] = []  # decoding

    def send(now: float, delay: float) -> None:
        nonlocal sent
        if sent < requests:
            pending.append((now + delay, {"arrive": now, "left": prompt, "gen": 0, "first": None}))
            sent += 1

    for _ in range(conc):
        send(0.0, 0.0)
    while running or waiting or pending:
        for p in [p for p in pending if p[0] <= t]:
            pending.remove(p)
            waiting.append(p[1])
        if not running and not waiting:
            t = min(p[0] for p in pending)
            continue
        room, chunk, prefilled = budget - len(running), 0, []
        for r in waiting:
            if room <= 0:
                break
            take = min(room, r["left"])
            r["left"] -= take
            room -= take
            chunk += take
            if r["left"] == 0:
                prefilled.append(r)
        t += (decode_ms / 1e3 if running else 0.0) + prefill_s * chunk / prompt
        for r in running:
            r["gen"] += 1
        for r in prefilled:
            waiting.remove(r)
            r["first"], r["gen"] = t, 1
            running.append(r)
        for r in [r for r in running if r["gen"] >= out]:
            running.remove(r)
            done.append(r)
            send(t, delay_ms / 1e3)
    ttft = sorted((r["first"] - r["arrive"]) * 1e3 for r in done)
    return {"ttft_p50_ms": round(statistics.median(ttft)), "ttft_max_ms": round(ttft[-1]),
            "output_tok_s": round(len(done) * out / t, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-ms", type=float, nargs=2, default=[16.59, 8.09], metavar=("FA3", "PRESCORE"))
    ap.add_argument("--prefill-s", type=float, nargs=2, default=[1.18, 1.24], metavar=("FA3", "PRESCORE"))
    ap.add_argument("--delays-ms", default="0,25,50,100")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args(argv)
    print(f"{'delay ms':>8} | {'FA3 TTFT p50':>12} {'tok/s':>7} | {'prescore TTFT p50':>17} {'tok/s':>7} | p50 ratio")
    for d in (float(x) for x in a.delays_ms.split(",")):
        f, p = (simulate(dm, ps, d, requests=a.requests, conc=a.concurrency)
                for dm, ps in zip(a.decode_ms, a.prefill_s))
        print(f"{d:8.0f} | {f['ttft_p50_ms']:12d} {f['output_tok_s']:7.1f} | {p['ttft_p50_ms']:17d} "
              f"{p['output_tok_s']:7.1f} | {p['ttft_p50_ms'] / f['ttft_p50_ms']:.2f}x")


if __name__ == "__main__":
    main()
