#!/usr/bin/env python3
"""Collect `vllm bench serve` result files (scripts/serve_bench.sh) into results/serve-bench-h100.json:
{"vllm", "device", "rows": [{"backend", "mode", "budget", "concurrency", "requests", "errors", "output_tok_s",
"ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"}]} plus ratios against the FA3 row.

    python3 scripts/collect_serve_bench.py --device "NVIDIA H100 80GB HBM3" --vllm 0.33.0 \
        --out results/serve-bench-h100.json RUN/bench-*.json
"""
import argparse
import json
import re
from pathlib import Path


def settings(bench: Path, variant: str) -> dict:
    """prescore's server settings for a run: the `request defaults: k=v, ...` line of its server log
    (server-TAG.log beside bench-TAG.json), else the package defaults with the file name's variant (step, async)."""
    log = bench.with_name("server-" + bench.stem[len("bench-"):] + ".log")
    m = re.search(r"request defaults: ([^\n]*)", log.read_text(errors="replace")) if log.exists() else None
    if m:
        kv = dict(re.findall(r"(\w+)=(\([^)]*\)|[^,]+)", m.group(1)))
    else:
        try:
            from dataclasses import asdict

            from prescore.backend.params import PrescoreParams
            kv = {k: str(v) for k, v in asdict(PrescoreParams()).items()}
        except ImportError:
            kv = {}
        kv.update({"step": {"reselect_clock": "step"}, "async": {"reselect_async": "True"}}.get(variant, {}))
    out = {k: kv[k].strip() for k in ("mode", "reselect_clock") if k in kv}
    if "reselect_every" in kv:
        out["reselect_every"] = int(kv["reselect_every"])
    if "reselect_async" in kv:
        out["reselect_async"] = kv["reselect_async"].strip() == "True"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--vllm", required=True)
    ap.add_argument("--mode", default="hybrid", help="prescore's mode in these runs (the server default)")
    ap.add_argument("--input-len", type=int, default=32768, help="the run's --random-input-len (serve_bench INLEN)")
    ap.add_argument("--output-len", type=int, default=1024, help="the run's --random-output-len (OUTLEN)")
    ap.add_argument("--command", help="the command that produced the files (kept in OUT)")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    rows = []
    for f in a.files:
        f = Path(f)
        d = json.loads(f.read_text())
        be, _, rest = f.stem[len("bench-"):].partition("-")
        budget, _, variant = rest.partition("-")
        prescore = be.lower() == "prescore"
        s = settings(f, variant) if prescore else {}
        rows.append({"backend": "PRESCORE" if prescore else be, "mode": s.get("mode", a.mode) if prescore else None,
                     "reselect_every": s.get("reselect_every"), "reselect_clock": s.get("reselect_clock"),
                     "reselect_async": s.get("reselect_async"), "variant": variant or None,
                     "budget": int(budget) if prescore else None, "concurrency": d.get("max_concurrency"),
                     "request_rate": d.get("request_rate"),
                     "requests": d.get("num_prompts"), "completed": d.get("completed"),
                     "errors": (d.get("num_prompts") or 0) - (d.get("completed") or 0),
                     "output_tok_s": round(d["output_throughput"], 1),
                     "ttft_p50_ms": round(d["p50_ttft_ms"], 1), "ttft_p99_ms": round(d["p99_ttft_ms"], 1),
                     "tpot_p50_ms": round(d["p50_tpot_ms"], 2), "tpot_p99_ms": round(d["p99_tpot_ms"], 2),
                     "itl_p50_ms": round(d["p50_itl_ms"], 2), "e2el_p99_ms": round(d["p99_e2el_ms"], 1),
                     "input_len": d.get("random_input_len") or a.input_len,
                     "output_len": d.get("random_output_len") or a.output_len})
    base = next((r for r in rows if r["backend"] == "FLASH_ATTN"), None)
    if base:
        for r in rows:
            r["vs_fa3"] = {k: round(r[k] / base[k], 3) for k in ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
                                                                   "tpot_p50_ms", "tpot_p99_ms")}
    out = {"vllm": a.vllm, "device": a.device, "command": a.command or "bash scripts/serve_bench.sh RUN; "
           "python3 scripts/collect_serve_bench.py --out results/serve-bench-h100.json RUN/bench-*.json",
           "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
