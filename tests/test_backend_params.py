"""Per-request params, server defaults and the request table (no engine)."""

from types import SimpleNamespace

import pytest

from prescore.backend import params as P
from prescore.backend.requests import RequestTable


@pytest.mark.parametrize("extra,field", [
    ({"prescore_budget": -1}, "prescore_budget"),
    ({"prescore_budget": "64"}, "prescore_budget"),
    ({"prescore_budget": 1.5}, "prescore_budget"),
    ({"prescore_budget": True}, "prescore_budget"),
    ({"prescore_method": "pca"}, "prescore_method"),
    ({"prescore_mode": "top"}, "prescore_mode"),
    ({"prescore_sink": -3}, "prescore_sink"),
    ({"prescore_window": [1]}, "prescore_window"),
    ({"prescore_budgt": 64}, "prescore_budgt"),
])
def test_invalid_request_fields_name_the_field(extra, field):
    with pytest.raises(Exception) as ei:
        P.validate_request(extra)
    assert field in str(ei.value)
    assert getattr(ei.value, "parameter", field) == field


def test_valid_request_resolves_over_defaults():
    d = P.PrescoreParams(budget=512, method="keynorm", mode="prior", sink=32, window=64)
    p = P.resolve(d, {"prescore_budget": 100, "prescore_mode": "quest", "other_key": "kept out"})
    assert (p.budget, p.method, p.mode, p.sink, p.window) == (100, "keynorm", "quest", 32, 64)
    assert P.resolve(d, None) == d
    assert P.validate_request({"prescore_budget": 0}) == {"budget": 0}


def test_blocks_round_up_and_hybrid_share():
    p = P.PrescoreParams(budget=100, sink=1, window=33, mode="hybrid", hybrid_prior_fraction=0.5, hybrid_min_budget=0)
    assert p.blocks(32) == (4, 1, 2, 2)
    # below hybrid_min_budget (default 512 tokens) the whole hybrid budget goes to the query-aware key
    assert P.PrescoreParams(budget=496, mode="hybrid").blocks(16) == (31, 1, 4, 0)
    assert P.PrescoreParams(budget=512, mode="hybrid").blocks(16) == (32, 1, 4, 4)
    assert P.PrescoreParams(budget=64, mode="quest").blocks(32)[0] == 2


def test_server_defaults_env_then_additional_config():
    env = {P.ENV_CONFIG: '{"budget": 256, "method": "leverage", "prescore_window": 32}'}
    d = P.load_defaults({"prescore": {"budget": 1024, "mode": "prior"}}, env=env)
    assert (d.budget, d.method, d.mode, d.window) == (1024, "leverage", "prior", 32)
    with pytest.raises(ValueError, match="additional_config.prescore.budget"):
        P.load_defaults({"prescore": {"budget": -1}}, env={})
    with pytest.raises(ValueError, match="PRESCORE_CONFIG"):
        P.load_defaults({}, env={P.ENV_CONFIG: "{not json"})
    with pytest.raises(ValueError, match="bogus"):
        P.load_defaults({"prescore": {"bogus": 1}}, env={})
    assert P.load_defaults({"prescore": {"quest_beta": 1}}, env={}).quest_beta == 1.0
    with pytest.raises(ValueError, match="additional_config.prescore.quest_beta"):
        P.load_defaults({"prescore": {"quest_beta": 1.5}}, env={})
    with pytest.raises(Exception, match="prescore_quest_beta"):  # server-wide only, not per request
        P.validate_request({"prescore_quest_beta": 0.5})
    assert P.load_defaults({}, env={}).reselect_clock == "request"
    assert P.load_defaults({"prescore": {"reselect_clock": "step"}}, env={}).reselect_clock == "step"
    with pytest.raises(ValueError, match="additional_config.prescore.reselect_clock"):
        P.load_defaults({"prescore": {"reselect_clock": "length"}}, env={})


def _bu(removed=(), added=(), moved=()):
    return SimpleNamespace(removed=list(removed), added=list(added), moved=list(moved))


def _sp(**extra):
    return SimpleNamespace(extra_args={f"prescore_{k}": v for k, v in extra.items()})


def _swap():
    return SimpleNamespace(name="SWAP")


