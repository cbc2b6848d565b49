"""Ridge leverage on the GPU: keys read in place from the paged cache, four Triton launches, no host sync.

``fit_triton`` (state row per KV head: ``[mu | A^-1]``, ``A = K_c^T K_c + lam I``, ``lam = ridge * tr / D``):

1. ``_gram_kernel``: grid (KV head, chunk of tokens); partial sums of K^T K (tensor-core dot of the bf16/fp16
   keys, exact operands, fp32 accumulation) and of K.
2. ``_reduce_kernel``: grid (KV head, row stripe); sums the partials and centres them
   (``K^T K - T mu mu^T``); writes ``mu`` into the state.
3. ``_fit_kernel``: grid (KV head); adds the ridge and inverts in registers. Blocked symmetric sweep: for each
   pivot block of SB rows, invert the SB x SB pivot block by the scalar sweep, then one rank-SB update of the
   whole matrix (a ``tl.dot`` in 3xTF32: fp32-level accuracy on tensor cores; an IEEE fp32 dot that size
   spills). D / SB dependent block steps instead of D scalar ones; SB=0 is the plain scalar sweep.

``quad_triton``: ``l_i = (k_i - mu)^T A^-1 (k_i - mu)``. The key tile is an exact dot operand in the cache dtype;
A^-1 is split into hi + lo halves of that dtype (after an exact power-of-two scaling), so
``y = k A^-1 - mu^T A^-1`` is two tensor-core dots with ~16-bit-mantissa accuracy on A^-1 (fp32 caches: one
3xTF32 dot of the centred keys); ``l = sum((k - mu) * y)`` in fp32. The caller summarises the blocks
(``summarize``: a separate pass measured faster on the H100 than min/max fused into these tensor-core passes,
263 us vs 390 us at 32k tokens).

Configs (tile rows, warps, pipeline stages, programs per SM, pivot block) are chosen on the GPU by
:func:`_pick`: on the first call for a (stage, shape bucket) every candidate is timed with CUDA events on the
real inputs (all stages are idempotent) and the fastest is kept for the process. Never inside a CUDA-graph
capture (the default is used there) nor in the interpreter. Tuning is off in a serving engine (the first call
would compile and time every candidate: a stall of a minute or more on the first leverage request);
``benchmarks/kernels_bench.py`` turns it on for its process (``leverage_triton._TUNE = True``).
The torch code in :class:`prescore.kernels.scoring.Leverage` is the reference.
"""

from __future__ import annotations

import os
import statistics
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Triton's interpreter (CPU tests) computes bf16 dots wrongly (triton 3.7): upcast there, never on a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TUNE = False  # time every candidate config on first use (benchmarks only; see the module doc)


class GramCfg(NamedTuple):
    block_t: int  # token rows per tile
    warps: int
    stages: int
    waves: int  # programs per SM (sets the number of token chunks, i.e. of partial sums)


class FitCfg(NamedTuple):
    block: int  # pivot block SB of the blocked sweep; 0 = scalar sweep
    warps: int


class QuadCfg(NamedTuple):
    block_t: int
    warps: int
    stages: int
    waves: int


# first = the default (interpreter, CUDA-graph capture, tuning off)
GRAM_CONFIGS = [GramCfg(64, 8, 5, 1), GramCfg(64, 8, 5, 2), GramCfg(64, 8, 3, 2), GramCfg(128, 8, 5, 1),
                GramCfg(64, 4, 5, 2), GramCfg(128, 8, 3, 1)]
FIT_CONFIGS = [FitCfg(16, 8), FitCfg(32, 8), FitCfg(16, 16), FitCfg(16, 4), FitCfg(0, 4)]
QUAD_CONFIGS = [QuadCfg(64, 4, 5, 2), QuadCfg(64, 4, 3, 2), QuadCfg(64, 8, 5, 2), QuadCfg(128, 8, 5, 1),
                QuadCfg(128, 8, 3, 1), QuadCfg(64, 4, 5, 3)]
# (stages: the paged key load hangs off a block-table load; the pipeliner double-buffers it from 5 stages up)

