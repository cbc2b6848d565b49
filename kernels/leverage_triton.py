"""Ridge leverage on the GPU in three Triton launches: Gram partials, Gauss-Jordan inverse, fused quadratic form.

``gram_triton``: per KV head, partial sums of K^T K and of K over tiles of keys (bf16 operands, fp32
accumulation), reduced by the caller. ``inverse_triton``: in-register Gauss-Jordan inverse of the SPD
D x D matrix (no pivoting needed: SPD, conditioned by the ridge). ``quad_triton``: l_i = (k_i - mu)^T A^-1
(k_i - mu) in one pass over the keys. The torch code in :class:`prescore.kernels.scoring.Leverage` is the
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import _INTERPRET  # the interpreter's bf16 dot is wrong (triton 3.7): upcast there only


@triton.jit
def _gram_kernel(X, PG, PS, T, s_xh, s_xt, s_xd, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK_T: tl.constexpr, TILES: tl.constexpr, UPCAST: tl.constexpr):
    h = tl.program_id(0)
    p = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_SIZE
    acc = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    s = tl.zeros([D_PAD], dtype=tl.float32)
    for tile in range(TILES):
        t = (p * TILES + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        k = tl.load(X + h * s_xh + t[:, None].to(tl.int64) * s_xt + d[None, :] * s_xd,
                    mask=(t < T)[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        acc += tl.dot(tl.trans(k), k)
        s += tl.sum(k.to(tl.float32), 0)
    base = (h * tl.num_programs(1) + p).to(tl.int64)
    tl.store(PG + base * D_PAD * D_PAD + d[:, None] * D_PAD + d[None, :], acc)
    tl.store(PS + base * D_PAD + d, s)


def gram_triton(keys: torch.Tensor):
    """keys [H, T, D] -> (K^T K [H, D, D] f32, sum of keys [H, D] f32)."""
    H, T, D = keys.shape
    D_PAD = triton.next_power_of_2(D)
    BLOCK_T = 64
    TILES = max(1, min(16, T // (BLOCK_T * 32)))
    P = triton.cdiv(T, BLOCK_T * TILES)
    pg = torch.empty(H, P, D_PAD, D_PAD, dtype=torch.float32, device=keys.device)
    ps = torch.empty(H, P, D_PAD, dtype=torch.float32, device=keys.device)
    _gram_kernel[(H, P)](keys, pg, ps, T, keys.stride(0), keys.stride(1), keys.stride(2), HEAD_SIZE=D,
                         D_PAD=D_PAD, BLOCK_T=BLOCK_T, TILES=TILES, num_warps=8,
                         UPCAST=_INTERPRET and keys.dtype == torch.bfloat16)
    return pg.sum(1)[:, :D, :D], ps.sum(1)[:, :D]


@triton.jit
def _gj_kernel(A, OUT, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr):
    """In-place Gauss-Jordan inversion of one SPD matrix held in registers."""
    h = tl.program_id(0)
    i = tl.arange(0, D_PAD)
    m2 = (i < HEAD_SIZE)[:, None] & (i < HEAD_SIZE)[None, :]
    base = h.to(tl.int64) * HEAD_SIZE * HEAD_SIZE
    a = tl.load(A + base + i[:, None] * HEAD_SIZE + i[None, :], mask=m2, other=0.0)
    a = tl.where((i[:, None] == i[None, :]) & (i[:, None] >= HEAD_SIZE), 1.0, a)  # identity padding
    for k in range(HEAD_SIZE):
        rowk = tl.sum(tl.where(i[:, None] == k, a, 0.0), 0)  # a[k, :]
        colk = tl.sum(tl.where(i[None, :] == k, a, 0.0), 1)  # a[:, k]
        piv = tl.sum(tl.where(i == k, rowk, 0.0), 0)
        inv = 1.0 / piv
        r = tl.where(i == k, 1.0 + inv, rowk * inv)  # so that a[i,k] becomes -a[i,k]/piv below
        c = tl.where(i == k, 0.0, colk)
        a = a - c[:, None] * r[None, :]
        newk = tl.where(i == k, inv, rowk * inv)
        a = tl.where(i[:, None] == k, newk[None, :], a)
    tl.store(OUT + base + i[:, None] * HEAD_SIZE + i[None, :], a, mask=m2)


def inverse_triton(a: torch.Tensor) -> torch.Tensor:
    """[H, D, D] SPD float32 -> inverse (float32)."""
    H, D, _ = a.shape
    a = a.contiguous()
    out = torch.empty_like(a)
    _gj_kernel[(H,)](a, out, HEAD_SIZE=D, D_PAD=triton.next_power_of_2(D), num_warps=8)
    return out


@triton.jit
def _quad_kernel(X, MU, AINV, OUT, T, s_xh, s_xt, s_xd, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    h = tl.program_id(0)
    p = tl.program_id(1)
    t = p * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_SIZE
    tm = t < T
    mu = tl.load(MU + h * HEAD_SIZE + d, mask=dm, other=0.0)
    ainv = tl.load(AINV + h.to(tl.int64) * HEAD_SIZE * HEAD_SIZE + d[:, None] * HEAD_SIZE + d[None, :],
                   mask=dm[:, None] & dm[None, :], other=0.0)
    x = tl.load(X + h * s_xh + t[:, None].to(tl.int64) * s_xt + d[None, :] * s_xd, mask=tm[:, None] & dm[None, :],
                other=0.0).to(tl.float32)
    x = tl.where(dm[None, :], x - mu[None, :], 0.0)
    y = tl.dot(x, ainv)
    tl.store(OUT + h * T + t, tl.sum(x * y, 1), mask=tm)


def quad_triton(keys: torch.Tensor, mu: torch.Tensor, ainv: torch.Tensor) -> torch.Tensor:
    """keys [H, T, D], mu [H, D] f32, ainv [H, D, D] f32 -> [H, T] f32."""
    H, T, D = keys.shape
    out = torch.empty(H, T, dtype=torch.float32, device=keys.device)
    BLOCK_T = 64
    _quad_kernel[(H, triton.cdiv(T, BLOCK_T))](keys, mu.contiguous(), ainv.contiguous(), out, T, keys.stride(0),
                                                keys.stride(1), keys.stride(2), HEAD_SIZE=D,
                                                D_PAD=triton.next_power_of_2(D), BLOCK_T=BLOCK_T, num_warps=4)
    return out
