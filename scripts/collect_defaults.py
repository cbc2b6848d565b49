#!/usr/bin/env python3
"""Issue 15's result file from one GPU run of scripts/defaults_h100.sh:

    python3 scripts/collect_defaults.py --part1 D/defaults-part1.json --prefix D/prefix.json --dense D/dense.json \
        --out results/defaults-h100.json

part1: the `vllm serve` start with no flags but the backend (scripts/defaults_h100.sh); prefix:
scripts/prefix_cache_check.py; dense: scripts/identity_h100.py --compare-dense (FA3 base, TRITON_ATTN noise
floor, PRESCORE budget >= context and budget 0). A part that did not run leaves its keys null.
Keys: vllm, device, max_num_seqs, kv_cache_tokens_prescore, kv_cache_tokens_flash_attn, start_ok,
prefix_cache_sparse, dense_identical, dense_detail (+ prefix_detail, sparse_rows, prescore_memory_line, start_s_*,
kv_capacity_vs_flash_attn, prefix_control_flash_attn, command).
"""

from __future__ import annotations

import argparse
import json
import os


def _load(path):
    return json.load(open(path)) if path and os.path.exists(path) else {}


def collect(part1: dict, prefix: dict, dense: dict, command: str | None = None, control: dict | None = None) -> dict:
    kp, kf = part1.get("kv_cache_tokens_prescore"), part1.get("kv_cache_tokens_flash_attn")
    return {"vllm": part1.get("vllm") or prefix.get("prefix_detail", {}).get("vllm"),
            "device": part1.get("device"), "max_num_seqs": part1.get("max_num_seqs"),
            "kv_cache_tokens_prescore": kp, "kv_cache_tokens_flash_attn": kf,
            "kv_capacity_vs_flash_attn": round(kp / kf, 4) if kp and kf else None,
            "start_ok": part1.get("start_ok"), "sparse_rows": part1.get("sparse_rows"),
            "start_s_prescore": part1.get("start_s_prescore"), "start_s_flash_attn": part1.get("start_s_flash_attn"),
            "prescore_memory_line": part1.get("prescore_memory_line"),
            "prefix_cache_sparse": prefix.get("prefix_cache_sparse"), "prefix_detail": prefix.get("prefix_detail"),
            "prefix_control_flash_attn": (control or {}).get("prefix_detail"),
            "dense_identical": dense.get("dense_identical"), "dense_detail": dense.get("dense_detail"),
            "command": command or "bash scripts/defaults_h100.sh OUT, then scripts/collect_defaults.py"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part1")
    ap.add_argument("--prefix")
    ap.add_argument("--dense")
    ap.add_argument("--prefix-control", help="prefix_cache_check.py --backend FLASH_ATTN (the dense control)")
    ap.add_argument("--command")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = collect(_load(a.part1), _load(a.prefix), _load(a.dense), a.command, _load(a.prefix_control))
    json.dump(res, open(a.out, "w"), indent=1)
    print(json.dumps({k: v for k, v in res.items()
                      if k not in ("dense_detail", "prefix_detail", "prefix_control_flash_attn")}))


if __name__ == "__main__":
    main()