_BEST: dict = {}  # (stage, shape key) -> config
_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs per head, so that chunking and reductions are exercised
    n = _SMS.get(device.index)
    if n is None:
        n = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def _time_ms(fn, reps: int = 7) -> float:
    fn()  # compile
    fn()
    evs = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        evs.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs)


def _pick(stage: str, key: tuple, cands: list, run):
    """The config of ``stage`` for shape ``key``: the first candidate unless tuning applies (see module doc)."""
    if len(cands) == 1 or not _TUNE or _INTERPRET:
        return cands[0]
    k = (stage,) + key
    best = _BEST.get(k)
    if best is None:
        if torch.cuda.is_current_stream_capturing():
            return cands[0]
        times = []
        for c in cands:
            try:
                times.append(_time_ms(lambda: run(c)))
            except Exception:  # noqa: BLE001 (a config that does not compile or fit: skipped)
                times.append(float("inf"))
        best = _BEST[k] = cands[min(range(len(cands)), key=times.__getitem__)]
    return best


def tuned_configs() -> dict:
    """The configs chosen so far: {(stage, T bucket, H, D, BS, dtype, device, ...): config}."""
    return dict(_BEST)


def _shape_key(kv_cache: torch.Tensor, T: int) -> tuple:
    NB, H, BS, D2 = kv_cache.shape
    return (T.bit_length(), H, D2 // 2, BS, kv_cache.dtype, kv_cache.device.index)


def _d_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _kv_args(kv_cache):
    return (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3))


