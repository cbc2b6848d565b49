"""``prescore-eval``: quality vs key budget for every method/mode, one table out, JSON in results/.

Examples::

    prescore-eval --model smollm2 --out results/quality-smollm2-cpu.json            # CPU-sized defaults
    prescore-eval --model smollm2 --device cuda --dtype bfloat16 \\
        --ppl-context 8192 --passkey-contexts 2048,4096,8192 --budgets 128,256,512,1024,2048 ...
    prescore-eval --model tiny --tasks ppl --ppl-context 256 --budgets 128            # seconds, random weights
    prescore-eval --tasks passkey,multikey,multivalue,vartrack,freqwords --task-contexts 4096 --task-trials 100
    prescore-eval report results/quality-smollm2-cpu.json      # tables (accuracy with its 95% Wilson interval)
    prescore-eval plot results/quality-smollm2-cpu.json        # budget curves -> results/quality-smollm2-cpu.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_model(name: str, cache_dir: str | None = None) -> tuple[str, Path]:
    """-> (short name, HF folder). smollm2 | qwen-coder | gemma | tiny | a folder."""
    if name == "smollm2":
        from prescore.models import smollm2_dir

        return "smollm2", smollm2_dir(cache_dir)
    if name in ("qwen-coder", "qwen2.5-coder-0.5b"):
        from .pypi_models import qwen_coder_dir

        return "qwen2.5-coder-0.5b", qwen_coder_dir(cache_dir)
    if name in ("gemma", "gemma-3-270m"):
        from .pypi_models import gemma_dir

        return "gemma-3-270m", gemma_dir(cache_dir)
    if name == "tiny":
        from prescore.models import build_tiny_llama

        d = Path(tempfile.gettempdir()) / "prescore-eval-tiny"
        return "tiny", build_tiny_llama(d, num_layers=2, max_pos=16384)
    p = Path(name)
    if not (p / "config.json").is_file():
        raise SystemExit(f"--model: {name!r} is neither smollm2 | qwen-coder | gemma | tiny nor an HF folder")
    return p.name, p


def load_model(path: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .engine import ATTN_NAME, register

    register()
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.model_max_length = 1 << 30  # documents are tokenised whole, then windowed
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=ATTN_NAME)
    return tok, model.to(device).eval()


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from prescore.backend import params as P

    d = P.PrescoreParams()  # the backend's defaults

    ap = argparse.ArgumentParser(prog="prescore-eval", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 | qwen-coder | gemma | tiny | HF folder")
    ap.add_argument("--cache-dir", default=None, help="model cache root (default $PRESCORE_CACHE or ~/.cache/prescore)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--tasks", default="ppl,passkey",
                    help="comma list of ppl, passkey, multikey, multivalue, vartrack, freqwords (RULER-style)")
    ap.add_argument("--budgets", default="128,256,512", type=_ints,
                    help="total attended tokens per KV head (sink + window + selected)")
    ap.add_argument("--methods", default=",".join(P.METHOD_NAMES), help="prior methods (registered scoring methods)")
    ap.add_argument("--modes", default="static,prior,quest,hybrid",
                    help="static (= sink+window), prior, quest, hybrid; dense always runs")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sink", type=int, default=d.sink)
    ap.add_argument("--window", type=int, default=d.window)
    ap.add_argument("--hybrid-prior-fraction", type=float, default=d.hybrid_prior_fraction,
                    help="share of a hybrid budget spent on the prior (default: the backend's; each result file "
                         "records the share it ran with)")
    ap.add_argument("--hybrid-min-budget", type=int, default=d.hybrid_min_budget,
                    help="selected tokens below which hybrid gives the prior no share (default: the backend's)")
    ap.add_argument("--quest-beta", type=float, default=d.quest_beta,
                    help="query-aware key q.c + beta*|q|.r (1 = Quest's bound; default: the backend's)")
    ap.add_argument("--reselect-every", type=int, default=d.reselect_every,
                    help="quest/hybrid rows re-select every N decode tokens, keeping their blocks in between "
                         "(default: the backend's)")
    ap.add_argument("--reselect-async", action=argparse.BooleanOptionalAction, default=d.reselect_async,
                    help="the re-selection runs beside the decode and is adopted a step later (config "
                         "reselect_async; default: the backend's, on); --no-reselect-async selects in order")
    ap.add_argument("--reselect-everys", default="", type=lambda x: [int(v) for v in _floats(x)],
                    help="extra quest and hybrid rows at these re-selection intervals (sweep), e.g. 1,8")
    ap.add_argument("--quest-betas", default="", type=_floats,
                    help="extra quest rows at these quest_beta values (sweep), e.g. 1,0.75,0.25")
    ap.add_argument("--ppl-context", type=int, default=2048, help="dense prefill tokens before the decode steps")
    ap.add_argument("--ppl-decode", type=int, default=32, help="tokens scored one decode step at a time")
    ap.add_argument("--ppl-trials", type=int, default=2, help="document windows")
    ap.add_argument("--fidelity-steps", type=int, default=4, help="decode steps of the ppl task measured for fidelity")
    ap.add_argument("--passkey-contexts", default="1024,2048", type=_ints)
    ap.add_argument("--passkey-depths", default="0.1,0.5,0.9", type=_floats)
    ap.add_argument("--passkey-trials", type=int, default=2, help="trials per (context, depth)")
    ap.add_argument("--passkey-question", default="prefill", choices=("prefill", "decode"),
                    help="prefill: the question is part of the dense prefill, as in serving (its last token is "
                         "the first decode step); decode: the question is decoded sparsely too (stricter)")
    ap.add_argument("--task-contexts", default=None, type=_ints,
                    help="contexts of multikey/multivalue/vartrack/freqwords (default: --passkey-contexts)")
    ap.add_argument("--task-trials", type=int, default=4, help="trials per (task, context) of the RULER-style tasks")
    ap.add_argument("--multikey-keys", type=int, default=4, help="multikey: needles, one per distinct key")
    ap.add_argument("--multikey-queries", type=int, default=1, help="multikey: keys asked (their values in order)")
    ap.add_argument("--multivalue-values", type=int, default=4, help="multivalue: values of the one key")
    ap.add_argument("--vartrack-hops", type=int, default=4, help="vartrack: assignments after the first, per chain")
    ap.add_argument("--vartrack-chains", type=int, default=2, help="vartrack: chains (the others distract)")
    ap.add_argument("--freqwords-words", type=int, default=6, help="freqwords: distinct listed words")
    ap.add_argument("--freqwords-top", type=int, default=2, help="freqwords: most frequent words asked")
    ap.add_argument("--no-plot", action="store_true", help="no budget-curve PNG next to --out")
    ap.add_argument("--trial-batch", type=int, default=8, help="trials decoded together (rows = trials x configs)")
    ap.add_argument("--text-dir", default=None, help="folder of *.txt (default: the excerpts shipped in eval/data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--ref-dtype", default="float64", help="dtype of sparse_decode_ref (CPU path)")
    ap.add_argument("--no-triton", action="store_true", help="torch selection + reference decode even on CUDA")
    ap.add_argument("--decode-impl", default=None, choices=["triton", "ref", "batched"],
                    help="sparse attention: triton (CUDA default), ref (sparse_decode_ref per row, slow), "
                         "batched (CPU default: the same attention vectorised over rows, tested equal to ref)")
    ap.add_argument("--out", default=None, help="JSON path (default results/quality-<model>.json)")
    return ap


def format_table(rows: list[dict], fid_rows: list[dict]) -> str:
    from .engine import config_label

    lines = []
    # multi-item tasks (multikey with several queries, multivalue, freqwords): also the share of answer items
    # recalled (RULER's string_match_all, teacher-forced), as its own table
    rows = rows + [dict(r, task=r["task"] + " recall", value=r["recall"], trials=r["items"],
                        ci_low=r["recall_ci_low"], ci_high=r["recall_ci_high"])
                   for r in rows if r.get("items", 0) > r.get("trials", 0)]
    keyf = lambda r: (r["task"], r["context"])  # noqa: E731
    for task, ctx in sorted({keyf(r) for r in rows}, key=lambda k: (k[0], k[1])):
        sub = [r for r in rows if keyf(r) == (task, ctx)]
        budgets = sorted({r["budget"] for r in sub if r["budget"] is not None})
        dense = [r for r in sub if r["budget"] is None]
        head = f"{task} context={ctx} trials={sub[0]['trials']}"
        if dense:
            d = dense[0]["value"]
            head += f"  dense={d:.4f}" if task == "ppl" else f"  dense={_acc(dense[0])}"
        lines.append(head + ("   (e-perplexity, ratio to dense)" if task == "ppl"
                             else "   (accuracy [95% Wilson interval])"))
        lines.append(f"  {'method':<18}" + "".join(f"{b:>18}" for b in budgets))
        labels = []
        for r in sub:
            if r["budget"] is not None and _key(r) not in labels:
                labels.append(_key(r))
        for m, md, v in labels:
            cells = []
            for b in budgets:
                x = [r for r in sub if _key(r) == (m, md, v) and r["budget"] == b]
                if not x:
                    cells.append(f"{'-':>18}")
                elif task == "ppl":
                    cells.append(f"{x[0]['value']:>11.3f} {x[0]['ratio_to_dense']:>5.3f}x")
                else:
                    cells.append(f"{_acc(x[0]):>18}")
            lines.append(f"  {config_label(m, md, v):<18}" + "".join(cells))
        lines.append("")
    if fid_rows:
        budgets = sorted({r["budget"] for r in fid_rows})
        lines.append(f"attention-output relative error vs dense (mean over layers; context={fid_rows[0]['context']})")
        lines.append(f"  {'method':<18}" + "".join(f"{b:>10}" for b in budgets))
        labels = []
        for r in fid_rows:
            if _key(r) not in labels:
                labels.append(_key(r))
        for m, md, v in labels:
            cells = [next((f"{r['value']:>10.4f}" for r in fid_rows if _key(r) == (m, md, v) and r["budget"] == b),
                          f"{'-':>10}") for b in budgets]
            lines.append(f"  {config_label(m, md, v):<18}" + "".join(cells))
    return "\n".join(lines)


def _acc(r: dict) -> str:
    """An accuracy cell: ``0.95 [0.76,0.99]`` (the interval from the row, or from value x trials for files
    written before rows carried ``ci_low``/``ci_high``)."""
    if "ci_low" in r:
        lo, hi = r["ci_low"], r["ci_high"]
    else:
        from .tasks import wilson

        lo, hi = wilson(round(r["value"] * r["trials"]), r["trials"])
    return f"{r['value']:.2f} [{lo:.2f},{hi:.2f}]"


def _key(r: dict) -> tuple:
    return r["method"], r["mode"], r.get("variant")


def report(paths: list[str]) -> int:
    """``prescore-eval report FILE.json ...``: the tables of written result files (no model, no GPU)."""
    for p in paths:
        d = json.loads(Path(p).read_text())
        s = d.get("settings", {})
        print(f"== {p}: {d['model']}, {s.get('device_name', '?')}, sink {s.get('sink')} window {s.get('window')}, "
              f"hybrid prior share {s.get('hybrid_prior_fraction')}, quest_beta {s.get('quest_beta', 1.0)}, "
              f"reselect every {s.get('reselect_every', 1)}, "
              f"passkey question "
              f"{s.get('passkey', {}).get('question', 'decode')}\n")
        print(format_table(d["rows"], d.get("fidelity", [])))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report(argv[1:])
    if argv[:1] == ["plot"]:
        from .plot import main as plot_main

        return plot_main(argv[1:])
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    from .engine import SparseEvalEngine, make_configs
    from .tasks import NEW_TASKS, load_texts, passkey_task, ppl_task, ruler_task

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    short, path = resolve_model(args.model, args.cache_dir)
    tok, model = load_model(path, str(dev), dtype)
    use_triton = False if args.no_triton else None
    engine = SparseEvalEngine(model, block_size=args.block_size, sink=args.sink, window=args.window,
                              hybrid_prior_fraction=args.hybrid_prior_fraction, use_triton=use_triton,
                              ref_dtype=getattr(torch, args.ref_dtype), decode_impl=args.decode_impl,
                              quest_beta=args.quest_beta, hybrid_min_budget=args.hybrid_min_budget,
                              reselect_every=args.reselect_every, reselect_async=args.reselect_async)
    configs = make_configs(args.budgets, methods=tuple(args.methods.split(",")), modes=tuple(args.modes.split(",")),
                           quest_betas=args.quest_betas, reselect_everys=args.reselect_everys)
    for c in configs:
        engine.params(c)  # validate budgets early
    texts = load_texts(args.text_dir)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - {"ppl", "passkey", *NEW_TASKS}
    if unknown:
        raise SystemExit(f"--tasks: unknown {sorted(unknown)}; one of ppl, passkey, {', '.join(NEW_TASKS)}")
    task_contexts = args.task_contexts or args.passkey_contexts
    task_kw = {"multikey": {"keys": args.multikey_keys, "queries": args.multikey_queries},
               "multivalue": {"values": args.multivalue_values},
               "vartrack": {"hops": args.vartrack_hops, "chains": args.vartrack_chains},
               "freqwords": {"words": args.freqwords_words, "top": args.freqwords_top}}
    rows, fid_rows, timings = [], [], {}
    _log(f"prescore-eval: {short} on {dev} ({dtype}), {len(configs)} configs, budgets {args.budgets}, "
         f"block {args.block_size}, sink {args.sink}, window {args.window}")
    if "ppl" in tasks:
        t0 = time.perf_counter()
        r, f, tm = ppl_task(engine, tok, texts, configs, args.ppl_context, args.ppl_decode, args.ppl_trials,
                            seed=args.seed, fidelity_steps=args.fidelity_steps, trial_batch=args.trial_batch,
                            log=_log)
        rows += r
        fid_rows += f
        timings[f"ppl@{args.ppl_context}"] = {**{k: round(v, 1) for k, v in tm.items()},
                                              "total_s": round(time.perf_counter() - t0, 1)}
    if "passkey" in tasks:
        for ctx in args.passkey_contexts:
            t0 = time.perf_counter()
            r, tm = passkey_task(engine, tok, texts, configs, ctx, args.passkey_depths, args.passkey_trials,
                                 seed=args.seed, trial_batch=args.trial_batch, log=_log,
                                 question=args.passkey_question)
            rows += r
            timings[f"passkey@{ctx}"] = {**{k: round(v, 1) for k, v in tm.items()},
                                         "total_s": round(time.perf_counter() - t0, 1)}
    for task in [t for t in NEW_TASKS if t in tasks]:
        for ctx in task_contexts:
            t0 = time.perf_counter()
            r, tm = ruler_task(engine, tok, texts, configs, task, ctx, args.task_trials, seed=args.seed,
                               trial_batch=args.trial_batch, log=_log, question=args.passkey_question,
                               **task_kw[task])
            rows += r
            timings[f"{task}@{ctx}"] = {**{k: round(v, 1) for k, v in tm.items()},
                                        "total_s": round(time.perf_counter() - t0, 1)}
    table = format_table(rows, fid_rows)
    print(table)
    contexts = [r["context"] for r in rows]
    result = {
        "model": short,
        "context": max(contexts) if contexts else None,
        "rows": rows,
        "fidelity": fid_rows,
        "settings": {
            "model_path": str(path), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype).replace("torch.", ""), "selection": "triton" if engine.use_triton else "torch", "decode_impl": engine.decode_impl,
            "block_size": args.block_size, "sink": args.sink, "window": args.window,
            "hybrid_prior_fraction": args.hybrid_prior_fraction, "hybrid_min_budget": args.hybrid_min_budget,
            "quest_beta": args.quest_beta, "reselect_every": args.reselect_every,
            "reselect_async": args.reselect_async,
            "budgets": args.budgets,
            "budget_semantics": "total key tokens attended per KV head = sink + window + selected (whole blocks); "
                                "backend prescore_budget = budget - sink - window",
            "ppl": {"context": args.ppl_context, "decode": args.ppl_decode, "trials": args.ppl_trials},
            "passkey": {"contexts": args.passkey_contexts, "depths": args.passkey_depths,
                        "trials_per_depth": args.passkey_trials, "question": args.passkey_question},
            "tasks": {t: {"contexts": task_contexts, "trials": args.task_trials, **task_kw[t]}
                      for t in NEW_TASKS if t in tasks},
            "interval": "95% Wilson score interval of hits / trials (ci_low, ci_high)",
            "recall": "RULER tasks: share of answer items (values, words) whose tokens were all the argmax "
                      "(teacher-forced string_match_all; recall_ci_* is Wilson over items, which are correlated "
                      "within a trial: optimistic)",
            "texts": args.text_dir or "eval/data (shipped excerpts)", "seed": args.seed,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
        },
        "timings": timings,
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "command": "prescore-eval " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    }
    out = Path(args.out or f"results/quality-{short}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    _log(f"wrote {out} ({result['runtime_s']}s)")
    if not args.no_plot:
        from .plot import plot, png_path

        png = plot(result, png_path(out))
        if png:
            _log(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
