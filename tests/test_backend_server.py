"""`vllm serve MODEL --attention-backend prescore` over HTTP (one shared server, real multiprocess engine)."""

import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ENGINE, launch, requires_vllm

pytestmark = requires_vllm
DEFAULTS = '{"prescore": {"budget": 64, "sink": 32, "window": 64, "methods": ["kmeans", "leverage", "keynorm"]}}'
PROMPT_LEN = 500


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    pytest.importorskip("httpx")
    work = tmp_path_factory.mktemp("server")
    env = {"PRESCORE_METRICS_DIR": str(work / "metrics")}
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", tiny_model,
           "--attention-backend", "prescore", "--host", "127.0.0.1",
           "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
           "--max-model-len", str(ENGINE["max_model_len"]), "--block-size", str(ENGINE["block_size"]),
           "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--enforce-eager", "--additional-config", DEFAULTS]
    with launch(cmd, work, env_extra=env) as srv:
        yield {"base": srv["base"], "model": tiny_model, "proc": srv["proc"], "work": work}


def _ids(seed, n=PROMPT_LEN):
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def _complete(srv, xargs=None, seed=0, max_tokens=8, **extra):
    import httpx

    body = {"model": srv["model"], "prompt": _ids(seed), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return httpx.post(srv["base"] + "/v1/completions", json=body, timeout=300)


@pytest.mark.parametrize("xargs,field", [
    ({"prescore_budget": -1}, "prescore_budget"),
    ({"prescore_budget": "lots"}, "prescore_budget"),
    ({"prescore_method": "pca"}, "prescore_method"),
    ({"prescore_mode": "everything"}, "prescore_mode"),
    ({"prescore_sink": 2.5}, "prescore_sink"),
    ({"prescore_window": -64}, "prescore_window"),
    ({"prescore_budgte": 64}, "prescore_budgte"),
])
def test_bad_xargs_get_400_naming_the_field(server, xargs, field):
    r = _complete(server, xargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err.get("param") == field
    ok = _complete(server, {"prescore_budget": 32}, max_tokens=2)  # the server keeps serving
    assert ok.status_code == 200, ok.text


def test_bad_xargs_on_chat_endpoint(server):
    import httpx

    r = httpx.post(server["base"] + "/v1/chat/completions", timeout=60, json={
        "model": server["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "vllm_xargs": {"prescore_mode": "nope"}})
    assert r.status_code == 400 and "prescore_mode" in r.json()["error"]["message"]


def test_mixed_budget_concurrent_requests_all_succeed(server):
    cases = [None, {"prescore_budget": 0}, {"prescore_budget": 32}, {"prescore_budget": 96, "prescore_mode": "quest"},
             {"prescore_budget": 64, "prescore_method": "leverage", "prescore_mode": "prior"},
             {"prescore_budget": 64, "prescore_method": "keynorm", "prescore_mode": "hybrid"},
             {"prescore_budget": 100_000}, {"prescore_budget": 32, "prescore_sink": 0, "prescore_window": 32}]
    with ThreadPoolExecutor(len(cases)) as ex:
        rs = list(ex.map(lambda ia: _complete(server, ia[1], seed=100 + ia[0], max_tokens=10), enumerate(cases)))
    for r in rs:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 10


def test_metrics_prove_the_sparse_path_ran(server):
    from prescore.backend.metrics import prometheus_text, read_dir, totals

    time.sleep(1.0)  # earlier tests' last steps reach the file
    before = totals(read_dir(str(server["work"] / "metrics")), method="kmeans", mode="hybrid")
    assert _complete(server, None, seed=7, max_tokens=6).status_code == 200  # server default budget 64: sparse
    time.sleep(1.0)  # the worker rewrites its metrics file every 0.2 s
    snap = read_dir(str(server["work"] / "metrics"))
    assert totals(snap, method="kmeans", mode="hybrid")["decode_rows_sparse"] == before["decode_rows_sparse"] + 5
    t = totals(snap, method="kmeans", mode="hybrid")
    assert t["decode_rows_sparse"] >= 5
    assert 0 < t["selected_tokens"] < t["context_tokens"]
    assert 'prescore_decode_rows_sparse_total{method="kmeans",mode="hybrid"}' in prometheus_text(snap)
    log = (server["work"] / "serve.log").read_text()
    assert "attention backend PRESCORE" in log and "budget=64" in log
