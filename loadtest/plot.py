"""PNG plots of a load-test report: latency vs budget and throughput vs budget.

    python -m prescore.loadtest.plot results/loadtest-h100.json     # writes results/loadtest-h100-*.png
"""

from __future__ import annotations

import json
import sys


def plot(report: dict, prefix: str) -> list[str]:
    """Write ``<prefix>-latency.png`` and ``<prefix>-throughput.png``; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    rows, details = report["rows"], report["details"]
    labels = [str(r["budget"]) for r in rows]
    x = list(range(len(rows)))
    title = (f"{report['config'].get('model', '')}: ~{report['config'].get('prompt_tokens')} prompt tokens, "
             f"{report['config'].get('concurrency')} concurrent")
    nz = lambda v: float("nan") if v is None else v  # noqa: E731

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(x, [nz(r["ttft_p50_s"]) for r in rows], "o-", label="p50")
    a1.plot(x, [nz(d["ttft_s"]["p90"]) for d in details], "s--", label="p90")
    a1.plot(x, [nz(r["ttft_p99_s"]) for r in rows], "^-", label="p99")
    a1.set_title("TTFT")
    a1.set_ylabel("seconds")
    a2.plot(x, [nz(r["tpot_p50_ms"]) for r in rows], "o-", label="TPOT p50")
    a2.plot(x, [nz(r["tpot_p99_ms"]) for r in rows], "^-", label="TPOT p99")
    a2.plot(x, [nz(d["itl_ms"]["p99"]) for d in details], "x:", label="ITL p99")
    a2.set_title("Time per output token")
    a2.set_ylabel("ms")
    for a in (a1, a2):
        a.set_xticks(x, labels)
        a.set_xlabel("key budget (tokens)")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    lat = f"{prefix}-latency.png"
    fig.savefig(lat, dpi=110)
    plt.close(fig)

    fig, a = plt.subplots(figsize=(6, 4))
    a.bar(x, [nz(r["output_tok_s"]) for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        if r["output_tok_s"] is not None:
            a.annotate(f"{r['output_tok_s']:.0f}", (i, r["output_tok_s"]), ha="center", va="bottom", fontsize=8)
    a.set_xticks(x, labels)
    a.set_xlabel("key budget (tokens)")
    a.set_ylabel("output tokens / s")
    a.set_title("Output throughput", fontsize=10)
    a.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    thr = f"{prefix}-throughput.png"
    fig.savefig(thr, dpi=110)
    plt.close(fig)
    return [lat, thr]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = argv[0]
    with open(path) as f:
        report = json.load(f)
    for p in plot(report, path[:-5] if path.endswith(".json") else path):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