def _uni():
    return SimpleNamespace(name="UNIDIRECTIONAL")


def test_request_table_follows_v1_batch_updates():
    t = RequestTable()
    t.configure(8, P.PrescoreParams(budget=7))
    t.apply_batch_update(_bu(added=[(0, _sp(budget=10), [1] * 5, []), (1, _sp(), [1] * 3, [2, 2])]))
    s0, s1 = t.slots(2)
    assert t.params[s0].budget == 10 and t.params[s1].budget == 7
    assert t.prefill_len[s0] == 5 and t.prefill_len[s1] == 5
    tag0, tag1 = t.tag[s0], t.tag[s1]
    assert tag0 != tag1 and min(tag0, tag1) > 0
    # swap rows, then a request replaces row 0 and row 1 is compacted into row 0 of a 1-row batch
    t.apply_batch_update(_bu(moved=[(0, 1, _swap())]))
    assert t.slots(2) == [s1, s0]
    t.apply_batch_update(_bu(removed=[0], moved=[(1, 0, _uni())]))
    assert t.slots(2) == [s0, -1]
    # tags: same method + same prefill tokens -> same tag (identical scores); anything else -> different
    t.apply_batch_update(_bu(added=[(1, _sp(budget=99), [1] * 5, [])]))
    assert t.tag[t.slots(2)[1]] == tag0
    t.apply_batch_update(_bu(added=[(1, _sp(method="keynorm"), [1] * 5, [])]))
    assert t.tag[t.slots(2)[1]] not in (tag0, tag1)
    t.apply_batch_update(_bu(added=[(1, _sp(), [1] * 4, [1])]))  # resumed: prompt + output tokens
    assert t.tag[t.slots(2)[1]] == tag0
    t.apply_batch_update(_bu(added=[(1, _sp(), None, [])]))  # no token ids (embeddings): a fresh tag
    tag_a = t.tag[t.slots(2)[1]]
    t.apply_batch_update(_bu(added=[(1, _sp(), None, [])]))
    assert tag_a != t.tag[t.slots(2)[1]] and tag_a > 0
    # slots are recycled, never leaked
    for _ in range(50):
        t.apply_batch_update(_bu(added=[(1, _sp(), [1], [])]))
    assert len(t._free) == 8 - 2


def test_request_table_v2_slots():
    t = RequestTable()
    t.configure(4, P.PrescoreParams())
    t.set(2, _sp(budget=3), 9)
    import numpy as np

    assert t.slots(3, np.array([2, 0, 7])) == [2, -1, -1]


def test_v2_tracker_reads_staged_prefill_tokens():
    """Model Runner V2 path of the tracker with a stand-in for the runner's request state."""
    import numpy as np

    from prescore.backend import requests as R

    class Staged:  # the fields vLLM's StagedWriteTensor keeps until apply_write()
        def __init__(self):
            self._staged_write_indices, self._staged_write_starts = [], []
            self._staged_write_contents, self._staged_write_cu_lens = [], []

        def stage_write(self, i, start, x):
            self._staged_write_indices.append(i), self._staged_write_starts.append(start)
            self._staged_write_contents.extend(x), self._staged_write_cu_lens.append(len(self._staged_write_contents))

    rs = SimpleNamespace(max_num_reqs=4, prefill_len=SimpleNamespace(np=np.zeros(4, dtype=np.int32)),
                         all_token_ids=Staged())
    cfg = SimpleNamespace(additional_config={}, scheduler_config=SimpleNamespace(max_num_seqs=4))
    lp = R.PrescoreRequestTracker(cfg, rs)
    for slot, toks in ((0, [5, 6, 7]), (2, [5, 6, 7]), (3, [5, 6, 8])):
        rs.prefill_len.np[slot] = len(toks)
        rs.all_token_ids.stage_write(slot, 0, toks)
        assert lp.add_request(slot, _sp(budget=8)) is False
    t = R.TABLE
    assert t.slots(3, np.array([0, 2, 3])) == [0, 2, 3]
    assert t.tag[0] == t.tag[2] != t.tag[3] and t.prefill_len[3] == 3 and t.params[0].budget == 8


