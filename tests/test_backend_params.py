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
