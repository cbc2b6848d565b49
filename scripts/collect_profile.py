#!/usr/bin/env python3
"""One decode step's anatomy as a table: per-kernel device time per step and per layer, one column per profile
(scripts/profile_h100.py --out JSON, one engine each, same lease), rows sorted by the first profile.

    python3 scripts/collect_profile.py --layers 32 --out results/profile-h100.md \
        NAME=results/h100/profile-PRESCORE-hybrid.json NAME2=... FA3=results/h100/profile-FLASH_ATTN-none.json

Kernels under --min-us per step in every column are summed into one `other` row. Device times of kernels on a
side stream overlap the main stream, so the column sums can exceed the wall time per step (also printed).
"""

from __future__ import annotations

import argparse
import json


def table(profiles: dict[str, dict], layers: int, min_us: float = 20.0, command: str | None = None) -> str:
    names = list(profiles)
    per = {n: {k["name"]: k for k in p["profile"]["kernels"]} for n, p in profiles.items()}
    order = []
    for n in names:
        for k in sorted(per[n].values(), key=lambda k: -k["us_per_step"]):
            if k["name"] not in order:
                order.append(k["name"])
    head = "| kernel | " + " | ".join(f"{n}: us/step (calls) | us/layer" for n in names) + " |"
    lines = [head, "|---|" + "---|---|" * len(names)]
    other = {n: 0.0 for n in names}
    for name in order:
        vals = [per[n].get(name) for n in names]
        if all(v is None or v["us_per_step"] < min_us for v in vals):
            for n, v in zip(names, vals):
                other[n] += v["us_per_step"] if v else 0.0
            continue
        cells = []
        for v in vals:
            cells.append("" if v is None else f"{v['us_per_step']:.1f} ({v['calls_per_step']:g})")
            cells.append("" if v is None else f"{v['us_per_step'] / layers:.1f}")
        lines.append(f"| `{name[:70]}` | " + " | ".join(cells) + " |")
    lines.append("| other (each < %g us/step) | " % min_us
                 + " | ".join(f"{other[n]:.1f} | {other[n] / layers:.1f}" for n in names) + " |")
    lines.append("| **device total** | " + " | ".join(
        f"**{profiles[n]['profile']['device_ms_per_step'] * 1e3:.0f}** | {profiles[n]['profile']['device_ms_per_step'] * 1e3 / layers:.1f}"
        for n in names) + " |")
    lines.append("| wall per step (profiled, in-process engine) | " + " | ".join(
        f"{profiles[n]['profile']['wall_ms_per_step'] * 1e3:.0f} | " for n in names) + " |")
    step = [next((r["step_ms"] for r in profiles[n].get("runs", []) if r.get("budget") == profiles[n]["profile"].get("budget")), None)
            for n in names]
    lines.append("| step ms (timed, no profiler) | " + " | ".join(f"{s} | " if s is not None else " | " for s in step) + " |")
    meta = "; ".join(f"{n}: {profiles[n].get('device')}, vLLM {profiles[n].get('vllm')}, budget "
                     f"{profiles[n]['profile'].get('budget')}, config {profiles[n]['profile'].get('config')}" for n in names)
    out = "\n".join(lines) + f"\n\n{meta}\n"
    if command:
        out += f"\nCommand: `{command}`\n"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+", help="NAME=path.json")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--min-us", type=float, default=20.0)
    ap.add_argument("--command")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    profiles = {}
    for item in a.profiles:
        name, _, path = item.partition("=")
        profiles[name] = json.load(open(path))
    text = table(profiles, a.layers, a.min_us, a.command)
    if a.out:
        open(a.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
