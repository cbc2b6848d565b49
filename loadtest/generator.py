"""Async load generator for OpenAI-compatible servers (prescore-serve, vllm serve, others), by key budget.

    prescore-loadtest --base-url http://127.0.0.1:8000 --budgets dense,4096,2048,512 \\
        --requests 100 --concurrency 16 --prompt-tokens 16384 --output-tokens 128 --out results/loadtest.json

Each budget is a phase (a sweep; ``--mix`` sends one phase with budgets drawn at random per request). Requests
stream (``stream_options.include_usage``) so TTFT, TPOT, ITL and end-to-end latency are measured per request.
Load: ``--concurrency N`` workers, or ``--request-rate R`` Poisson arrivals (capped by ``--concurrency``).
Prompts: windows of ``--prompt-tokens`` tokens cut at random offsets from real text (``--text``; default the
shipped public-domain excerpt), exact when the server has vLLM's ``/tokenize`` (completions then send token
ids), else cut by characters at the measured characters-per-token.

Budget on the wire: ``--budget-field key_budget`` (prescore-serve; 0 = dense) or ``vllm_xargs`` (stock ``vllm
serve --attention-backend prescore``: ``vllm_xargs.prescore_budget``). ``default`` in ``--budgets`` sends none.

Output: JSON (``rows``: one per budget with exactly ``budget, requests, errors, ttft_p50_s, ttft_p99_s,
tpot_p50_ms, tpot_p99_ms, output_tok_s``; ``details``: p50/p90/p99 of TTFT, TPOT, ITL and E2E, goodput
against ``--slo-*``, errors by kind, lost requests), a Markdown table next to it (``.md``) and PNG plots
(``-latency.png``, ``-throughput.png``; needs matplotlib). Bounded: at most ``--requests`` per phase and
``--duration-s`` per phase; per-request ``--timeout-s``. Exit status 1 when any request errored or was lost
(``--allow-errors`` to exit 0 anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TEXT = HERE / "data" / "moby-dick-ch1-20.txt"
ROW_KEYS = ("budget", "requests", "errors", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms",
            "output_tok_s")


# ------------------------------------------------------------------------------------------------- helpers

def parse_budgets(spec: str) -> list:
    """'dense,4096,2048,512' -> ['dense', 4096, 2048, 512]; also 'default' (send no budget) and '0' (dense)."""
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("dense", "0"):
            out.append("dense")
        elif part in ("default", "none"):
            out.append("default")
        else:
            n = int(part)
            if n < 0:
                raise argparse.ArgumentTypeError(f"budget must be >= 0, got {n}")
            out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("no budgets given")
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "mean": (sum(values) / len(values)) if values else None, "n": len(values)}


def _round(x, nd=4):
    return None if x is None else round(x, nd)


def read_texts(paths: list[str]) -> str:
    parts = []
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*.txt")) if p.is_dir() else [p]
        for f in files:
            parts.append(f.read_text(encoding="utf-8", errors="replace"))
    text = "\n\n".join(t.strip() for t in parts if t.strip())
    if not text:
        raise SystemExit(f"no text found in {paths}")
    return text


# ------------------------------------------------------------------------------------------------- prompts

class Prompts:
    """Windows of ~n tokens at random offsets in the text (token ids when the server can tokenize)."""

    def __init__(self, text: str, seed: int):
        self.text, self.seed = text, seed
        self.ids: list[int] | None = None
        self.chars_per_token = 4.0

    async def calibrate(self, client, base: str, model: str, headers: dict) -> None:
        try:
            r = await client.post(base + "/tokenize", headers=headers, timeout=120,
                                  json={"model": model, "prompt": self.text, "add_special_tokens": False})
            if r.status_code == 200 and r.json().get("tokens"):
                self.ids = r.json()["tokens"]
                self.chars_per_token = len(self.text) / len(self.ids)
        except Exception:  # noqa: BLE001 - not vLLM: cut by characters
            self.ids = None

    def get(self, i: int, n_tokens: int, as_ids: bool):
        rng = random.Random(self.seed * 1_000_003 + i)
        if self.ids is not None and as_ids:
            ids = self.ids
            reps = n_tokens // len(ids) + 2
            start = rng.randrange(len(ids))
            return (ids * reps)[start:start + n_tokens]
        n_chars = max(1, int(n_tokens * self.chars_per_token))
        reps = n_chars // len(self.text) + 2
        start = rng.randrange(len(self.text))
        return (self.text * reps)[start:start + n_chars]


# ------------------------------------------------------------------------------------------------ requests

@dataclass
class Result:
    budget: object
    ok: bool = False
    error: str | None = None
    detail: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    applied_budget: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def budget_body(budget, field_: str) -> dict:
    if budget == "default":
        return {}
    n = 0 if budget == "dense" else int(budget)
    if field_ == "vllm_xargs":
        return {"vllm_xargs": {"prescore_budget": n}}
    return {"key_budget": n}


async def one_request(client, cfg, prompt, budget) -> Result:
    import httpx

    res = Result(budget=budget)
    chat = cfg.endpoint == "chat"
    url = cfg.base_url + ("/v1/chat/completions" if chat else "/v1/completions")
    body = {"model": cfg.model, "max_tokens": cfg.output_tokens, "stream": True, "temperature": cfg.temperature,
            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(budget_body(budget, cfg.budget_field))
    if cfg.extra_body:
        body.update(cfg.extra_body)
    t0 = time.perf_counter()
    last = None
    done = False
    try:
        async with client.stream("POST", url, json=body, headers=cfg.headers, timeout=cfg.timeout_s) as r:
            res.status = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.error = f"http_{r.status_code // 100}xx"
                res.detail = f"{r.status_code}: {text[:300]}"
                return res
            res.applied_budget = r.headers.get("x-prescore-budget")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error, res.detail = "stream_error", str(obj["error"])[:300]
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"].get("completion_tokens") or 0
                    res.prompt_tokens = obj["usage"].get("prompt_tokens")
                for ch in obj.get("choices") or []:
                    if chat:
                        delta = ch.get("delta") or {}
                        is_token = delta.get("content") is not None and not ("role" in delta and not delta["content"])
                    else:
                        is_token = ch.get("text") is not None
                    if is_token:
                        now = time.perf_counter()
                        if res.ttft_s is None:
                            res.ttft_s = now - t0
                        else:
                            res.itl_s.append(now - last)
                        last = now
                        break
    except httpx.TimeoutException as e:
        res.error, res.detail = "timeout", repr(e)[:300]
        return res
    except httpx.ConnectError as e:
        res.error, res.detail = "connect", repr(e)[:300]
        return res
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
        res.error, res.detail = "protocol", repr(e)[:300]
        return res
    except json.JSONDecodeError as e:
        res.error, res.detail = "bad_stream", repr(e)[:300]
        return res
    except Exception as e:  # noqa: BLE001 - counted, never lost
        res.error, res.detail = "other", repr(e)[:300]
        return res
    res.e2e_s = time.perf_counter() - t0
    if not done:
        res.error = "incomplete_stream"
    elif res.ttft_s is None:
        res.error = "no_tokens"
    elif cfg.ignore_eos and res.output_tokens != cfg.output_tokens:
        res.error, res.detail = "short_output", f"{res.output_tokens} of {cfg.output_tokens} tokens"
    elif (res.applied_budget is not None and budget != "default"
          and res.applied_budget != str(0 if budget == "dense" else budget)):
        res.error, res.detail = "budget_mismatch", f"asked {budget}, server applied {res.applied_budget}"
    else:
        res.ok = True
    return res


async def run_phase(client, cfg, prompts: Prompts, budgets_per_request: list, label: str, first_index: int):
    """Send the requests (concurrency or Poisson); return (results, launched, duration_s, not_sent)."""
    sem = asyncio.Semaphore(cfg.concurrency)
    results: list[Result] = []
    launched = 0
    bar = None
    if cfg.progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(budgets_per_request), desc=label, unit="req", file=sys.stderr, leave=True)
        except ImportError:
            bar = None
    rng = random.Random(cfg.seed + first_index)
    as_ids = cfg.endpoint == "completions"
    t_start = time.perf_counter()

    async def task(i, budget):
        try:
            res = await one_request(client, cfg, prompts.get(first_index + i, cfg.prompt_tokens, as_ids), budget)
        finally:
            sem.release()
        results.append(res)
        if bar is not None:
            bar.update(1)

    tasks = []
    not_sent = 0
    for i, budget in enumerate(budgets_per_request):
        if cfg.request_rate:
            await asyncio.sleep(rng.expovariate(cfg.request_rate))
        await sem.acquire()
        if time.perf_counter() - t_start > cfg.duration_s:
            sem.release()
            not_sent = len(budgets_per_request) - i
            break
        launched += 1
        tasks.append(asyncio.create_task(task(i, budget)))
    await asyncio.gather(*tasks, return_exceptions=True)
    duration = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    return results, launched, duration, not_sent


# ------------------------------------------------------------------------------------------------- reports

def budget_label(b):
    return b if isinstance(b, str) else int(b)


def phase_stats(budget, results: list[Result], launched: int, duration: float, not_sent: int, cfg) -> dict:
    ok = [r for r in results if r.ok]
    errs: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            errs[r.error] = errs.get(r.error, 0) + 1
            samples.setdefault(r.error, r.detail or "")
    ttft = [r.ttft_s for r in ok]
    tpot = [r.tpot_s * 1000 for r in ok if r.tpot_s is not None]
    itl = [x * 1000 for r in ok for x in r.itl_s]
    e2e = [r.e2e_s for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def good(r):
        return ((cfg.slo_ttft_s is None or r.ttft_s <= cfg.slo_ttft_s)
                and (cfg.slo_tpot_ms is None or (r.tpot_s or 0) * 1000 <= cfg.slo_tpot_ms)
                and (cfg.slo_e2e_s is None or r.e2e_s <= cfg.slo_e2e_s))

    n_good = sum(1 for r in ok if good(r))
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "budget": budget_label(budget), "requests": launched, "ok": len(ok), "errors": len(results) - len(ok),
        "lost": launched - len(results), "not_sent": not_sent, "errors_by_kind": errs, "error_samples": samples,
        "duration_s": _round(duration), "output_tokens": out_tokens,
        "output_tok_s": _round(out_tokens / duration if duration > 0 else 0.0, 2),
        "request_throughput": _round(len(ok) / duration if duration > 0 else 0.0, 3),
        "goodput_rps": _round(n_good / duration if duration > 0 else 0.0, 3),
        "slo_attainment": _round(n_good / launched if launched else 0.0, 4),
        "prompt_tokens_mean": _round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
        "ttft_s": {k: _round(v, 5) for k, v in summary(ttft).items()},
        "tpot_ms": {k: _round(v, 3) for k, v in summary(tpot).items()},
        "itl_ms": {k: _round(v, 3) for k, v in summary(itl).items()},
        "e2e_s": {k: _round(v, 4) for k, v in summary(e2e).items()},
    }


def row(d: dict) -> dict:
    """The fixed-key row for one budget."""
    return {"budget": d["budget"], "requests": d["requests"], "errors": d["errors"] + d["lost"],
            "ttft_p50_s": d["ttft_s"]["p50"], "ttft_p99_s": d["ttft_s"]["p99"],
            "tpot_p50_ms": d["tpot_ms"]["p50"], "tpot_p99_ms": d["tpot_ms"]["p99"],
            "output_tok_s": d["output_tok_s"]}


def markdown(report: dict) -> str:
    def f(x, nd):
        return "-" if x is None else f"{x:.{nd}f}"

    c = report["config"]
    lines = [f"Load test: {c['model']} at {c['base_url']}, {c['endpoint']}, prompt ~{c['prompt_tokens']} tokens, "
             f"{c['output_tokens']} output tokens, "
             + (f"Poisson {c['request_rate']} req/s (max {c['concurrency']} in flight)" if c["request_rate"]
                else f"{c['concurrency']} concurrent") + ("; budgets mixed per request" if c["mix"] else "") + ".",
             "",
             "| budget | requests | errors | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) | ITL p99 (ms) "
             "| E2E p99 (s) | output tok/s | goodput (req/s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r, d in zip(report["rows"], report["details"]):
        lines.append(f"| {r['budget']} | {r['requests']} | {r['errors']} | {f(r['ttft_p50_s'], 3)} | "
                     f"{f(r['ttft_p99_s'], 3)} | {f(r['tpot_p50_ms'], 2)} | {f(r['tpot_p99_ms'], 2)} | "
                     f"{f(d['itl_ms']['p99'], 2)} | {f(d['e2e_s']['p99'], 3)} | {f(r['output_tok_s'], 1)} | "
                     f"{f(d['goodput_rps'], 3)} |")
    t = report["totals"]
    lines += ["", f"Totals: {t['requests']} requests, {t['ok']} ok, {t['errors']} errors, {t['lost']} lost."]
    if any(d["errors_by_kind"] for d in report["details"]):
        for d in report["details"]:
            for kind, n in d["errors_by_kind"].items():
                lines.append(f"- budget {d['budget']}: {n} x {kind} (e.g. {d['error_samples'].get(kind, '')[:160]})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main

@dataclass
class Config:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    endpoint: str = "completions"
    budgets: list = field(default_factory=lambda: ["dense", 4096, 2048, 512])
    budget_field: str = "key_budget"
    mix: bool = False
    requests: int = 100
    warmup: int = 0
    concurrency: int = 16
    request_rate: float | None = None
    prompt_tokens: int = 1024
    output_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = True
    text: list = field(default_factory=lambda: [str(DEFAULT_TEXT)])
    seed: int = 0
    duration_s: float = 600.0
    timeout_s: float = 600.0
    slo_ttft_s: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_s: float | None = None
    api_key: str | None = None
    extra_body: dict | None = None
    progress: bool = True

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def run(cfg: Config) -> dict:
    import httpx

    cfg.base_url = cfg.base_url.rstrip("/").removesuffix("/v1")
    limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=cfg.timeout_s) as client:
        if cfg.model is None:
            r = await client.get(cfg.base_url + "/v1/models", headers=cfg.headers, timeout=60)
            r.raise_for_status()
            cfg.model = r.json()["data"][0]["id"]
        prompts = Prompts(read_texts(cfg.text), cfg.seed)
        await prompts.calibrate(client, cfg.base_url, cfg.model, cfg.headers)
        if cfg.mix:
            rng = random.Random(cfg.seed)
            phases = [("mix", [rng.choice(cfg.budgets) for _ in range(cfg.requests)])]
        else:
            phases = [(f"budget={b}", [b] * cfg.requests) for b in cfg.budgets]
        details = []
        index = 0
        for label, plan in phases:
            if cfg.warmup:
                await run_phase(client, cfg, prompts, plan[:1] * cfg.warmup, f"{label} warmup", 10**6 + index)
            results, launched, duration, not_sent = await run_phase(client, cfg, prompts, plan, label, index)
            index += len(plan)
            if cfg.mix:
                for b in cfg.budgets:
                    sub = [r for r in results if r.budget == b]
                    n = sum(1 for x in plan[:launched] if x == b)
                    details.append(phase_stats(b, sub, n, duration, sum(1 for x in plan[launched:] if x == b), cfg))
            else:
                details.append(phase_stats(plan[0], results, launched, duration, not_sent, cfg))
    cfgd = asdict(cfg)
    cfgd.pop("api_key", None)
    cfgd["budgets"] = [budget_label(b) for b in cfg.budgets]
    cfgd["tokenized_prompts"] = prompts.ids is not None and cfg.endpoint == "completions"
    totals = {k: sum(d[k] for d in details) for k in ("requests", "ok", "errors", "lost", "not_sent")}
    return {"config": cfgd, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": [row(d) for d in details], "details": details, "totals": totals}


def write_outputs(report: dict, out: str | None, plots: bool = True) -> list[str]:
    written = []
    md = markdown(report)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(md)
        written += [str(path), str(path.with_suffix(".md"))]
        if plots:
            from .plot import plot

            written += plot(report, str(path.with_suffix("")))
    return written


def build_parser() -> argparse.ArgumentParser:
    c = Config()
    p = argparse.ArgumentParser(prog="prescore-loadtest", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default=c.base_url, help="server root (with or without /v1)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default=c.endpoint)
    p.add_argument("--budgets", type=parse_budgets, default=c.budgets,
                   help="comma list: dense (= 0), default (send none), or token counts; default dense,4096,2048,512")
    p.add_argument("--budget-field", choices=("key_budget", "vllm_xargs"), default=c.budget_field)
    p.add_argument("--mix", action="store_true", help="one phase, a random budget per request (else a sweep)")
    p.add_argument("--requests", type=int, default=c.requests, help="requests per phase (<= 100000)")
    p.add_argument("--warmup", type=int, default=c.warmup, help="unmeasured requests before each phase")
    p.add_argument("--concurrency", type=int, default=c.concurrency, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (else closed loop)")
    p.add_argument("--prompt-tokens", type=int, default=c.prompt_tokens)
    p.add_argument("--output-tokens", type=int, default=c.output_tokens)
    p.add_argument("--temperature", type=float, default=c.temperature)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send vLLM's ignore_eos (non-vLLM servers); output lengths then vary")
    p.add_argument("--text", action="append", default=None,
                   help=f"text file or folder of .txt (repeatable; default {DEFAULT_TEXT.name})")
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--duration-s", type=float, default=c.duration_s, help="stop sending after this per phase")
    p.add_argument("--timeout-s", type=float, default=c.timeout_s, help="per request")
    p.add_argument("--slo-ttft-s", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2e-s", type=float, default=None)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default $OPENAI_API_KEY")
    p.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request body")
    p.add_argument("--out", default="results/loadtest.json", help="JSON report (.md and plots next to it)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-errors", action="store_true", help="exit 0 even when requests failed or were lost")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not 1 <= a.requests <= 100_000 or a.concurrency < 1 or a.prompt_tokens < 1 or a.output_tokens < 1:
        raise SystemExit("need 1 <= --requests <= 100000, --concurrency >= 1, --prompt-tokens/--output-tokens >= 1")
    cfg = Config(base_url=a.base_url, model=a.model, endpoint=a.endpoint, budgets=a.budgets,
                 budget_field=a.budget_field, mix=a.mix, requests=a.requests, warmup=a.warmup,
                 concurrency=a.concurrency, request_rate=a.request_rate, prompt_tokens=a.prompt_tokens,
                 output_tokens=a.output_tokens, temperature=a.temperature, ignore_eos=a.ignore_eos,
                 text=a.text or [str(DEFAULT_TEXT)], seed=a.seed, duration_s=a.duration_s, timeout_s=a.timeout_s,
                 slo_ttft_s=a.slo_ttft_s, slo_tpot_ms=a.slo_tpot_ms, slo_e2e_s=a.slo_e2e_s, api_key=a.api_key,
                 extra_body=a.extra_body, progress=not a.no_progress)
    report = asyncio.run(run(cfg))
    for path in write_outputs(report, a.out, plots=not a.no_plots):
        print(f"wrote {path}", file=sys.stderr)
    print(markdown(report))
    t = report["totals"]
    return 0 if a.allow_errors or (t["errors"] == 0 and t["lost"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
