"""The RULER-style tasks of ``prescore-eval`` (multikey, multivalue, vartrack, freqwords), the 95% Wilson
interval on every accuracy row, and the per-budget curve PNG. CPU, the tiny random Llama (its byte-level BPE
tokenizer): every needle sits in the prompt exactly where the generator says, the answer follows from the
context, generators are deterministic by seed, and budget >= context equals dense exactly end to end."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

pytest.importorskip("transformers")

from prescore.eval import tasks as T  # noqa: E402
from prescore.models import build_tiny_llama  # noqa: E402

BS = 16
SMALL = {"multikey": {"keys": 4, "queries": 2}, "multivalue": {"values": 3}, "vartrack": {"hops": 3, "chains": 2},
         "freqwords": {"words": 5, "top": 2}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny-tasks"), num_layers=2, max_pos=4096)
    t = AutoTokenizer.from_pretrained(str(path))
    t.model_max_length = 1 << 30
    return t


@pytest.fixture(scope="module")
def corpus(tok):
    return T.Corpus(tok, T.load_texts(), 2048)


def _prompts(task, tok, corpus, seed=0, context=1536, trials=3, question="prefill"):
    return T.ruler_prompts(task, tok, corpus, context, trials, BS, seed=seed, question=question, **SMALL[task])


@pytest.mark.parametrize("task", T.NEW_TASKS)
@pytest.mark.parametrize("question", ["prefill", "decode"])
def test_needles_where_said_and_answer_after_question(task, question, tok, corpus):
    ps = _prompts(task, tok, corpus, question=question)
    N = len(ps[0]["prefix"])
    assert N % BS == 0 and all(len(p["prefix"]) == N for p in ps)
    assert max(N + len(p["dec"]) for p in ps) <= 1536
    for p in ps:
        s = p["spec"]
        assert len(p["needle_at"]) == len(s["needles"]) == len(p["needle_ids"])
        assert p["needle_at"] == sorted(p["needle_at"])
        for at, ids, text in zip(p["needle_at"], p["needle_ids"], s["needles"]):
            assert p["prefix"][at:at + len(ids)] == ids  # the needle's tokens, exactly at the said offset
            assert tok.decode(ids) == text
        bos = T._bos(tok)  # the tiny tokenizer starts a prompt with BOS, as a served prompt does
        assert p["prefix"][:len(bos)] == bos
        assert tok.decode(p["prefix"][len(bos):len(bos) + len(T._ids(tok, s["intro"]))]) == s["intro"]
        # the decoded part ends with the answer tokens; the question (or its head) ends the prefix
        A = p["answer_len"]
        assert tok.decode(p["dec"][-A:]).strip() == s["answer"].strip()
        full = tok.decode(p["prefix"] + p["dec"])
        assert full.endswith(s["question"] + s["answer"])


@pytest.mark.parametrize("task", T.NEW_TASKS)
def test_answer_items_cut_the_answer_tokens(task, tok, corpus):
    """item_ends split the answer tokens into the items (the recall score's units), the last one at its end."""
    for p in _prompts(task, tok, corpus):
        s, A = p["spec"], p["answer_len"]
        ends, ans = s["item_ends"], p["dec"][-A:]
        assert ends[-1] == A and ends == sorted(set(ends))
        if len(ends) > 1:  # multi-item answers: each cut decodes to the answer up to that item
            assert len(ends) == len(s["items"])
            for k, e in enumerate(ends, 1):
                assert tok.decode(ans[:e]).strip() == ", ".join(s["items"][:k])
    n = {"multikey": "queries", "multivalue": "values", "freqwords": "top"}
    assert len(_prompts(task, tok, corpus)[0]["spec"]["items"]) == SMALL[task].get(n.get(task), 1)


@pytest.mark.parametrize("task", T.NEW_TASKS)
def test_generators_deterministic_by_seed(task, tok, corpus):
    a, b, c = (_prompts(task, tok, corpus, seed=s) for s in (0, 0, 1))
    assert [p["prefix"] + p["dec"] for p in a] == [p["prefix"] + p["dec"] for p in b]
    assert [p["spec"] for p in a] == [p["spec"] for p in b]
    assert [p["prefix"] for p in a] != [p["prefix"] for p in c]


def _context_text(tok, p):
    return tok.decode(p["prefix"])


def test_multikey_answer_is_the_asked_keys_values(tok, corpus):
    for p in _prompts("multikey", tok, corpus):
        s, txt = p["spec"], _context_text(tok, p)
        m = dict(re.findall(r"The special magic number for (\w+) is: (\d+)\.", txt))
        assert sorted(m) == sorted(s["meta"]["keys"])  # one needle per distinct key
        assert len(s["meta"]["asked"]) == 2 and all(k in s["question"] for k in s["meta"]["asked"])
        assert s["answer"] == " " + ", ".join(m[k] for k in s["meta"]["asked"])


def test_multivalue_answer_has_every_value_in_context_order(tok, corpus):
    for p in _prompts("multivalue", tok, corpus):
        s, txt = p["spec"], _context_text(tok, p)
        found = re.findall(r"The special magic number for (\w+) is: (\d+)\.", txt)
        assert {k for k, _ in found} == {s["meta"]["key"]} and len(found) == 3
        assert s["answer"] == " " + ", ".join(v for _, v in found)


def test_vartrack_chain_resolves_to_the_answer(tok, corpus):
    for p in _prompts("vartrack", tok, corpus):
        s, txt = p["spec"], _context_text(tok, p)
        assign = dict(re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", txt))
        assert len(assign) == 2 * 4  # 2 chains of hops + 1 assignments
        last = s["meta"]["chain"][-1]
        assert f"variable {last}?" in s["question"]
        v, hops = last, 0
        while not v.isdigit():
            v, hops = assign[v], hops + 1
        assert hops == 4 and s["answer"] == f" {v}"
        # every assignment comes after the one it reads
        pos = {n: txt.index(f"VAR {n} =") for n in assign}
        assert all(pos[n] > pos[r] for n, r in assign.items() if not r.isdigit())


def test_freqwords_answer_is_the_most_listed(tok, corpus):
    for p in _prompts("freqwords", tok, corpus):
        s, txt = p["spec"], _context_text(tok, p)
        c = Counter(re.findall(r"Listed word: (\w+)\.", txt))
        assert len(c) == 5
        ranked = sorted(c, key=lambda w: -c[w])
        assert c[ranked[1]] > c[ranked[2]] and c[ranked[0]] > c[ranked[1]]  # a unique top 2, strictly ordered
        assert s["answer"] == " " + ", ".join(ranked[:2])


def test_wilson_known_values():
    # 19/20: the 0.76-0.99; the others: Wilson (1927) / Newcombe (1998) table values
    for (h, n), (lo, hi) in {(19, 20): (0.7639, 0.9911), (0, 10): (0.0, 0.2775), (10, 10): (0.7225, 1.0),
                             (5, 10): (0.2366, 0.7634), (97, 100): (0.9154, 0.9897), (1, 2): (0.0945, 0.9055)}.items():
        got = T.wilson(h, n)
        assert got == pytest.approx((lo, hi), abs=1e-4), (h, n, got)
    assert T.wilson(0, 0) == (0.0, 1.0)
    assert T.ci_fields(3, 4) == {"ci_low": T.wilson(3, 4)[0], "ci_high": T.wilson(3, 4)[1], "hits": 3}


def test_cli_new_tasks_end_to_end_with_intervals_and_plot(tmp_path, capsys):
    from prescore.eval.cli import main

    out = tmp_path / "q.json"
    rc = main(["--model", "tiny", "--tasks", "passkey,multikey,multivalue,vartrack,freqwords",
               "--passkey-contexts", "256", "--passkey-depths", "0.5", "--passkey-trials", "2",
               "--task-contexts", "512", "--task-trials", "2", "--multikey-keys", "3", "--multivalue-values", "2",
               "--vartrack-hops", "2", "--vartrack-chains", "1", "--freqwords-words", "3", "--freqwords-top", "1",
               "--budgets", "128,1024", "--modes", "static,quest,hybrid", "--methods", "keynorm",
               "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["task"] for r in rows} == {"passkey", *T.NEW_TASKS}
    for r in rows:
        assert 0 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 1
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(T.wilson(round(r["value"] * r["trials"]), r["trials"]))
    for task in T.NEW_TASKS:
        sub = [r for r in rows if r["task"] == task]
        assert all(r["trials"] == 2 and r["context"] <= 512 for r in sub)
        dense = [r for r in sub if r["mode"] == "dense"]
        assert len(dense) == 1 and any(r["mode"] == "static" for r in sub)
        big = [r for r in sub if r["budget"] == 1024]
        assert len(big) == 3
        for r in sub:  # recall: items recalled / items, never below exact-match accuracy
            assert r["items"] >= r["trials"] and 0 <= r["recall_ci_low"] <= r["recall"] <= r["recall_ci_high"] <= 1
            assert r["recall"] >= r["value"]
        for r in big:  # budget >= context: dense (the same hits; the answer's NLL to float32 rounding: the
            # attention runs in float64, then the float32 model rounds a row's output by its batch position)
            assert (r["value"], r["per_trial"]) == (dense[0]["value"], dense[0]["per_trial"])
            assert r["answer_nll"] == pytest.approx(dense[0]["answer_nll"], rel=1e-6)
        assert any(r["answer_nll"] != dense[0]["answer_nll"] for r in sub if r["budget"] == 128)
    assert set(data["settings"]["tasks"]) == set(T.NEW_TASKS)
    text = capsys.readouterr().out
    assert "vartrack context=" in text and "[95% Wilson interval]" in text
    assert "multivalue recall context=" in text and "vartrack recall" not in text  # multi-item tasks only
    png = out.with_suffix(".png")  # written next to --out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    assert main(["plot", str(out)]) == 0 and png.stat().st_size > 1000
    assert main(["report", str(out)]) == 0
    assert "passkey context=" in capsys.readouterr().out
