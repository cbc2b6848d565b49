"""k-means++ initialisation in one Triton launch: one program per KV head runs all k D^2-sampling steps.

Sampling uses the Gumbel-max trick with noise drawn by the caller (``gumbel [k, H, N]``), so the torch loop in
:meth:`prescore.kernels.scoring.KMeans.init_centroids` (the reference) picks exactly the same centroids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PROGRAMS_PER_HEAD = 128


# Sizes that follow the prompt length (keys, programs, tiles and the strides they set) are runtime values, not
# specialised: one build per model shape serves every prompt (built at start by the backend's warm-up).
@triton.jit(do_not_specialize=["N", "K", "s_xh", "s_xn", "s_gk", "s_gh"])
def _kmeanspp_kernel(X, IDX0, GUMBEL, D2, CENT, N, K,
                     s_xh, s_xn, s_xd, s_gk, s_gh, s_gn, s_ch, s_ck, s_cd,
                     HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, CHN: tl.constexpr):
    h = tl.program_id(0)
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_SIZE
    xb = X + h * s_xh
    d2b = D2 + h * N
    idx = tl.load(IDX0 + h).to(tl.int64)
    c = tl.load(xb + idx * s_xn + d * s_xd, mask=dm, other=0.0).to(tl.float32)
    tl.store(CENT + h * s_ch + d * s_cd, c, mask=dm)
    for j in range(1, K):
        best_v = float("-inf")
        best_i = tl.zeros([], dtype=tl.int64)
        for n0 in range(0, N, CHN):
            n = n0 + tl.arange(0, CHN)
            nm = n < N
            x = tl.load(xb + n[:, None] * s_xn + d[None, :] * s_xd, mask=nm[:, None] & dm[None, :],
                        other=0.0).to(tl.float32)
            diff = x - c[None, :]
            dd = tl.sum(diff * diff, 1)
            d2 = tl.minimum(tl.load(d2b + n, mask=nm, other=0.0), dd)
            tl.store(d2b + n, d2, mask=nm)
            g = tl.load(GUMBEL + j * s_gk + h * s_gh + n * s_gn, mask=nm, other=0.0)
            logit = tl.where(nm, tl.log(tl.maximum(d2, 1e-30)) + g, float("-inf"))
            m = tl.max(logit, 0)
            a = tl.argmax(logit, 0).to(tl.int64) + n0
            better = m > best_v
            best_i = tl.where(better, a, best_i)
            best_v = tl.where(better, m, best_v)
        c = tl.load(xb + best_i * s_xn + d * s_xd, mask=dm, other=0.0).to(tl.float32)
        tl.store(CENT + h * s_ch + j * s_ck + d * s_cd, c, mask=dm)


def kmeanspp_triton(sample: torch.Tensor, idx0: torch.Tensor, gumbel: torch.Tensor, k: int) -> torch.Tensor:
    """sample [H, N, D] (any float dtype) -> centroids [H, k, D] float32."""
    H, N, D = sample.shape
    cents = torch.empty(H, k, D, dtype=torch.float32, device=sample.device)
    d2 = torch.full((H, N), float("inf"), dtype=torch.float32, device=sample.device)
    D_PAD = triton.next_power_of_2(D)
    _kmeanspp_kernel[(H,)](
        sample, idx0, gumbel, d2, cents, N, k,
        sample.stride(0), sample.stride(1), sample.stride(2), gumbel.stride(0), gumbel.stride(1), gumbel.stride(2),
        cents.stride(0), cents.stride(1), cents.stride(2),
        HEAD_SIZE=D, D_PAD=D_PAD, CHN=max(16, 16384 // D_PAD), num_warps=8,
    )
    return cents


@triton.jit(do_not_specialize=["T", "K", "TILES", "s_xh", "s_xt", "s_ph", "s_pp"])
def _assign_kernel(X, CENT, ASSIGN, DIST, PSUM, PCNT, T, K, TILES,
                   s_xh, s_xt, s_xd, s_ch, s_ck, s_cd, s_ph, s_pp, s_pk, s_pd,
                   HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Nearest centroid of TILES x BLOCK_T keys; exact distance to it; per-cluster sums and counts of them."""
    h = tl.program_id(0)
    p = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    kk = tl.arange(0, K_PAD)
    dm = d < HEAD_SIZE
    km = kk < K
    c = tl.load(CENT + h * s_ch + kk[:, None] * s_ck + d[None, :] * s_cd, mask=km[:, None] & dm[None, :], other=0.0)
    cc = tl.sum(c * c, 1)
    psum = tl.zeros([K_PAD, D_PAD], dtype=tl.float32)
    pcnt = tl.zeros([K_PAD], dtype=tl.float32)
    for tile in range(TILES):
        t = (p * TILES + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = t < T
        x = tl.load(X + h * s_xh + t[:, None].to(tl.int64) * s_xt + d[None, :] * s_xd,
                    mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        xc = tl.dot(x, tl.trans(c))  # [BLOCK_T, K_PAD]
        d2 = tl.where(km[None, :], cc[None, :] - 2 * xc, float("inf"))
        a = tl.argmin(d2, 1)  # [BLOCK_T]
        ca = tl.load(CENT + h * s_ch + a[:, None] * s_ck + d[None, :] * s_cd, mask=dm[None, :], other=0.0)
        diff = x - ca
        dist = tl.sqrt(tl.sum(diff * diff, 1))
        tl.store(ASSIGN + h * T + t, a.to(tl.int32), mask=tm)
        tl.store(DIST + h * T + t, dist, mask=tm)
        onehot = ((a[:, None] == kk[None, :]) & tm[:, None]).to(tl.float32)  # [BLOCK_T, K_PAD]
        psum += tl.dot(tl.trans(onehot), x)  # [K_PAD, D_PAD]
        pcnt += tl.sum(onehot, 0)
    pb = PSUM + h * s_ph + p * s_pp
    tl.store(pb + kk[:, None] * s_pk + d[None, :] * s_pd, psum, mask=km[:, None] & dm[None, :])
    tl.store(PCNT + (h * tl.num_programs(1) + p) * K + kk, pcnt, mask=km)


@triton.jit(do_not_specialize=["P", "K", "s_ph", "s_pp"])
def _update_kernel(PSUM, PCNT, CENT, P, K, s_ph, s_pp, s_pk, s_ch, s_ck, HEAD_SIZE: tl.constexpr,
                   D_PAD: tl.constexpr, P_TILE: tl.constexpr):
    """Centroid k of head h = mean of its keys (sum of the programs' partials, P_TILE at a time); unchanged if it
    has none."""
    h = tl.program_id(0)
    k = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_SIZE
    tot = tl.zeros([D_PAD], dtype=tl.float32)
    cnt = tl.zeros([], dtype=tl.float32)
    for p0 in range(0, P, P_TILE):
        pp = p0 + tl.arange(0, P_TILE)
        pm = pp < P
        ps = tl.load(PSUM + h * s_ph + pp[:, None] * s_pp + k * s_pk + d[None, :], mask=pm[:, None] & dm[None, :],
                     other=0.0)
        tot += tl.sum(ps, 0)
        cnt += tl.sum(tl.load(PCNT + (h * P + pp) * K + k, mask=pm, other=0.0), 0)
    old = tl.load(CENT + h * s_ch + k * s_ck + d, mask=dm, other=0.0)
    new = tl.where(cnt > 0, tot / tl.maximum(cnt, 1.0), old)
    tl.store(CENT + h * s_ch + k * s_ck + d, new, mask=dm)


def lloyd_triton(x: torch.Tensor, cents: torch.Tensor, iters: int):
    """``iters`` Lloyd iterations (2 launches each, buffers allocated once), then the final assignment.
    Returns (centroids [H, K, D] f32, assign [H, T] int64, dist [H, T] f32)."""
    H, T, D = x.shape
    K = cents.shape[1]
    D_PAD = triton.next_power_of_2(D)
    BLOCK_T = 64 if D_PAD <= 128 else 32
    TILES = max(1, min(8, T // (BLOCK_T * PROGRAMS_PER_HEAD)))  # enough programs per head, then longer tiles
    P = triton.cdiv(T, BLOCK_T * TILES)
    cents = cents.contiguous().clone()
    assign = torch.empty(H, T, dtype=torch.int32, device=x.device)
    dist = torch.empty(H, T, dtype=torch.float32, device=x.device)
    psum = torch.empty(H, P, K, D, dtype=torch.float32, device=x.device)
    pcnt = torch.empty(H, P, K, dtype=torch.float32, device=x.device)
    K_PAD = max(16, triton.next_power_of_2(K))
    for it in range(iters + 1):
        _assign_kernel[(H, P)](
            x, cents, assign, dist, psum, pcnt, T, K, TILES,
            x.stride(0), x.stride(1), x.stride(2), cents.stride(0), cents.stride(1), cents.stride(2),
            psum.stride(0), psum.stride(1), psum.stride(2), psum.stride(3),
            HEAD_SIZE=D, D_PAD=D_PAD, K_PAD=K_PAD, BLOCK_T=BLOCK_T, num_warps=4,
        )
        if it < iters:
            _update_kernel[(H, K)](psum, pcnt, cents, P, K, psum.stride(0), psum.stride(1), psum.stride(2),
                                   cents.stride(0), cents.stride(1), HEAD_SIZE=D, D_PAD=D_PAD, P_TILE=32,
                                   num_warps=4)
    return cents, assign.long(), dist
