"""Tests for prescore.models: the tiny random Llama builder (fast) and the SmolLM2 folder (only when it is
already cached, or when PRESCORE_SLOW=1 allows the ~45 s conversion and the vLLM checks)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from prescore import models

SLOW = os.environ.get("PRESCORE_SLOW") == "1"


def _read_all(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_import_is_light():
    code = "import sys, prescore.models; assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_root_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PRESCORE_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"
    assert models.smollm2_cached() is None
    monkeypatch.delenv("PRESCORE_CACHE")
    assert str(models.cache_root()).endswith(os.path.join(".cache", "prescore"))


def test_tiny_fast_and_deterministic(tmp_path):
    t0 = time.perf_counter()
    a = models.build_tiny_llama(tmp_path / "a", seed=0)
    assert time.perf_counter() - t0 < 10
    b = models.build_tiny_llama(tmp_path / "b", seed=0)
    c = models.build_tiny_llama(tmp_path / "c", seed=1)
    fa, fb, fc = _read_all(a), _read_all(b), _read_all(c)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(fa)
    assert fa == fb
    assert fa["model.safetensors"] != fc["model.safetensors"]
    assert fa["tokenizer.json"] == fc["tokenizer.json"]
    cfg = json.loads(fa["config.json"])
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (2, 4, 2, 64, 512, 4096)
    assert cfg["rope_theta"] == 10000.0


@pytest.mark.parametrize("shape", [
    dict(),
    dict(num_layers=3, hidden=192, heads=6, kv_heads=2, head_dim=32, vocab=400, max_pos=2048),
    dict(heads=4, kv_heads=1, tie_embeddings=True),
])
def test_tiny_loads_in_transformers(tmp_path, shape):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = models.build_tiny_llama(tmp_path / "m", seed=3, **shape)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    vocab = shape.get("vocab", 512)
    assert len(tok) == vocab == model.config.vocab_size

    text = "hello world, The capital of France is Paris. Ünïcode 😀 {x: 1}"
    enc = tok(text)["input_ids"]
    assert enc[0] == tok.bos_token_id
    assert tok.decode(enc, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"

    ids = torch.tensor([enc])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, len(enc), vocab)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0
    # The output depends on context (attention is doing something).
    ids2 = ids.clone()
    ids2[0, 1] = (ids2[0, 1] + 1) % vocab
    with torch.no_grad():
        assert not torch.allclose(model(ids2).logits[0, -1], logits[0, -1])


def test_tiny_gemma3_deterministic_and_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    a = models.build_tiny_gemma3(tmp_path / "a", seed=0)
    b = models.build_tiny_gemma3(tmp_path / "b", seed=0)
    fa = _read_all(a)
    assert fa == _read_all(b)
    cfg = json.loads(fa["config.json"])
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["sliding_window"] == 64
    assert cfg["layer_types"] == ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + [
        "full_attention"]
    assert models.gemma3_layer_types(18, 6).count("full_attention") == 3  # gemma-3-270m's 5:1
    model, info = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.layer_types == cfg["layer_types"] and model.config.head_dim == 32
    ids = transformers.AutoTokenizer.from_pretrained(a)("The capital of France is Paris.", return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(ids["input_ids"]).logits
    assert torch.isfinite(logits).all() and logits[0, -1].std() > 0


_VLLM_SCRIPT = textwrap.dedent("""
    import sys
    from vllm import LLM, SamplingParams
    d, mml, kv, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    llm = LLM(model=d, max_model_len=mml, kv_cache_memory_bytes=kv, enforce_eager=True)
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    print("RESULT=" + repr(out.text), len(out.token_ids))
""")


def _vllm_generate(d, max_model_len, kv_bytes, prompt):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    res = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, str(d), str(max_model_len), str(kv_bytes), prompt],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT=")][-1]
    return line


@pytest.mark.skipif(not SLOW, reason="vLLM engine start is slow; set PRESCORE_SLOW=1")
def test_tiny_loads_in_vllm(tmp_path):
    d = models.build_tiny_llama(tmp_path / "m")
    line = _vllm_generate(d, 1024, 1 << 28, "hello world")
    assert line.endswith(" 8")


def _smollm2_or_skip():
    d = models.smollm2_cached()
    if d is None and not SLOW:
        pytest.skip("SmolLM2 not cached; set PRESCORE_SLOW=1 to convert it (~45 s)")
    return d or models.smollm2_dir()


def test_smollm2_folder():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = _smollm2_or_skip()
    assert models.smollm2_dir() == d  # cached: returns at once
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["rope_theta"] == 100000.0
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["vocab_size"], cfg["max_position_embeddings"]) == (30, 9, 3, 64, 49152, 8192)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"]

    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


@pytest.mark.skipif(not SLOW, reason="vLLM engine start is slow; set PRESCORE_SLOW=1")
def test_smollm2_in_vllm():
    d = _smollm2_or_skip()
    line = _vllm_generate(d, 4096, 1 << 30, "The capital of France is")
    assert "Paris" in line


def test_convert_gguf_file_checks_and_is_idempotent(tmp_path, monkeypatch):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(RuntimeError, match="bad magic"):
        models.convert_gguf_file(bad, tmp_path / "out")
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + bytes(60))
    out = tmp_path / "out"
    out.mkdir()
    marker = {"format": models._FORMAT, "gguf_sha256": models._sha256(g)}
    (out / models.MARKER).write_text(json.dumps(marker))
    monkeypatch.setattr(models, "install_converted", lambda *a: pytest.fail("converted again"))
    assert models.convert_gguf_file(g, out) == out.resolve()  # same GGUF: returned at once
    calls = []
    monkeypatch.setattr(models, "install_converted", lambda gguf, final, m: calls.append((gguf, final, m)))
    (out / models.MARKER).write_text(json.dumps({**marker, "gguf_sha256": "0" * 64}))
    models.convert_gguf_file(g, out, source="test")  # another GGUF: the old folder goes, then converts
    assert not out.exists() and calls[0][1] == out.resolve() and calls[0][2]["source"] == "test"
    assert calls[0][2]["gguf_sha256"] == models._sha256(g)
