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
        d = json.loads(Path(f).read_text())
        m = re.match(r"bench-([A-Za-z_]+)-(\w+?)(?:-(request|step|async))?\.json", Path(f).name)
        be, budget, clock = m.group(1), m.group(2), m.group(3)
        prescore = be.lower() == "prescore"
        rows.append({"backend": "PRESCORE" if prescore else be, "mode": a.mode if prescore else None,
                     "reselect_clock": ("step" if clock == "step" else "request") if prescore else None,
                     "reselect_async": clock == "async" if prescore else None,
                     "budget": int(budget) if prescore else None, "concurrency": d.get("max_concurrency"),
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