def test_pipeline_parallelism_is_refused_with_a_clear_message():
    from types import SimpleNamespace

    from prescore.backend import compat

    compat.check_parallel(SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=1,
                                                                          tensor_parallel_size=2)))
    with pytest.raises(ValueError, match="pipeline-parallel-size 2 is not supported"):
        compat.check_parallel(SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2)))


POLICY = P.PrescoreParams(budget=64, sink=32, window=64, min_budget=32, max_budget=1024, allow_dense=False)


@pytest.mark.parametrize("extra,field,words", [
    ({"prescore_budget": 0}, "prescore_budget", "dense"),
    ({"prescore_budget": 8}, "prescore_budget", "[32, 1024]"),
    ({"prescore_budget": 4096}, "prescore_budget", "[32, 1024]"),
    ({"prescore_window": 1 << 24}, "prescore_window", "attended"),   # sink + window + budget over the cap
    ({"prescore_sink": 2000, "prescore_budget": 64}, "prescore_sink", "attended"),
    ({"prescore_budget": 1024, "prescore_window": 65}, "prescore_budget", "32 + 65 + 1024"),
])
def test_server_policy_is_enforced_with_the_request_rules(extra, field, words):
    with pytest.raises(Exception) as ei:
        P.check_request(POLICY, extra)
    assert ei.value.parameter == field and words.replace(" + ", "") in str(ei.value).replace(" + ", ""), str(ei.value)
    assert str(ei.value).startswith(field)


def test_server_policy_accepts_what_it_allows():
    assert P.check_request(POLICY, {"prescore_budget": 1024}).budget == 1024  # 32 + 64 + 1024 = the cap
    assert P.check_request(POLICY, {"prescore_budget": 32, "prescore_window": 1024 - 32 + 64}).window == 1056
    assert P.check_request(POLICY, None) == POLICY
    p = P.load_defaults({"prescore": {"max_attended": 500, "budget": 256}}, env={})
    assert p.max_attended == 500 and P.check_request(p, {"prescore_window": 500 - 256 - 16}).window == 228
    with pytest.raises(Exception, match="500 attended"):
        P.check_request(p, {"prescore_window": 500 - 256 - 15})
    assert P.check_request(P.load_defaults({}, env={}), {"prescore_budget": 0}).budget == 0  # dense allowed by default


def test_policy_keys_are_server_wide_only():
    for key in ("prescore_min_budget", "prescore_max_budget", "prescore_allow_dense", "prescore_max_attended"):
        with pytest.raises(Exception, match=key):
            P.validate_request({key: 1})


def test_frontend_validation_uses_the_calling_engines_config(monkeypatch):
    """validate_params gets no config from vLLM: it reads the InputProcessor's (the caller's) vllm_config."""
    from prescore.backend import requests as R

    for var in P.ENV_POLICY:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(P.ENV_CONFIG, raising=False)

    class InputProcessor:  # stand-in for vLLM's: validate -> validate_logits_processors_params -> the hook
        def __init__(self, extra):
            self.vllm_config = SimpleNamespace(additional_config=extra)

        def _validate_params(self, sp):
            R.PrescoreRequestTracker.validate_params(sp)

    strict = InputProcessor({"prescore": {"budget": 64, "max_budget": 128, "allow_dense": False}})
    with pytest.raises(Exception, match="dense"):
        strict._validate_params(_sp(budget=0))
    with pytest.raises(Exception, match=r"\[1, 128\]"):
        strict._validate_params(_sp(budget=256))
    strict._validate_params(_sp(budget=128))
    InputProcessor({})._validate_params(_sp(budget=0))  # another engine, the default policy
    R.PrescoreRequestTracker.validate_params(_sp(budget=0))  # no caller config: the environment's
    monkeypatch.setenv("PRESCORE_ALLOW_DENSE", "0")
    with pytest.raises(Exception, match="dense"):
        R.PrescoreRequestTracker.validate_params(_sp(budget=0))


def test_worker_never_runs_dense_by_accident():
    t = RequestTable()
    t.configure(4, POLICY)
    t.set(0, _sp(budget=0), 5)  # a request that slipped past the frontend: the server defaults, not dense
    assert t.params[0] == POLICY
    t.set(1, _sp(budget=96), 5)
    assert t.params[1].budget == 96


