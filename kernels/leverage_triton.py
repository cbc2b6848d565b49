"""Ridge leverage on the GPU in three Triton launches: Gram partials, fit (reduce + centre + ridge + inverse),
fused quadratic form; keys read in place from the paged cache.

``fit_triton``: per KV head, partial sums of K^T K and of K over tiles of keys (bf16 operands, fp32
accumulation), then one kernel that reduces them, centres, adds the ridge and inverts the SPD D x D matrix in
registers (symmetric sweep, no pivoting needed: SPD, conditioned by the ridge; ``inverse_triton`` is the same
inverse alone). ``quad_triton``: l_i = (k_i - mu)^T A^-1 (k_i - mu) in one pass over the keys. The torch code in :class:`prescore.kernels.scoring.Leverage` is the
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import _INTERPRET  # the interpreter's bf16 dot is wrong (triton 3.7): upcast there only


@triton.jit
def _paged_rows(KV, PHYS, h, t, d, T, s_kb, s_kh, s_kt, s_kd, BS: tl.constexpr):
    """Pointers and mask of the keys of token rows t (of one sequence whose blocks are PHYS) for KV head h."""
    tm = t < T
    phys = tl.load(PHYS + t // BS, mask=tm, other=0).to(tl.int64)
    ptr = KV + phys[:, None] * s_kb + h * s_kh + (t % BS)[:, None] * s_kt + d[None, :] * s_kd
    return ptr, tm


@triton.jit
def _gram_kernel(KV, PHYS, PG, PS, T, s_kb, s_kh, s_kt, s_kd, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
                 BS: tl.constexpr, BLOCK_T: tl.constexpr, TILES: tl.constexpr, UPCAST: tl.constexpr):
    h = tl.program_id(0)
    p = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_SIZE
    acc = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    s = tl.zeros([D_PAD], dtype=tl.float32)
    for tile in range(TILES):
        t = (p * TILES + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        ptr, tm = _paged_rows(KV, PHYS, h, t, d, T, s_kb, s_kh, s_kt, s_kd, BS)
        k = tl.load(ptr, mask=tm[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        acc += tl.dot(tl.trans(k), k)
        s += tl.sum(k.to(tl.float32), 0)
    base = (h * tl.num_programs(1) + p).to(tl.int64)
    tl.store(PG + base * D_PAD * D_PAD + d[:, None] * D_PAD + d[None, :], acc)
    tl.store(PS + base * D_PAD + d, s)


def _kv_args(kv_cache):
    return (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3))


def _gram_partials(kv_cache: torch.Tensor, phys: torch.Tensor, T: int):
    """Per-program partial sums of K^T K and of K over tokens [0, T) of the sequence in physical blocks
    ``phys``, read in place from the paged cache -> (pg [H, P, D_PAD, D_PAD], ps [H, P, D_PAD], P)."""
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    D_PAD = triton.next_power_of_2(D)
    BLOCK_T = 64
    TILES = max(1, min(16, T // (BLOCK_T * 64)))
    P = triton.cdiv(T, BLOCK_T * TILES)
    pg = torch.empty(H, P, D_PAD, D_PAD, dtype=torch.float32, device=kv_cache.device)
    ps = torch.empty(H, P, D_PAD, dtype=torch.float32, device=kv_cache.device)
    _gram_kernel[(H, P)](kv_cache, phys, pg, ps, T, *_kv_args(kv_cache), HEAD_SIZE=D, D_PAD=D_PAD, BS=BS,
                         BLOCK_T=BLOCK_T, TILES=TILES, num_warps=8,
                         UPCAST=_INTERPRET and kv_cache.dtype == torch.bfloat16)
    return pg, ps, P


@triton.jit
def _sweep_all(a, i, HEAD_SIZE: tl.constexpr):
    """Inverse of the SPD matrix ``a`` (registers, [D_PAD, D_PAD], identity padding) by sweeping every pivot:
    the sweep maps A to -A^-1 and keeps it symmetric, so each step extracts one row (= column) and its pivot."""
    for k in range(HEAD_SIZE):
        row = tl.sum(tl.where(i[:, None] == k, a, 0.0), 0)  # a[k, :] == a[:, k]
        piv = tl.sum(tl.where(i == k, row, 0.0), 0)
        inv = 1.0 / piv
        rs = row * inv
        a = a - rs[:, None] * row[None, :]  # a_ij - a_ik a_kj / a_kk
        edge = tl.where(i == k, -inv, rs)  # row/column k: a_kj / a_kk, pivot -1 / a_kk
        a = tl.where(i[:, None] == k, edge[None, :], a)
        a = tl.where(i[None, :] == k, edge[:, None], a)
    return -a


@triton.jit
def _sweep_kernel(A, OUT, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr):
    """Inverse of one SPD matrix held in registers by the symmetric sweep operator: sweeping every pivot maps
    A to -A^-1 and keeps the matrix symmetric, so each step extracts one row (= column) and its pivot."""
    h = tl.program_id(0)
    i = tl.arange(0, D_PAD)
    m2 = (i < HEAD_SIZE)[:, None] & (i < HEAD_SIZE)[None, :]
    base = h.to(tl.int64) * HEAD_SIZE * HEAD_SIZE
    a = tl.load(A + base + i[:, None] * HEAD_SIZE + i[None, :], mask=m2, other=0.0)
    a = tl.where((i[:, None] == i[None, :]) & (i[:, None] >= HEAD_SIZE), 1.0, a)  # identity padding
    tl.store(OUT + base + i[:, None] * HEAD_SIZE + i[None, :], _sweep_all(a, i, HEAD_SIZE), mask=m2)


SWEEP_WARPS = 4


@triton.jit
def _fit_kernel(PG, PS, STATE, P, T, ridge, s_state, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr):
    """One KV head: sum the Gram partials, centre (K^T K - T mu mu^T), add the ridge (ridge * trace / D),
    invert in registers (symmetric sweep), and write the state row [mu | A^-1]. One launch, no host work."""
    h = tl.program_id(0)
    i = tl.arange(0, D_PAD)
    dm = i < HEAD_SIZE
    m2 = dm[:, None] & dm[None, :]
    a = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    s = tl.zeros([D_PAD], dtype=tl.float32)
    for p in range(P):
        base = (h * P + p).to(tl.int64)
        a += tl.load(PG + base * D_PAD * D_PAD + i[:, None] * D_PAD + i[None, :])
        s += tl.load(PS + base * D_PAD + i)
    mu = s / T
    a = a - T * mu[:, None] * mu[None, :]
    diag = i[:, None] == i[None, :]
    tr = tl.sum(tl.sum(tl.where(diag & m2, a, 0.0), 1), 0)
    lam = ridge * tl.maximum(tr, 1e-12) / HEAD_SIZE
    a = tl.where(diag, a + lam, a)
    a = tl.where(m2 | diag, a, 0.0)
    a = tl.where(diag & (i[:, None] >= HEAD_SIZE), 1.0, a)
    a = _sweep_all(a, i, HEAD_SIZE)
    out = STATE + h.to(tl.int64) * s_state
    tl.store(out + i, mu, mask=dm)
    tl.store(out + HEAD_SIZE + i[:, None] * HEAD_SIZE + i[None, :], a, mask=m2)


def fit_triton(kv_cache: torch.Tensor, phys: torch.Tensor, T: int, ridge: float) -> torch.Tensor:
    """Leverage state [H, D + D*D] = [mu | (K_c^T K_c + lam I)^-1] of tokens [0, T): two launches."""
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    pg, ps, P = _gram_partials(kv_cache, phys, T)
    state = torch.empty(H, D + D * D, dtype=torch.float32, device=kv_cache.device)
    _fit_kernel[(H,)](pg, ps, state, P, T, float(ridge), state.stride(0), HEAD_SIZE=D, D_PAD=pg.shape[-1],
                      num_warps=SWEEP_WARPS)
    return state


def inverse_triton(a: torch.Tensor, num_warps: int | None = None) -> torch.Tensor:
    """[H, D, D] SPD float32 -> inverse (float32)."""
    H, D, _ = a.shape
    a = a.contiguous()
    out = torch.empty_like(a)
    _sweep_kernel[(H,)](a, out, HEAD_SIZE=D, D_PAD=triton.next_power_of_2(D), num_warps=num_warps or SWEEP_WARPS)
    return out


@triton.jit
def _quad_kernel(KV, PHYS, MU, AINV, OUT, SCORES, KMIN, KMAX, TAGS, tag, T, s_mu, s_ai, s_out,
                 s_kb, s_kh, s_kt, s_kd, s_sc_b, s_sc_h, s_mn_b, s_mn_h, s_mn_d,
                 HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
                 TILES: tl.constexpr, SUMMARIZE: tl.constexpr):
    """Leverage of each key; with SUMMARIZE, also the block summaries (max score, key min/max, tag) of the
    BLOCK_T // BS whole blocks of each tile, written in place of a separate summarize pass."""
    h = tl.program_id(0)
    p = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_SIZE
    mu = tl.load(MU + h * s_mu + d, mask=dm, other=0.0)
    ainv = tl.load(AINV + h.to(tl.int64) * s_ai + d[:, None] * HEAD_SIZE + d[None, :],
                   mask=dm[:, None] & dm[None, :], other=0.0)
    NBT: tl.constexpr = BLOCK_T // BS
    for tile in range(TILES):
        t = (p * TILES + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        ptr, tm = _paged_rows(KV, PHYS, h, t, d, T, s_kb, s_kh, s_kt, s_kd, BS)
        raw = tl.load(ptr, mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        x = tl.where(dm[None, :], raw - mu[None, :], 0.0)
        y = tl.dot(x, ainv)
        lev = tl.sum(x * y, 1)
        if SUMMARIZE:
            blk = (p * TILES + tile) * NBT + tl.arange(0, NBT)
            bm = blk * BS < T
            phys = tl.load(PHYS + blk, mask=bm, other=0).to(tl.int64)
            sc = tl.max(tl.reshape(tl.where(tm, lev, float("-inf")), (NBT, BS)), 1)
            v3 = tl.reshape(tm[:, None] & dm[None, :], (NBT, BS, D_PAD))
            r3 = tl.reshape(raw, (NBT, BS, D_PAD))
            kmin = tl.min(tl.where(v3, r3, float("inf")), 1)
            kmax = tl.max(tl.where(v3, r3, float("-inf")), 1)
            tl.store(SCORES + phys * s_sc_b + h * s_sc_h, sc, mask=bm)
            mo = phys[:, None] * s_mn_b + h * s_mn_h + d[None, :] * s_mn_d
            mm = bm[:, None] & dm[None, :]
            tl.store(KMIN + mo, kmin.to(KMIN.dtype.element_ty), mask=mm)
            tl.store(KMAX + mo, kmax.to(KMAX.dtype.element_ty), mask=mm)
            tl.store(TAGS + phys, tl.zeros([NBT], dtype=tl.int64) + tag, mask=bm & (h == 0))
        else:
            tl.store(OUT + h * s_out + t, lev, mask=tm)


def quad_triton(kv_cache: torch.Tensor, phys: torch.Tensor, T: int, mu: torch.Tensor, ainv: torch.Tensor,
                summ=None, tag: int = 0):
    """Leverage of tokens [0, T) read in place from the paged cache; mu [H, D], ainv [H, D, D] (or their views
    of a state row: any head stride, rows contiguous) -> [H, T] f32. With ``summ`` (BlockSummaries), writes the
    blocks' summaries and ``tag`` directly and returns None."""
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    BLOCK_T = max(64, BS)
    TILES = max(1, min(16, T // (BLOCK_T * 128)))
    Tp = -(-T // BS) * BS  # rows padded to whole blocks (the tail is never written), so [H, n, BS] is a view
    out = torch.empty(H, Tp, dtype=torch.float32, device=kv_cache.device)[:, :T] if summ is None else None
    sc, mn, mx, tg = (summ.scores, summ.kmin, summ.kmax, summ.tags) if summ is not None else (mu,) * 4
    _quad_kernel[(H, triton.cdiv(T, BLOCK_T * TILES))](
        kv_cache, phys, mu, ainv, out if out is not None else mu, sc, mn, mx, tg, tag, T, mu.stride(0),
        ainv.stride(0), out.stride(0) if out is not None else 0, *_kv_args(kv_cache), sc.stride(0), sc.stride(-1), mn.stride(0), mn.stride(1) if mn.dim() > 1 else 0,
        mn.stride(-1), HEAD_SIZE=D, D_PAD=triton.next_power_of_2(D), BS=BS, BLOCK_T=BLOCK_T, TILES=TILES,
        SUMMARIZE=summ is not None, num_warps=8)
    return out
