#!/usr/bin/env python3
"""Build results/tp2-h200.json (issue 6) from the 2-GPU run's outputs, print the table.

    python3 scripts/collect_tp2.py --dir DIR            # finds everything below in DIR (default results/h200x2)
    python3 scripts/collect_tp2.py --e2e A.json B.json ... --identity identity-tp.json --http tp-http.json

Inputs
  e2e parts   files written by `scripts/e2e_h100.py --backend X --graphs --tensor-parallel-size N
              --workloads 8x32768 --budgets 2048 --out F` (scripts/tp2_runs.sh: DIR/e2e-tp{1,2}-{FLASH_ATTN,
              PRESCORE}.json); a part whose .json is missing is read from the ROW lines of its .log instead.
              Rows need backend, budget, tp (else taken from 'tpN' in the file name), step_ms, decode_tok_s.
  identity    DIR/identity-tp.json from `scripts/identity_h100.py --compare-tp ...` (scripts/tp_check.sh); if
              absent, computed from DIR/id-tp{1,2}-{FLASH_ATTN,PRESCORE}.json.
  http        DIR/tp-http.json (scripts/tp_check.sh): per-request statuses and per-TP-rank counters.

Output (--out, default results/tp2-h200.json): {"runs": [{"tp", "backend", "budget" (null for FLASH_ATTN),
"decode_tok_s", "step_ms", ...}], "greedy_identical_tp": bool, "device", "vllm", "speedup_tp1", "speedup_tp2",
"ratio" (speedup_tp2 / speedup_tp1; bar >= 0.9), "passes_bar", "command", "notes", ...}. speedup_tpN = FLASH_ATTN
step_ms / PRESCORE step_ms at TP=N (same batch, so = the decode tok/s ratio). When a part is missing it
prints what is missing and exits 1 without writing (--partial writes anyway, with a "missing" list).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

BAR = 0.9
BACKENDS = ("FLASH_ATTN", "PRESCORE")
DEFAULT_COMMAND = ("bash scripts/tp2_runs.sh DIR (scripts/e2e_h100.py --graphs --max-model-len 34000 --workloads "
                   "8x32768 --budgets 2048 --mode prior, TP=1 then TP=2, FLASH_ATTN and PRESCORE); "
                   "bash scripts/tp_check.sh QWEN_DIR DIR; python3 scripts/collect_tp2.py --dir DIR")


def _tp_from_name(path: str) -> int | None:
    m = re.search(r"tp(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def read_part(path: str) -> tuple[dict, list[dict]]:
    """(meta, rows) of one e2e part: the .json, else the ROW lines of the .log beside it."""
    p = Path(path)
    if p.suffix == ".json" and p.exists():
        d = json.loads(p.read_text())
        rows, meta = d.get("runs", []), {k: v for k, v in d.items() if k != "runs"}
        meta["source"] = p.name
    else:
        log = p.with_suffix(".log")
        rows, meta = [], {"source": f"{log.name} (ROW lines: the .json was not written)"}
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
            elif line.startswith("RESULT "):
                meta.update({k: v for k, v in json.loads(line[7:]).items() if k != "runs"})
            m = re.search(r"active on vLLM ([0-9.]+)", line)
            if m and "vllm" not in meta:
                meta["vllm"] = m.group(1)
    tp_name = _tp_from_name(path)
    for r in rows:
        r.setdefault("tp", tp_name or 1)
        r["_source"], r["_mtime"] = meta["source"], p.stat().st_mtime if p.exists() else log.stat().st_mtime
    return meta, rows


def find_parts(d: Path) -> list[str]:
    parts = sorted(glob.glob(str(d / "e2e-*.json")))
    for log in sorted(glob.glob(str(d / "e2e-*.log"))):
        if not Path(log).with_suffix(".json").exists():
            parts.append(str(Path(log).with_suffix(".json")))  # read_part falls back to the .log
    return parts


def identity_result(d: Path | None, path: str | None) -> tuple[dict | None, str | None]:
    if path and Path(path).exists():
        return json.loads(Path(path).read_text()), path
    if d is None:
        return None, None
    if (d / "identity-tp.json").exists():
        return json.loads((d / "identity-tp.json").read_text()), str(d / "identity-tp.json")
    files = [d / f"id-tp{tp}-{be}.json" for tp, be in ((1, "FLASH_ATTN"), (1, "PRESCORE"), (2, "PRESCORE"))]
    if all(f.exists() for f in files):
        if (d / "id-tp2-FLASH_ATTN.json").exists():
            files.append(d / "id-tp2-FLASH_ATTN.json")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import contextlib
        import io

        from identity_h100 import compare_tp

        with contextlib.redirect_stdout(io.StringIO()):
            return compare_tp([str(f) for f in files], None), "computed from " + ", ".join(f.name for f in files)
    return None, None


def http_summary(h: dict) -> dict:
    keep = ("pid", "process", "decode_rows_sparse", "decode_rows_dense", "prefill_rows", "prefill_tokens",
            "selected_tokens", "context_tokens", "attended_share")
    m = h.get("metrics_prescore")
    return {
        "ok": h.get("ok"),
        "command": h.get("command"),
        "requests": [{k: r.get(k) for k in ("budget", "key_budget", "status", "headers") if k in r}
                     | {"prompt_tokens": (r.get("usage") or {}).get("prompt_tokens")} for r in h.get("requests", [])],
        "bad_value": {k: h.get("bad_value", {}).get(k) for k in ("request", "status", "names_field", "body")},
        "per_rank": [{k: p.get(k) for k in keep if k in p} for p in h.get("processes", [])],
        "ranks_with_sparse_decode": h.get("ranks_with_sparse_decode"),
        "ranks_agree": h.get("ranks_agree"),
        "metrics_prescore": [l for l in m if "decode_rows" in l or "requests_total" in l] if isinstance(m, list) else m,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir_pos", nargs="?", help=argparse.SUPPRESS)  # old form: collect_tp2.py DIR
    ap.add_argument("--dir", help="folder holding the e2e parts, identity-tp.json / id-*.json and tp-http.json")
    ap.add_argument("--e2e", nargs="+", default=None, help="e2e part files (default: DIR/e2e-*.json)")
    ap.add_argument("--identity", help="identity_h100.py --compare-tp output (default DIR/identity-tp.json)")
    ap.add_argument("--http", help="tp_check.sh's tp-http.json (default DIR/tp-http.json)")
    ap.add_argument("--budget", type=int, default=2048, help="PRESCORE budget compared with FLASH_ATTN")
    ap.add_argument("--workload", default="8x32768", help="BATCHxPROMPT_LEN of the compared rows")
    ap.add_argument("--out", default="results/tp2-h200.json")
    ap.add_argument("--command", default=DEFAULT_COMMAND)
    ap.add_argument("--notes", default="", help="appended to the generated notes")
    ap.add_argument("--partial", action="store_true", help="write the output even when parts are missing")
    a = ap.parse_args(argv)
    d = a.dir or a.dir_pos or (None if a.e2e is not None else "results/h200x2")
    d = Path(d) if d else None
    missing: list[str] = []

    parts = a.e2e if a.e2e is not None else (find_parts(d) if d else [])
    meta: dict = {}
    rows: list[dict] = []
    for p in parts:
        try:
            m, r = read_part(p)
        except (OSError, ValueError) as e:
            missing.append(f"{p} (unreadable: {e})")
            continue
        meta.update({k: v for k, v in m.items() if v is not None and k != "source"})
        rows += r
    batch, plen = (int(x) for x in a.workload.split("x"))

    dropped = [r for r in rows if r.get("step_ms", 0) <= 0 or r.get("backend") not in BACKENDS]
    rows = [r for r in rows if r not in dropped]

    def pick(tp, be):
        """The compared row for (tp, backend): graphs on, the workload, PRESCORE at --budget; latest file wins."""
        c = [r for r in rows if r["tp"] == tp and r["backend"] == be and r.get("batch") == batch
             and r.get("prompt_len") == plen and r.get("cuda_graphs", True)
             and (be == "FLASH_ATTN" or r.get("budget") == a.budget)]
        return max(c, key=lambda r: r["_mtime"]) if c else None

    chosen = {(tp, be): pick(tp, be) for tp in (1, 2) for be in BACKENDS}
    for (tp, be), r in chosen.items():
        if r is None:
            missing.append(f"e2e row tp={tp} {be}" + (f" budget={a.budget}" if be == "PRESCORE" else "")
                           + f" {a.workload} graphs")

    def speedup(tp):
        fa, ps = chosen[(tp, "FLASH_ATTN")], chosen[(tp, "PRESCORE")]
        return round(fa["step_ms"] / ps["step_ms"], 3) if fa and ps else None

    s1, s2 = speedup(1), speedup(2)
    ratio = round(s2 / s1, 3) if s1 and s2 else None

    runs = []
    for r in sorted(rows, key=lambda r: (r["tp"], r["backend"] != "FLASH_ATTN", r.get("budget") or 0,
                                         r.get("prompt_len", 0))):
        row = {"tp": r["tp"], "backend": r["backend"],
               "budget": None if r["backend"] == "FLASH_ATTN" else r.get("budget"),
               "decode_tok_s": r["decode_tok_s"], "step_ms": r["step_ms"]}
        row.update({k: v for k, v in r.items() if k not in row and not k.startswith("_")})
        row["compared"] = any(r is c for c in chosen.values())
        row["source"] = r["_source"]
        runs.append(row)

    ident, ident_src = identity_result(d, a.identity)
    if ident is None:
        missing.append("identity (identity-tp.json or id-tp1-FLASH_ATTN / id-tp1-PRESCORE / id-tp2-PRESCORE .json)")
    http_path = a.http or (str(d / "tp-http.json") if d else None)
    http = json.loads(Path(http_path).read_text()) if http_path and Path(http_path).exists() else None
    if http is None:
        missing.append("tp-http.json")

    ngpu = max((r["tp"] for r in rows), default=1)
    device = meta.get("device")
    ps = chosen[(1, "PRESCORE")] or chosen[(2, "PRESCORE")] or {}
    notes = (f"Decode timing: scripts/e2e_h100.py, Llama-3-8B-shaped dummy weights (bf16), {batch} x {plen}-token "
             f"random prompts, CUDA graphs, PRESCORE budget {a.budget} (mode {ps.get('mode')}), FLASH_ATTN dense; "
             f"step_ms = {ps.get('timing') or 'decode step time'}; speedup_tpN = FLASH_ATTN step_ms / PRESCORE step_ms "
             f"at TP=N, ratio = speedup_tp2 / speedup_tp1 (bar >= {BAR}). TP=1 runs used one GPU each. "
             "greedy_identical_tp: real Qwen2.5-Coder-0.5B-Instruct (converted from its PyPI Q4_K_M GGUF, "
             "14 query / 2 KV heads), scripts/identity_h100.py (11 chat prompts x 64 greedy tokens, max_model_len "
             "8192): PRESCORE at TP=2 with budget >= context gives the same tokens as PRESCORE at TP=1 and as "
             "FLASH_ATTN at TP=1 on every prompt (greedy_detail has each pair, with the FLASH_ATTN TP=2 vs TP=1 "
             "control when it ran). http_tp2: vllm serve --attention-backend prescore --tensor-parallel-size 2, "
             "per-request vllm_xargs budgets, per-rank counters from PRESCORE_METRICS_DIR.")
    if a.notes:
        notes += " " + a.notes
    res = {
        "runs": runs,
        "greedy_identical_tp": bool(ident and ident.get("greedy_identical_tp")),
        "device": f"{ngpu} x {device}" if device and ngpu > 1 else device,
        "vllm": meta.get("vllm") or (ident or {}).get("vllm"),
        "speedup_tp1": s1, "speedup_tp2": s2, "ratio": ratio, "bar": BAR,
        "passes_bar": ratio is not None and ratio >= BAR,
        "greedy_detail": (ident or {}).get("detail"),
        "greedy_source": ident_src,
        "http_tp2": http_summary(http) if http else None,
        "command": a.command,
        "notes": notes,
    }
    if dropped:
        res["dropped_rows"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in dropped]
    if missing:
        res["missing"] = missing

    print(f"{'tp':>3} {'backend':11s} {'budget':>6} {'workload':>9} {'step ms':>9} {'tok/s':>8}  compared")
    for r in runs:
        print(f"{r['tp']:>3} {r['backend']:11s} {str(r['budget']):>6} {str(r.get('batch'))+'x'+str(r.get('prompt_len')):>9} "
              f"{r['step_ms']:9.3f} {r['decode_tok_s']:8.1f}  {'*' if r['compared'] else ''}")
    print(f"speedup tp1 {s1}  tp2 {s2}  ratio {ratio} (bar >= {BAR}: {'PASS' if res['passes_bar'] else 'FAIL/unknown'})")
    if ident:
        print(f"greedy_identical_tp {res['greedy_identical_tp']}: "
              + ", ".join(f"{k} {v['identical']}/{v['of']}" for k, v in (ident.get("detail") or {}).items()))
    if http:
        h = res["http_tp2"]
        print(f"http tp2 ok={h['ok']} ranks with sparse decode {h['ranks_with_sparse_decode']} agree {h['ranks_agree']}: "
              + "; ".join(f"{p.get('process')} pid {p.get('pid')} sparse {p.get('decode_rows_sparse')}" for p in h["per_rank"]))
    if missing:
        print("MISSING:\n  " + "\n  ".join(missing), file=sys.stderr)
        if not a.partial:
            print(f"not written: {a.out} (--partial writes it anyway)", file=sys.stderr)
            return 1
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", a.out)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
