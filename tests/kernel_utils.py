"""Shared builders for the kernel tests: random paged caches in vLLM's layouts, the methods x modes matrix."""

import contextlib

import torch

from prescore.kernels import METHODS, MODE_NAMES, register_method


def rel_err(out, ref):
    out = out.double()
    ref = ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def make_paged(seq_lens, Hkv, D, BS, dtype, layout="NHD", extra_blocks=3, scale=1.0, gen=None, device="cpu"):
    """Random paged cache holding len(seq_lens) sequences in shuffled physical blocks.

    layout "NHD": vLLM GPU (token-major inside a block); "HND": CPU attention (head-major).
    Returns kv_cache view [NB, Hkv, BS, 2D], block_table [B, MB] int32, seq_lens int32.
    """
    nblk = [-(-L // BS) for L in seq_lens]
    MB = max(nblk) + 1
    NB = sum(nblk) + extra_blocks
    if layout == "NHD":
        kv = (torch.randn(NB, BS, Hkv, 2 * D, generator=gen) * scale).to(dtype).permute(0, 2, 1, 3)
    else:
        kv = (torch.randn(NB, Hkv, BS, 2 * D, generator=gen) * scale).to(dtype)
    perm = torch.randperm(NB, generator=gen)
    bt = torch.zeros(len(seq_lens), MB, dtype=torch.int32)
    o = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = perm[o:o + n].int()
        bt[b, n:] = perm[-1]  # padding entries point at a real block, as vLLM's do
        o += n
    return kv.to(device), bt.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------------------
# The one test matrix: every registered scoring method x every mode, from the registry (kernel tests
# parametrize from these, never from hand-written lists)
# ----------------------------------------------------------------------------------------------------------

METHOD_NAMES = tuple(METHODS)
QUERY_MODES = tuple(m for m in MODE_NAMES if m != "prior")  # the modes that read the query
MATRIX = [(m, md) for m in METHOD_NAMES for md in MODE_NAMES]


@contextlib.contextmanager
def registered(cls):
    """``cls`` registered as a scoring method for the block (appended: the others keep their ids), then removed."""
    cls = register_method(cls)
    try:
        yield cls
    finally:
        METHODS.pop(cls.name, None)


def compile_for_cuda(kernel, pointers: dict, constexprs: dict, arch: int = 90, scalar: str = "i64"):
    """Compile a Triton kernel for an NVIDIA GPU (sm_``arch``) on this machine, no GPU needed: what the CUDA
    path would build. ``pointers``: {arg: "*bf16", ...}; other non-constexpr args are ``scalar`` (a Python int
    argument below 2**31 is i32 at launch)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: pointers.get(n, "constexpr" if n in constexprs else scalar) for n in names}
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32))


def run_compile_check(code: str, timeout: int = 900) -> None:
    """Run ``code`` (which compiles kernels with :func:`compile_for_cuda` and prints "compiled") in a process
    without the Triton interpreter, with tests/ on the path; skip when the NVIDIA compiler is missing (the code
    raises ``SystemExit("SKIP ...")``)."""
    import os
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode and "SKIP" in r.stderr:
        pytest.skip(r.stderr.strip()[-300:])
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
