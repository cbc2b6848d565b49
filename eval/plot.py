"""Per-budget curves of a ``prescore-eval`` result: budget vs accuracy (with the Wilson interval) or vs the
perplexity ratio to dense, one panel per (task, context), one line per mode/config label (dense as a flat line,
sink+window included), so a user can pick a budget.

    prescore-eval plot results/quality-qwen2.5-coder-0.5b.json     # writes results/quality-qwen2.5-coder-0.5b.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def png_path(json_path: str | Path) -> Path:
    p = Path(json_path)
    return p.with_suffix(".png") if p.suffix == ".json" else p.with_name(p.name + ".png")


def plot(result: dict, out: str | Path) -> str | None:
    """Write the curves of ``result`` (a prescore-eval JSON) to ``out``; None when matplotlib is missing or
    there is nothing with a budget to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    from .engine import config_label

    rows = result["rows"]
    panels = sorted({(r["task"], r["context"]) for r in rows}, key=lambda k: (k[0] != "ppl", k[0], k[1]))
    panels = [p for p in panels if any(r["budget"] is not None for r in rows if (r["task"], r["context"]) == p)]
    if not panels:
        return None
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (task, ctx) in zip(axes.flat, panels):
        sub = [r for r in rows if (r["task"], r["context"]) == (task, ctx)]
        budgets = sorted({r["budget"] for r in sub if r["budget"] is not None})
        ppl = task == "ppl"
        y = (lambda r: r.get("ratio_to_dense") or float("nan")) if ppl else (lambda r: r["value"])  # noqa: E731
        labels: list[tuple] = []
        for r in sub:
            k = (r["method"], r["mode"], r.get("variant"))
            if r["budget"] is not None and k not in labels:
                labels.append(k)
        for k in labels:
            pts = sorted((r["budget"], r) for r in sub
                         if (r["method"], r["mode"], r.get("variant")) == k and r["budget"] is not None)
            xs, ys = [b for b, _ in pts], [y(r) for _, r in pts]
            style = ":" if k[1] == "static" else "-"
            line, = ax.plot(xs, ys, style, marker="o", ms=3, label=config_label(*k))
            if not ppl and all("ci_low" in r for _, r in pts):
                ax.fill_between(xs, [r["ci_low"] for _, r in pts], [r["ci_high"] for _, r in pts],
                                color=line.get_color(), alpha=0.08)
        dense = [r for r in sub if r["budget"] is None]
        if dense:
            dv = 1.0 if ppl else dense[0]["value"]
            ax.axhline(dv, color="k", lw=1.2, ls="--", label="dense")
            if not ppl and "ci_low" in dense[0]:
                ax.axhspan(dense[0]["ci_low"], dense[0]["ci_high"], color="k", alpha=0.05)
        if len(budgets) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("key budget (tokens per KV head)")
        ax.set_ylabel("ppl / dense ppl" if ppl else "accuracy (95% Wilson band)")
        if not ppl:
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{task}, context {ctx}, {sub[0]['trials']} trials", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    s = result.get("settings", {})
    fig.suptitle(f"{result.get('model', '')} on {s.get('device_name', '?')}: sink {s.get('sink')} + window "
                 f"{s.get('window')} inside the budget", fontsize=9)
    fig.tight_layout()
    out = str(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    """``prescore-eval plot FILE.json [...]``: a PNG next to each JSON."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    rc = 0
    for p in argv:
        out = plot(json.loads(Path(p).read_text()), png_path(p))
        if out:
            print(out)
        else:
            rc = 1
    return rc


