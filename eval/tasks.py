"""Tasks: decode-mode perplexity, passkey retrieval, attention-output fidelity. Each returns JSON rows.

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
    ids = torch.tensor([w[1] for w in wins])
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
            per_layer = [float(x) for x in fid[i]]
            fid_rows.append({"task": "fidelity", "method": c.method, "mode": c.mode, "budget": c.budget,
                             **engine.row_fields(c),
                             "value": float(sum(per_layer) / len(per_layer)), "per_layer": per_layer,
                             "trials": min(trials, trial_batch), "steps": min(fidelity_steps, decode),
                             "context": N + decode, "metric": "mean over layers of ||o_sparse-o_dense||/||o_dense||"})
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
    intro, needle = _ids(tok, INTRO), _ids(tok, NEEDLE.format(key=key))
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
        rows.append({"task": "passkey", "method": c.method, "mode": c.mode, "budget": c.budget,
                     "value": float(hit[:, i].mean()), "trials": len(prompts), "context": N + QA,
                     "prefill": N, "decode_tokens": QA - 1, "question": question, "by_depth": by_depth,
                     **engine.row_fields(c)})
    return rows, timing
