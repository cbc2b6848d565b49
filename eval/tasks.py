"""Tasks: decode-mode perplexity, passkey retrieval, attention-output fidelity, and the RULER-style multikey,
multivalue, vartrack and freqwords (accuracy rows carry a 95% Wilson interval). Each returns JSON rows.

Texts: the public-domain excerpts shipped in ``eval/data`` (Emma, Moby-Dick, Truman's 1946 State of the Union,
~175 KB each, from ../shared/data/text) or any folder of ``*.txt`` (``--text-dir``).
"""

from __future__ import annotations

import gzip
import math
import random
from pathlib import Path

import torch

from .engine import Config, SparseEvalEngine

DATA = Path(__file__).parent / "data"

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


def load_texts(text_dir: str | None = None) -> dict[str, str]:
    if text_dir:
        files = sorted(Path(text_dir).rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no *.txt under {text_dir}")
        return {f.stem: f.read_text(encoding="utf-8") for f in files}
    return {f.name[:-len(".txt.gz")]: gzip.decompress(f.read_bytes()).decode("utf-8")
            for f in sorted(DATA.glob("*.txt.gz"))}


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _bos(tok) -> list[int]:
    """[BOS] when the tokenizer starts every prompt with one (gemma-3), else [] (SmolLM2, Qwen): a window or
    prompt then starts with it, as a served prompt does."""
    ids = tok("a")["input_ids"]
    return ids[:1] if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id else []


class Corpus:
    """Tokenised documents (cached per tokenizer)."""

    def __init__(self, tok, texts: dict[str, str], min_tokens: int):
        self.docs = []
        for name, t in texts.items():
            ids = _ids(tok, t)
            if len(ids) >= min_tokens:
                self.docs.append((name, ids))
        if not self.docs:
            raise ValueError(f"no document has {min_tokens} tokens")

    def window(self, i: int, n: int, rng: random.Random) -> tuple[str, list[int]]:
        name, ids = self.docs[i % len(self.docs)]
        off = rng.randrange(0, len(ids) - n + 1)
        return name, ids[off:off + n]


def _summaries(configs: list[Config]):
    return [(c.method, c.mode, c.budget) for c in configs]


def ppl_task(engine: SparseEvalEngine, tok, texts, configs, context: int, decode: int, trials: int,
             seed: int = 0, fidelity_steps: int = 0, trial_batch: int = 8, log=print) -> tuple[list, list, dict]:
    """Prefill ``context`` tokens densely, score the next ``decode`` tokens one decode step at a time.
    Returns (rows, fidelity rows, timing)."""
    BS = engine.BS
    N = context // BS * BS
    corpus = Corpus(tok, texts, N + decode + 1)
    rng = random.Random(seed)
    wins = [corpus.window(t, N + decode + 1, rng) for t in range(trials)]
    bos = _bos(tok)
    ids = torch.tensor([bos + w[1][len(bos):] for w in wins])
    nll, fid, timing = [], [], {"prefill_s": 0.0, "decode_s": 0.0}
    for s in range(0, trials, trial_batch):
        x = ids[s:s + trial_batch]
        r = engine.run(x[:, :N], x[:, N:N + decode], x[:, N + 1:], configs,
                       fidelity_steps=fidelity_steps if s == 0 else 0, log=log)
        nll.append(r["nll"])
        if s == 0:
            fid = r["fidelity"]
        for k in timing:
            timing[k] += r["timing"][k]
        log(f"  ppl ctx={N}: trials {s}..{s + len(x) - 1} prefill {r['timing']['prefill_s']:.1f}s "
            f"decode {r['timing']['decode_s']:.1f}s")
    nll = torch.cat(nll)  # [T, C, M]
    mean = nll.mean(dim=(0, 2)).double()
    d = [i for i, c in enumerate(configs) if c.mode == "dense"]
    dense = float(mean[d[0]]) if d else float("nan")
    rows = []
    for i, c in enumerate(configs):
        ppl = math.exp(float(mean[i]))
        per_trial = [math.exp(float(v)) for v in nll[:, i].mean(-1).double()]
        rows.append({"task": "ppl", "method": c.method, "mode": c.mode, "budget": c.budget, "value": ppl,
                     "trials": trials, "context": N + decode, "prefill": N, "decode_tokens": decode,
                     "ratio_to_dense": ppl / math.exp(dense) if d else None, "nll": float(mean[i]),
                     "per_trial": per_trial, "docs": [w[0] for w in wins], **engine.row_fields(c)})
    fid_rows = []
    if fidelity_steps:
        for i, c in enumerate(configs):
            if c.mode == "dense":
                continue
            # None: a sliding-window layer (always dense, not measured)
            per_layer = [float(x) if x == x else None for x in fid[i]]
            sparse_layers = [x for x in per_layer if x is not None]
            fid_rows.append({"task": "fidelity", "method": c.method, "mode": c.mode, "budget": c.budget,
                             **engine.row_fields(c),
                             "value": float(sum(sparse_layers) / max(1, len(sparse_layers))),
                             "per_layer": per_layer,
                             "trials": min(trials, trial_batch), "steps": min(fidelity_steps, decode),
                             "context": N + decode, "metric": "mean over full-attention layers of ||o_sparse-o_dense||/||o_dense||"})
    return rows, fid_rows, timing


def passkey_prompt(tok, corpus: Corpus, context: int, depth: float, key: int, doc: int, rng: random.Random,
                   block_size: int, question: str = "prefill"):
    """-> (prefix ids [N], decode ids, len(answer)); N is a block multiple.

    ``question="prefill"`` (default, as serving does it): the prompt (haystack + question) is prefilled
    densely except its last token, which is the first decode step (in vLLM the prompt's last token is computed
    in the dense prefill: this is one sparse token stricter); decode ids = [last question token] + answer.
    ``question="decode"``: the question is decoded sparsely too (stricter; the CPU tables of session 2)."""
    q = _ids(tok, QUESTION)
    qa = _ids(tok, QUESTION + ANSWER.format(key=key))
    a = qa[len(q):] if qa[:len(q)] == q else _ids(tok, ANSWER.format(key=key))
    intro, needle = _bos(tok) + _ids(tok, INTRO), _ids(tok, NEEDLE.format(key=key))
    if question == "decode":
        N = (context - len(q) - len(a)) // block_size * block_size
        tail, dec = [], q + a
    elif question == "prefill":
        N = (context - 1 - len(a)) // block_size * block_size
        tail, dec = q[:-1], q[-1:] + a
    else:
        raise ValueError(f"question must be 'prefill' or 'decode', got {question!r}")
    n_hay = N - len(intro) - len(needle) - len(tail)
    if n_hay < 16:
        raise ValueError(f"context {context} too short for the passkey prompt")
    _, hay = corpus.window(doc, n_hay, rng)
    at = int(round(depth * n_hay))
    prefix = intro + hay[:at] + needle + hay[at:] + tail
    assert len(prefix) == N
    return prefix, dec, len(a)


def passkey_task(engine: SparseEvalEngine, tok, texts, configs, context: int, depths, trials: int, seed: int = 0,
                 trial_batch: int = 8, log=print, question: str = "prefill") -> tuple[list, dict]:
    """``trials`` per depth; all prompts of one context have the same length (one batch per ``trial_batch``)."""
    corpus = Corpus(tok, texts, context)
    rng = random.Random(seed * 1000003 + context)
    prompts = []
    for d in depths:
        for t in range(trials):
            key = rng.randrange(10000, 100000)
            prompts.append((d, *passkey_prompt(tok, corpus, context, d, key, t, rng, engine.BS, question)))
    lens = {(len(p[1]), len(p[2]), p[3]) for p in prompts}
    if len(lens) != 1:
        raise ValueError(f"passkey prompts differ in shape: {lens}")
    (N, QA, A), = lens
    pre = torch.tensor([p[1] for p in prompts])
    qa = torch.tensor([p[2] for p in prompts])
    hits, timing = [], {"prefill_s": 0.0, "decode_s": 0.0}
    for s in range(0, len(prompts), trial_batch):
        r = engine.run(pre[s:s + trial_batch], qa[s:s + trial_batch, :-1], qa[s:s + trial_batch, 1:], configs, log=log)
        hits.append(r["hit"][:, :, -A:].all(-1))  # [t, C]: every answer token is the argmax
        for k in timing:
            timing[k] += r["timing"][k]
        log(f"  passkey ctx={context}: trials {s}..{s + len(pre[s:s + trial_batch]) - 1} "
            f"prefill {r['timing']['prefill_s']:.1f}s decode {r['timing']['decode_s']:.1f}s")
    hit = torch.cat(hits).float()  # [P, C]
    dep = torch.tensor([p[0] for p in prompts])
    rows = []
    for i, c in enumerate(configs):
        by_depth = {f"{d:g}": float(hit[dep == d, i].mean()) for d in depths}
        h = int(hit[:, i].sum())
        rows.append({"task": "passkey", "method": c.method, "mode": c.mode, "budget": c.budget,
                     "value": float(hit[:, i].mean()), "trials": len(prompts), **ci_fields(h, len(prompts)),
                     "context": N + QA,
                     "prefill": N, "decode_tokens": QA - 1, "question": question, "by_depth": by_depth,
                     **engine.row_fields(c)})
    return rows, timing


# ---------------------------------------------------------------------------------------------------------------
# RULER-style tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
# Models?"), generated offline from the shipped texts, decode mode as serving runs them: the haystack with its
# needles and the question are prefilled densely (but the question's last token), the answer is decoded sparsely
# and scored teacher-forced: a trial is a hit when every answer token is the argmax.

WILSON_Z = 1.959963984540054  # two-sided 95%


def wilson(hits: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of ``hits`` successes in ``n`` trials (95% by default); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def ci_fields(hits: int, n: int) -> dict:
    lo, hi = wilson(hits, n)
    return {"ci_low": lo, "ci_high": hi, "hits": int(hits)}


# keys of multikey / multivalue and the words of freqwords (common nouns; drawn without replacement by seed)
WORDS = ("apple", "river", "candle", "garden", "hammer", "violin", "pepper", "marble", "window", "rabbit",
         "silver", "forest", "ladder", "pillow", "rocket", "saddle", "tomato", "walnut", "anchor", "basket",
         "castle", "dragon", "falcon", "ginger", "helmet", "island", "jacket", "kettle", "lemon", "mirror",
         "needle", "orange", "parrot", "pencil", "planet", "shadow", "spider", "tunnel", "wallet", "zebra")

MK_NEEDLE = "\n\nThe special magic number for {key} is: {value}.\n\n"
RULER_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.\n\n")
VT_INTRO = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
VT_NEEDLE = "\n\nVAR {name} = {value}.\n\n"
FW_INTRO = ("Some words are listed within the following text. Count how often each listed word appears; "
            "I will ask you which words were listed most often.\n\n")
FW_NEEDLE = "\n\nListed word: {word}.\n\n"
NEW_TASKS = ("multikey", "multivalue", "vartrack", "freqwords")


def _magic(rng: random.Random) -> int:
    return rng.randrange(1000000, 10000000)  # 7 digits, as RULER


def _var_name(rng: random.Random, taken: set) -> str:
    while True:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in taken:
            taken.add(n)
            return n


def ruler_spec(task: str, rng: random.Random, **kw) -> dict:
    """One trial's text pieces: ``intro``, ``needles`` (strings, in context order), ``question`` (ends where the
    answer starts), ``answer`` (with its leading space: ``" " + ", ".join(items)``), ``items`` (the answer's
    parts, for the recall score), ``meta``. Deterministic given the rng state.

    - multikey: ``keys`` needles "The special magic number for <key> is: <value>", one per distinct key; the
      question asks ``queries`` of them (RULER's multikey / multiquery); the answer lists their values in the
      order asked.
    - multivalue: ``values`` needles with the same key and different values; the answer lists all of them in
      context order.
    - vartrack: ``chains`` chains of ``hops`` + 1 assignments (VAR A = 12345, VAR B = A, ...), interleaved in
      order; the question asks the value of the last variable of the first chain.
    - freqwords: ``words`` listed words, the ``top`` most frequent with counts top_count, top_count-1, ... and
      the others fewer (1..``rest_max``); the answer lists the top words, most frequent first.
    """
    if task == "multikey":
        n, k = kw.get("keys", 4), kw.get("queries", 1)
        keys = rng.sample(WORDS, n)
        vals = [_magic(rng) for _ in keys]
        asked = sorted(rng.sample(range(n), k))
        needles = [MK_NEEDLE.format(key=a, value=v) for a, v in zip(keys, vals)]
        ks = " and ".join(keys[i] for i in asked)
        if k == 1:
            q = f"\n\nWhat is the special magic number for {ks} mentioned in the provided text? " \
                f"The special magic number for {ks} mentioned in the provided text is"
        else:
            q = f"\n\nWhat are the special magic numbers for {ks} mentioned in the provided text? " \
                f"The special magic numbers for {ks} mentioned in the provided text are"
        ans = " " + ", ".join(str(vals[i]) for i in asked)
        return {"intro": RULER_INTRO, "needles": needles, "question": q, "answer": ans,
                "items": [str(vals[i]) for i in asked],
                "meta": {"keys": keys, "values": vals, "asked": [keys[i] for i in asked]}}
    if task == "multivalue":
        n = kw.get("values", 4)
        key = rng.choice(WORDS)
        vals = rng.sample(range(1000000, 10000000), n)
        needles = [MK_NEEDLE.format(key=key, value=v) for v in vals]
        q = f"\n\nWhat are all the special magic numbers for {key} mentioned in the provided text? " \
            f"The special magic numbers for {key} mentioned in the provided text are"
        return {"intro": RULER_INTRO, "needles": needles, "question": q,
                "answer": " " + ", ".join(str(v) for v in vals), "items": [str(v) for v in vals],
                "meta": {"key": key, "values": vals}}
    if task == "vartrack":
        hops, nch = kw.get("hops", 4), kw.get("chains", 2)
        taken: set = set()
        values = rng.sample(range(10000, 100000), nch)
        chains = []
        for c in range(nch):
            names = [_var_name(rng, taken) for _ in range(hops + 1)]
            chains.append((names, [VT_NEEDLE.format(name=names[0], value=values[c])]
                           + [VT_NEEDLE.format(name=names[i], value=names[i - 1]) for i in range(1, hops + 1)]))
        # interleave the chains at random, each chain's assignments in order
        order = [c for c in range(nch) for _ in range(hops + 1)]
        rng.shuffle(order)
        nxt = [0] * nch
        needles = []
        for c in order:
            needles.append(chains[c][1][nxt[c]])
            nxt[c] += 1
        last = chains[0][0][-1]
        q = f"\n\nWhat is the value of the variable {last}? Follow the chain of assignments. " \
            f"The value of {last} is"
        return {"intro": VT_INTRO, "needles": needles, "question": q, "answer": f" {values[0]}",
                "items": [str(values[0])],
                "meta": {"chain": chains[0][0], "value": values[0], "distractors": [c[0] for c in chains[1:]]}}
    if task == "freqwords":
        nw, top, rest_max = kw.get("words", 6), kw.get("top", 2), kw.get("rest_max", 2)
        top_count = kw.get("top_count", rest_max + top + 1)
        words = rng.sample(WORDS, nw)
        counts = {w: top_count - i for i, w in enumerate(words[:top])}
        counts.update({w: rng.randint(1, rest_max) for w in words[top:]})
        mentions = [w for w in words for _ in range(counts[w])]
        rng.shuffle(mentions)
        needles = [FW_NEEDLE.format(word=w) for w in mentions]
        what = "word was" if top == 1 else f"{top} words were"
        q = f"\n\nWhich {what} listed most often in the text above, most frequent first? " \
            f"Answer: the most frequently listed {'word is' if top == 1 else 'words are'}"
        return {"intro": FW_INTRO, "needles": needles, "question": q, "answer": " " + ", ".join(words[:top]),
                "items": list(words[:top]),
                "meta": {"counts": counts, "top": words[:top]}}
    raise ValueError(f"unknown task {task!r}; one of {NEW_TASKS}")


def item_ends(tok, question: str, q: list[int], a: list[int], items: list[str]) -> list[int]:
    """Where each answer item ends in the answer's tokens ``a`` (the question's tokens ``q`` precede them): the
    token count of the answer cut after item k, tokenized in context, for k = 1..n. One item spanning the whole
    answer when a cut does not tokenize as a prefix of the full answer."""
    ends = []
    for k in range(1, len(items) + 1):
        ids = _ids(tok, question + " " + ", ".join(items[:k]))
        cut = ids[len(q):]
        if ids[:len(q)] != q or a[:len(cut)] != cut or (ends and len(cut) <= ends[-1]):
            return [len(a)]
        ends.append(len(cut))
    return ends if ends and ends[-1] == len(a) else [len(a)]


def ruler_prompts(task: str, tok, corpus: Corpus, context: int, trials: int, block_size: int, seed: int = 0,
                  question: str = "prefill", **kw) -> list[dict]:
    """``trials`` prompts of one task, all with the same prefill length ``N`` (a block multiple; the longest
    prompt fits ``context``). Each: ``prefix`` (ids [N]), ``dec`` (decode ids: the question's last token + the
    answer, or with ``question="decode"`` the whole question + answer), ``answer_len``, ``needle_at`` (token
    offsets of every needle in ``prefix``), ``needle_ids``, ``spec``. The needles go at sorted random depths of
    a haystack window (document ``trial``), in the spec's order. Deterministic by (seed, context)."""
    if question not in ("prefill", "decode"):
        raise ValueError(f"question must be 'prefill' or 'decode', got {question!r}")
    if task not in NEW_TASKS:
        raise ValueError(f"unknown task {task!r}; one of {NEW_TASKS}")
    rng = random.Random(seed * 1000003 + context * 7 + NEW_TASKS.index(task))
    parts = []
    for t in range(trials):
        s = ruler_spec(task, rng, **kw)
        q = _ids(tok, s["question"])
        qa = _ids(tok, s["question"] + s["answer"])
        a = qa[len(q):] if qa[:len(q)] == q else _ids(tok, s["answer"])
        tail, dec = (q[:-1], q[-1:] + a) if question == "prefill" else ([], q + a)
        s["item_ends"] = item_ends(tok, s["question"], q, a, s["items"])
        parts.append((s, _bos(tok) + _ids(tok, s["intro"]), [_ids(tok, x) for x in s["needles"]], tail, dec,
                      len(a)))
    N = min((context - len(p[4])) // block_size * block_size for p in parts)
    out = []
    for t, (s, intro, needles, tail, dec, A) in enumerate(parts):
        n_hay = N - len(intro) - sum(map(len, needles)) - len(tail)
        if n_hay < 16:
            raise ValueError(f"context {context} too short for {task} ({len(needles)} needles)")
        _, hay = corpus.window(t, n_hay, rng)
        cuts = sorted(rng.randrange(0, n_hay + 1) for _ in needles)
        prefix, at, prev = list(intro), [], 0
        for c, nd in zip(cuts, needles):
            prefix += hay[prev:c]
            at.append(len(prefix))
            prefix += nd
            prev = c
        prefix += hay[prev:] + tail
        assert len(prefix) == N
        out.append({"prefix": prefix, "dec": dec, "answer_len": A, "needle_at": at, "needle_ids": needles,
                    "spec": s})
    return out


def ruler_task(engine: SparseEvalEngine, tok, texts, configs, task: str, context: int, trials: int, seed: int = 0,
               trial_batch: int = 8, log=print, question: str = "prefill", **kw) -> tuple[list, dict]:
    """Accuracy of ``task`` (multikey | multivalue | vartrack | freqwords) at ``context`` per config, with a 95%
    Wilson interval. Prompts share the prefill length; decode lengths may differ (batched by shape)."""
    corpus = Corpus(tok, texts, context)
    prompts = ruler_prompts(task, tok, corpus, context, trials, engine.BS, seed, question, **kw)
    N = len(prompts[0]["prefix"])
    shapes: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        shapes.setdefault((len(p["dec"]), p["answer_len"]), []).append(i)
    hit = torch.zeros(len(prompts), len(configs))
    item_hits = torch.zeros(len(prompts), len(configs))  # answer items whose tokens were all the argmax
    nll = torch.zeros(len(prompts), len(configs), dtype=torch.float64)
    timing = {"prefill_s": 0.0, "decode_s": 0.0}
    for (QA, A), idx in sorted(shapes.items()):
        for s in range(0, len(idx), trial_batch):
            b = idx[s:s + trial_batch]
            pre = torch.tensor([prompts[i]["prefix"] for i in b])
            qa = torch.tensor([prompts[i]["dec"] for i in b])
            r = engine.run(pre, qa[:, :-1], qa[:, 1:], configs, log=log)
            tok_hit = r["hit"][:, :, -A:]
            hit[b] = tok_hit.all(-1).float()
            for j, i in enumerate(b):
                ends = prompts[i]["spec"]["item_ends"]
                item_hits[i] = sum(tok_hit[j, :, s0:e].all(-1).float() for s0, e in zip([0] + ends[:-1], ends))
            nll[b] = r["nll"][:, :, -A:].double().mean(-1)
            for k in timing:
                timing[k] += r["timing"][k]
            log(f"  {task} ctx={context}: {len(b)} trials (answer {A} tokens) prefill "
                f"{r['timing']['prefill_s']:.1f}s decode {r['timing']['decode_s']:.1f}s")
    QA = max(len(p["dec"]) for p in prompts)
    rows = []
    n_items = sum(len(p["spec"]["item_ends"]) for p in prompts)
    for i, c in enumerate(configs):
        h, ih = int(hit[:, i].sum()), int(item_hits[:, i].sum())
        rlo, rhi = wilson(ih, n_items)
        rows.append({"task": task, "method": c.method, "mode": c.mode, "budget": c.budget,
                     "value": h / len(prompts), "trials": len(prompts), **ci_fields(h, len(prompts)),
                     "recall": ih / n_items, "items": n_items, "recall_ci_low": rlo, "recall_ci_high": rhi,
                     "context": N + QA, "prefill": N, "decode_tokens": QA - 1, "question": question,
                     "answer_nll": float(nll[:, i].mean()), "per_trial": [int(x) for x in hit[:, i]],
                     "task_args": {k: v for k, v in sorted(kw.items())}, **engine.row_fields(c)})
    return rows, timing