def test_methods_and_modes_come_from_the_kernel_registry():
    """One list of scoring methods (the registry) and one of modes (``Mode``): params, the HTTP schema, the
    quality harness and the backend's per-method store derive theirs from them."""
    from prescore.eval.engine import PRIOR_METHODS
    from prescore.kernels import METHODS, MODE_NAMES, MODES, Mode
    from prescore.kernels.step_triton import tail_tiles
    from prescore.server.schema import Method, Mode as ModeLiteral

    names = tuple(METHODS)
    assert P.METHOD_NAMES == PRIOR_METHODS == Method.__args__ == names
    assert P.MODE_NAMES == MODE_NAMES == ModeLiteral.__args__ == tuple(m.name.lower() for m in Mode)
    assert [MODES[n] for n in MODE_NAMES] == [int(m) for m in Mode]
    assert [METHODS[n].method_id for n in names] == list(range(len(names)))  # kernel id = store column
    assert len(tail_tiles(64)[0]) == len(names)  # every shipped method has a Triton tail tile
    for n in names:
        P.validate_request({"prescore_method": n})
    for n in MODE_NAMES:
        P.validate_request({"prescore_mode": n})


def test_offered_methods_field():
    """``methods``: validated at load; default the default method + the stateless ones; a request for a method the
    server does not offer is refused naming prescore_method; the default method must be offered."""
    d = P.load_defaults({}, env={})
    assert d.methods == ("kmeans", "keynorm")  # leverage (a D x D state per slot and layer) is opt-in
    assert P.load_defaults({"prescore": {"method": "leverage"}}, env={}).methods == ("leverage", "keynorm")
    d3 = P.load_defaults({"prescore": {"methods": ["kmeans", "leverage", "keynorm"]}}, env={})
    assert P.check_request(d3, {"prescore_method": "leverage"}).method == "leverage"
    with pytest.raises(Exception) as ei:
        P.check_request(d, {"prescore_method": "leverage"})
    assert getattr(ei.value, "parameter", None) == "prescore_method" and "methods" in str(ei.value)
    with pytest.raises(Exception) as ei:
        P.check_request(d, {"prescore_method": "leverage", "prescore_budget": 0})  # dense too: not offered
    assert getattr(ei.value, "parameter", None) == "prescore_method"
    for bad in ([], ["kmeans", "kmeans"], ["nope"], "kmeans", [1]):
        with pytest.raises(ValueError, match="additional_config.prescore.methods"):
            P.load_defaults({"prescore": {"methods": bad}}, env={})
    with pytest.raises(ValueError, match="default method 'leverage' is not in the offered methods"):
        P.load_defaults({"prescore": {"method": "leverage", "methods": ["kmeans"]}}, env={})


def test_dummy_rows_in_a_finished_requests_slot_run_dense():
    """vLLM's dummy batches (profiling, CUDA-graph capture) put fresh 1-token prompts in slots 0..n-1 where finished
    warm-up requests' params remain (V2 never reports finished requests to logits processors): such a row is not
    its slot's request and must not be scored (the H200 capture took 158 s scoring them). A real first chunk, a
    second layer-group build of the same step, and a re-admitted slot stay live."""
    from types import SimpleNamespace

    from prescore.backend.requests import RequestTable

    t = RequestTable()
    t.configure(4, P.PrescoreParams())
    sp = SimpleNamespace(extra_args=None)
    t.set(0, sp, 2)
    t.set(1, sp, 2)
    assert t.live([0, 1], [2, 2], [2, 2]) == [0, 1]  # both prompts' first chunk
    assert t.live([0, 1], [2, 2], [2, 2]) == [0, 1]  # the same step planned again (another KV-cache group)
    assert t.live([0, 1], [1, 1], [3, 3]) == [0, 1]  # decode: past the first chunk
    assert t.live([0, 1, 2, -1], [1, 1, 1, 1], [1, 1, 1, 1]) == [-1, -1, 2, -1]  # dummy rows: 0 and 1 are stale
    t.set(1, sp, 5)  # a new request in slot 1
    assert t.live([0, 1], [1, 5], [1, 5]) == [-1, 1]
    assert t.live([1], [3], [8]) == [1]  # its next chunk