# ----------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _paged_rows(KV, PHYS, h, t, d, T, s_kb, s_kh, s_kt, s_kd, BS: tl.constexpr):
    """Pointers and mask of the keys of token rows t (of one sequence whose blocks are PHYS) for KV head h."""
    tm = t < T
    phys = tl.load(PHYS + t // BS, mask=tm, other=0).to(tl.int64)
    ptr = KV + phys[:, None] * s_kb + h * s_kh + (t % BS)[:, None] * s_kt + d[None, :] * s_kd
    return ptr, tm


@triton.jit
def _sweep_all(a, i, HEAD_SIZE: tl.constexpr):
    """Inverse of the SPD matrix ``a`` (registers, identity padding) by sweeping every pivot: the sweep maps A
    to -A^-1 and keeps it symmetric, so each step extracts one row (= column) and its pivot."""
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
def _block_sweep(a, D_PAD: tl.constexpr, SB: tl.constexpr):
    """Inverse of the SPD matrix ``a`` ([D_PAD, D_PAD] registers, identity padding) by the blocked sweep: per
    pivot block K of SB rows, W = A_KK^-1 (scalar sweep of SB x SB), then A_RR -= A_RK W A_KR (one dot),
    A_KR = W A_KR, A_RK = its transpose, A_KK = -W. Sweeping every block maps A to -A^-1."""
    NBK: tl.constexpr = D_PAD // SB
    nb = tl.arange(0, NBK)
    j = tl.arange(0, SB)
    for kb in range(NBK):
        on = nb == kb
        p = tl.sum(tl.where(on[:, None, None], tl.reshape(a, (NBK, SB, D_PAD)), 0.0), 0)  # rows K: [SB, D_PAD]
        w = _sweep_all(tl.sum(tl.where(on[None, :, None], tl.reshape(p, (SB, NBK, SB)), 0.0), 1), j, SB)
        u = tl.dot(w, p, input_precision="ieee")  # W A_K:
        a = tl.dot(tl.trans(p), -u, a, input_precision="tf32x3")  # (3xTF32: fp32-level, on tensor cores)
        u = tl.reshape(tl.where(on[None, :, None], -w[:, None, :], tl.reshape(u, (SB, NBK, SB))), (SB, D_PAD))
        a = tl.reshape(tl.where(on[:, None, None], u[None, :, :], tl.reshape(a, (NBK, SB, D_PAD))), (D_PAD, D_PAD))
        a = tl.reshape(tl.where(on[None, :, None], tl.trans(u)[:, None, :], tl.reshape(a, (D_PAD, NBK, SB))),
                       (D_PAD, D_PAD))
    return -a


@triton.jit
def _invert(a, i, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, SB: tl.constexpr):
    if SB == 0:
        return _sweep_all(a, i, HEAD_SIZE)
    else:
        return _block_sweep(a, D_PAD, SB)


# ----------------------------------------------------------------------------------------------------------
# fit: Gram partials -> reduce + centre -> ridge + inverse
# ----------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["PHYS", "T", "CHUNK"])  # one compile for every length and chunk offset
def _gram_kernel(KV, PHYS, PG, PS, T, CHUNK, s_kb, s_kh, s_kt, s_kd, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
                 BS: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
    h = tl.program_id(0)
    p = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_SIZE
    acc = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    s = tl.zeros([D_PAD], dtype=tl.float32)
    t_lo = p * CHUNK
    t_hi = tl.minimum(t_lo + CHUNK, T)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ptr, tm = _paged_rows(KV, PHYS, h, t, d, T, s_kb, s_kh, s_kt, s_kd, BS)
        k = tl.load(ptr, mask=tm[:, None] & dm[None, :], other=0.0)
        kf = k.to(tl.float32)
        if UPCAST:
            k = kf
        acc = tl.dot(tl.trans(k), k, acc)
        s += tl.sum(kf, 0)
    base = (h * tl.num_programs(1) + p).to(tl.int64)
    tl.store(PG + base * D_PAD * D_PAD + d[:, None] * D_PAD + d[None, :], acc)
    tl.store(PS + base * D_PAD + d, s)


@triton.jit(do_not_specialize=["P", "T"])  # one compile for every length
def _reduce_kernel(PG, PS, GC, STATE, P, T, s_state, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
                   PB: tl.constexpr, RB: tl.constexpr):
    """Rows [r * RB, (r + 1) * RB) of the centred Gram matrix of head h: sum of the P partials minus
    T mu_r mu^T; the first stripe also writes mu into the state row."""
    h = tl.program_id(0)
    r = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    rows = r * RB + tl.arange(0, RB)
    pb = tl.arange(0, PB)
    g = tl.zeros([RB, D_PAD], dtype=tl.float32)
    s = tl.zeros([D_PAD], dtype=tl.float32)
    sr = tl.zeros([RB], dtype=tl.float32)
    for p0 in range(0, P, PB):
        pp = p0 + pb
        pm = pp < P
        base = h.to(tl.int64) * P + pp
        g += tl.sum(tl.load(PG + (base[:, None, None] * D_PAD + rows[None, :, None]) * D_PAD + d[None, None, :],
                            mask=pm[:, None, None], other=0.0), 0)
        s += tl.sum(tl.load(PS + base[:, None] * D_PAD + d[None, :], mask=pm[:, None], other=0.0), 0)
        sr += tl.sum(tl.load(PS + base[:, None] * D_PAD + rows[None, :], mask=pm[:, None], other=0.0), 0)
    mu = s / T
    g = g - T * (sr / T)[:, None] * mu[None, :]
    tl.store(GC + (h.to(tl.int64) * D_PAD + rows[:, None]) * D_PAD + d[None, :], g)
    tl.store(STATE + h.to(tl.int64) * s_state + d, mu, mask=(d < HEAD_SIZE) & (r == 0))


@triton.jit
def _fit_kernel(GC, STATE, ridge, s_state, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, SB: tl.constexpr):
    """One KV head: A = centred Gram + ridge * trace / D * I, inverted in registers, written as the state's
    A^-1 (mu was written by the reduce kernel)."""
    h = tl.program_id(0)
    i = tl.arange(0, D_PAD)
    dm = i < HEAD_SIZE
    m2 = dm[:, None] & dm[None, :]
    diag = i[:, None] == i[None, :]
    a = tl.load(GC + h.to(tl.int64) * D_PAD * D_PAD + i[:, None] * D_PAD + i[None, :])
    tr = tl.sum(tl.sum(tl.where(diag & m2, a, 0.0), 1), 0)
    lam = ridge * tl.maximum(tr, 1e-12) / HEAD_SIZE
    a = tl.where(m2, tl.where(diag, a + lam, a), tl.where(diag, 1.0, 0.0))  # identity padding
    a = _invert(a, i, HEAD_SIZE, D_PAD, SB)
    tl.store(STATE + h.to(tl.int64) * s_state + HEAD_SIZE + i[:, None] * HEAD_SIZE + i[None, :], a, mask=m2)


def _gram_partials(kv_cache, phys, T, cfg: GramCfg):
    """Per-chunk partial sums of K^T K and of K over tokens [0, T) -> (pg [H, P, D_PAD, D_PAD], ps [H, P, D_PAD],
    P)."""
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    D_PAD = _d_pad(D)
    BLOCK_T = cfg.block_t
    P = max(1, min(triton.cdiv(T, BLOCK_T), cfg.waves * _num_sms(kv_cache.device) // H))  # whole waves
    CHUNK = triton.cdiv(triton.cdiv(T, P), BLOCK_T) * BLOCK_T
    P = triton.cdiv(T, CHUNK)
    ws = torch.empty(H * P * D_PAD * (D_PAD + 1), dtype=torch.float32, device=kv_cache.device)
    pg = ws[: H * P * D_PAD * D_PAD].view(H, P, D_PAD, D_PAD)
    ps = ws[H * P * D_PAD * D_PAD:].view(H, P, D_PAD)
    _gram_kernel[(H, P)](kv_cache, phys, pg, ps, T, CHUNK, *_kv_args(kv_cache), HEAD_SIZE=D, D_PAD=D_PAD, BS=BS,
                         BLOCK_T=BLOCK_T, UPCAST=_INTERPRET and kv_cache.dtype == torch.bfloat16,
                         num_warps=cfg.warps, num_stages=cfg.stages)
    return pg, ps, P


def _reduce(pg, ps, P, T, state, D):
    H, _, D_PAD, _ = pg.shape
    gc = torch.empty(H, D_PAD, D_PAD, dtype=torch.float32, device=pg.device)
    PB = min(triton.next_power_of_2(P), 32)
    RB = max(1, min(D_PAD, 64 // PB))
    _reduce_kernel[(H, D_PAD // RB)](pg, ps, gc, state, P, T, state.stride(0), HEAD_SIZE=D, D_PAD=D_PAD, PB=PB, RB=RB,
                                     num_warps=4)
    return gc


def fit_triton(kv_cache: torch.Tensor, phys: torch.Tensor, T: int, ridge: float, gram_cfg: GramCfg | None = None,
               fit_cfg: FitCfg | None = None) -> torch.Tensor:
    """Leverage state [H, D + D*D] = [mu | (K_c^T K_c + lam I)^-1] of tokens [0, T) (three launches)."""
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    state = torch.empty(H, D + D * D, dtype=torch.float32, device=kv_cache.device)
    key = _shape_key(kv_cache, T)
    if gram_cfg is None:
        gram_cfg = _pick("gram", key, GRAM_CONFIGS, lambda c: _gram_partials(kv_cache, phys, T, c))
    pg, ps, P = _gram_partials(kv_cache, phys, T, gram_cfg)
    gc = _reduce(pg, ps, P, T, state, D)

    def run(c):
        _fit_kernel[(H,)](gc, state, float(ridge), state.stride(0), HEAD_SIZE=D, D_PAD=gc.shape[-1],
                          SB=min(c.block, gc.shape[-1]), num_warps=c.warps)

    run(fit_cfg or _pick("fit", key, FIT_CONFIGS, run))
    return state


# ----------------------------------------------------------------------------------------------------------
# quadratic form
# ----------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["PHYS", "T", "NT"])  # one compile for every length and chunk offset
def _quad_kernel(KV, PHYS, MU, AINV, OUT, T, NT, s_mu, s_ai, s_out, s_kb, s_kh, s_kt, s_kd,
                 HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
                 SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """Leverage of the keys of tiles p, p + NP, ... (NT tiles of BLOCK_T rows) of head h, stored per key."""
    h = tl.program_id(0)
    p = tl.program_id(1)
    NP = tl.num_programs(1)
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_SIZE
    mu = tl.load(MU + h * s_mu + d, mask=dm, other=0.0)
    ainv = tl.load(AINV + h.to(tl.int64) * s_ai + d[:, None] * HEAD_SIZE + d[None, :],
                   mask=dm[:, None] & dm[None, :], other=0.0)
    b = tl.sum(mu[:, None] * ainv, 0)  # mu^T A^-1
    if SPLIT:  # A^-1 * 2^s = hi + lo in the cache dtype (|A^-1 * 2^s| < 2): the keys are exact dot operands
        amax = tl.max(tl.max(tl.abs(ainv), 1), 0)
        e = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
        up = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 2^(127 - e)
        down = (e << 23).to(tl.float32, bitcast=True)  # 2^(e - 127)
        a_s = ainv * up
        hi = a_s.to(KV.dtype.element_ty)
        lo = (a_s - hi.to(tl.float32)).to(KV.dtype.element_ty)
        if UPCAST:
            hi = hi.to(tl.float32)
            lo = lo.to(tl.float32)
    for tile in range(p, NT, NP):
        t0 = tile * BLOCK_T
        t = t0 + tl.arange(0, BLOCK_T)
        ptr, tm = _paged_rows(KV, PHYS, h, t, d, T, s_kb, s_kh, s_kt, s_kd, BS)
        k = tl.load(ptr, mask=tm[:, None] & dm[None, :], other=0.0)
        kf = k.to(tl.float32)
        x = kf - mu[None, :]
        if SPLIT:
            if UPCAST:
                k = kf
            y = tl.dot(k, lo)
            y = tl.dot(k, hi, y)
            y = y * down - b[None, :]
        else:
            y = tl.dot(x, ainv, input_precision="tf32x3")
        lev = tl.sum(x * y, 1)
        tl.store(OUT + h * s_out + t, lev, mask=tm)


def _quad_launch(kv_cache, phys, T, mu, ainv, out, cfg: QuadCfg):
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    NT = triton.cdiv(T, cfg.block_t)
    NP = max(1, min(NT, cfg.waves * _num_sms(kv_cache.device) // H))
    _quad_kernel[(H, NP)](
        kv_cache, phys, mu, ainv, out, T, NT, mu.stride(0), ainv.stride(0), out.stride(0), *_kv_args(kv_cache),
        HEAD_SIZE=D, D_PAD=_d_pad(D), BS=BS, BLOCK_T=cfg.block_t,
        SPLIT=kv_cache.dtype in (torch.bfloat16, torch.float16), UPCAST=_INTERPRET and kv_cache.dtype == torch.bfloat16,
        num_warps=cfg.warps, num_stages=cfg.stages)


def quad_triton(kv_cache: torch.Tensor, phys: torch.Tensor, T: int, mu: torch.Tensor, ainv: torch.Tensor,
                cfg: QuadCfg | None = None) -> torch.Tensor:
    """Leverage of tokens [0, T) read in place from the paged cache; mu [H, D], ainv [H, D, D] (or their views
    of a state row: any head stride, rows contiguous) -> [H, T] f32."""
    NB, H, BS, D2 = kv_cache.shape
    Tp = -(-T // BS) * BS  # rows padded to whole blocks (the tail is never written), so [H, n, BS] is a view
    out = torch.empty(H, Tp, dtype=torch.float32, device=kv_cache.device)[:, :T]
    if cfg is None:
        cfg = _pick("quad", _shape_key(kv_cache, T), QUAD_CONFIGS,
                    lambda c: _quad_launch(kv_cache, phys, T, mu, ainv, out, c))
    _quad_launch(kv_cache, phys, T, mu, ainv, out, cfg)
    return out


def fit_and_score_triton(kv_cache: torch.Tensor, phys: torch.Tensor, T: int, ridge: float):
    """State [H, D + D*D] and key scores [H, T] of tokens [0, T) (rows padded to whole blocks: the caller's
    block summaries view them in place)."""
    state = fit_triton(kv_cache, phys, T, ridge)
    D = kv_cache.shape[-1] // 2
    return state, quad_triton(kv_cache, phys, T, state[:, :D], state[:, D:])
