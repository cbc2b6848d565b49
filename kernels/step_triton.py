"""Fused per-step kernels of the decode fast path (one launch each, fixed grids, no host sync: what a FULL
decode CUDA graph replays every step).

``score_tail_triton``: per (row, KV head), score the block holding the row's newest token with the row's OWN
method and fitted state (methods mixed in one batch: ``method_ids [B]``, ``cols [B]`` = the method's column
in the per-method summaries) and write its summaries (score, key min/max, tag). ``only_full=True`` scores a
block once, on the step it fills: a partial tail block is always inside the recent window (attended whatever
its summaries say), so its summaries are first read once it is full. ``score_decode_tail`` (torch) is the
reference: with ``only_full=False`` the results are the same. The kernel is specialised on the method registry
(:func:`tail_tiles`: each ``method_id``'s :class:`~prescore.kernels.scoring.Tile` and state size, constexpr);
each row runs its own method's tile.

(The backend's device counters are added by the selection launch: ``select_blocks_triton(stats=...)``.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .scoring import METHODS, TILE_KEYNORM, TILE_KMEANS, TILE_LEVERAGE, Tile


@triton.jit
def _tile_scores(k, kbase, st, t, tv, d, dm, s_kv_t, s_kv_d, TILE: tl.constexpr, STATE: tl.constexpr,
                 HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, DC: tl.constexpr,
                 KM_PAD: tl.constexpr):
    """[BS] key scores of one block's keys ``k [BS, D_PAD]`` (f32) by the tile ``TILE`` (a :class:`Tile`), from
    the method's state at ``st`` (``STATE`` floats per KV head)."""
    if TILE == TILE_LEVERAGE:  # (k - mu)^T A^-1 (k - mu); state = mu [D] then A^-1 [D, D] row-major
        mu = tl.load(st + d, mask=dm, other=0.0)
        x = k - mu[None, :]
        y = tl.zeros([BS, D_PAD], dtype=tl.float32)
        for c in tl.static_range(0, D_PAD, DC):
            dc = c + tl.arange(0, DC)
            dcm = dc < HEAD_SIZE
            xc = tl.load(kbase + t[:, None] * s_kv_t + dc[None, :] * s_kv_d, mask=tv[:, None] & dcm[None, :],
                         other=0.0).to(tl.float32)
            xc = xc - tl.load(st + dc, mask=dcm, other=0.0)[None, :]
            a = tl.load(st + HEAD_SIZE + dc[:, None] * HEAD_SIZE + d[None, :], mask=dcm[:, None] & dm[None, :],
                        other=0.0)
            y += tl.dot(xc, a)
        ks = tl.sum(x * y, 1)
    elif TILE == TILE_KMEANS:  # distance to the nearest centroid / sum of distances in its cluster
        KM_K: tl.constexpr = STATE // (HEAD_SIZE + 1)  # state = k centroids [k, D] then k distance sums
        kk = tl.arange(0, KM_PAD)
        km = kk < KM_K
        cents = tl.load(st + kk[:, None] * HEAD_SIZE + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
        xc = tl.dot(k, tl.trans(cents))  # [BS, KM_PAD]
        d2 = tl.sum(k * k, 1)[:, None] - 2.0 * xc + tl.sum(cents * cents, 1)[None, :]
        d2 = tl.where(km[None, :], d2, float("inf"))
        a = tl.argmin(d2, 1)
        ca = tl.load(st + a[:, None] * HEAD_SIZE + d[None, :], mask=dm[None, :], other=0.0)
        diff = k - ca
        dist = tl.sqrt(tl.sum(diff * diff, 1))
        den = tl.load(st + KM_K * HEAD_SIZE + a)
        ks = tl.where(den <= 1e-30, 1.0, dist / tl.maximum(den, 1e-30))
    else:
        tl.static_assert(TILE == TILE_KEYNORM, "unknown tail tile")
        ks = tl.sqrt(tl.sum(k * k, 1))
    return ks


@triton.jit
def _tail_kernel(KV, BT, SEQ, MID, COL, STATES, SROW, RTAG, SCORES, KMIN, KMAX, TAGS,
                 s_kv_b, s_kv_h, s_kv_t, s_kv_d, s_bt_b, s_bt_n, s_st_r, s_st_h,
                 s_sc_b, s_sc_m, s_sc_h, s_mn_b, s_mn_h, s_mn_d, s_tg_m,
                 HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, DC: tl.constexpr,
                 KM_PAD: tl.constexpr, ONLY_FULL: tl.constexpr, TILES: tl.constexpr, STATES_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(SEQ + b).to(tl.int32)
    mid = tl.load(MID + b).to(tl.int32)
    last = tl.maximum(seq - 1, 0)
    lblk = last // BS
    nvalid = last - lblk * BS + 1
    live = (seq > 0) & (mid >= 0)
    if ONLY_FULL:
        live = live & (nvalid == BS)
    if live:
        col = tl.load(COL + b).to(tl.int64)
        phys = tl.load(BT + b * s_bt_b + lblk * s_bt_n).to(tl.int64)
        t = tl.arange(0, BS)
        d = tl.arange(0, D_PAD)
        tv = t < nvalid
        dm = d < HEAD_SIZE
        kbase = KV + phys * s_kv_b + h * s_kv_h
        k = tl.load(kbase + t[:, None] * s_kv_t + d[None, :] * s_kv_d, mask=tv[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        st = STATES + tl.load(SROW + b).to(tl.int64) * s_st_r + h * s_st_h
        ks = tl.zeros([BS], dtype=tl.float32)
        for m in tl.static_range(len(TILES)):  # the row's method (registry id m) scores with its own tile
            if mid == m:
                ks = _tile_scores(k, kbase, st, t, tv, d, dm, s_kv_t, s_kv_d, TILES[m], STATES_S[m], HEAD_SIZE,
                                  D_PAD, BS, DC, KM_PAD)
        score = tl.max(tl.where(tv, ks, float("-inf")), 0)
        kmin = tl.min(tl.where(tv[:, None], k, float("inf")), 0)
        kmax = tl.max(tl.where(tv[:, None], k, float("-inf")), 0)
        tl.store(SCORES + phys * s_sc_b + col * s_sc_m + h * s_sc_h, score)
        mb = phys * s_mn_b + h * s_mn_h + d * s_mn_d
        tl.store(KMIN + mb, kmin.to(KMIN.dtype.element_ty), mask=dm)
        tl.store(KMAX + mb, kmax.to(KMAX.dtype.element_ty), mask=dm)
        if h == 0:
            tl.store(TAGS + col * s_tg_m + phys, tl.load(RTAG + b).to(tl.int64))


def tail_tiles(head_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tile, state size) of every registered method, indexed by ``method_id``: the tail kernel's constexpr
    dispatch. Raises when a registered method has no Triton tile: the CUDA decode path could not score its
    blocks (the CUDA engine calls this at start, so such a method is refused there, never scored as another)."""
    return _tail_tiles(tuple(METHODS.values()), head_size)


@functools.lru_cache(maxsize=None)
def _tail_tiles(classes: tuple, head_size: int):
    objs = [cls() for cls in classes]
    missing = [m.name for m in objs if m.tile is None]
    if missing:
        raise ValueError(f"prescore: scoring method(s) {', '.join(missing)} have no Triton tail tile (ScoringMethod."
                         f"tile is None; tiles: {', '.join(t.name.lower() for t in Tile)}): the CUDA decode path "
                         "cannot score them. Give each a tile (kernels/step_triton.py _tile_scores) or run on CPU.")
    return tuple(int(m.tile) for m in objs), tuple(m.state_size(head_size) for m in objs)


def score_tail_triton(kv_cache: torch.Tensor, scores: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                      tags: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      method_ids: torch.Tensor, cols: torch.Tensor, states: torch.Tensor, state_rows: torch.Tensor,
                      row_tags: torch.Tensor, only_full: bool = True) -> None:
    """``kv_cache [NB, H, BS, 2D]``; ``scores [NB, M, H]`` f32 (column per method), ``kmin/kmax [NB, H, D]``,
    ``tags [M, NB]`` int64; ``block_table [B, MB]``, ``seq_lens [B]`` (new token included; 0 = padding row);
    ``method_ids [B]`` (registry ``method_id``, < 0 = no request: skipped), ``cols [B]`` (summaries column),
    ``states [R, H, S]`` f32 with ``state_rows [B]`` (each row's state row), ``row_tags [B]`` int64. Each row
    is scored by its method's tile (:func:`tail_tiles`), with the method's default parameters' state layout."""
    B = block_table.shape[0]
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    if B == 0:
        return
    tiles, sizes = tail_tiles(D)
    seq_lens, method_ids, cols, state_rows, row_tags = (t.contiguous() for t in (seq_lens, method_ids, cols,
                                                                                 state_rows, row_tags))
    D_PAD = triton.next_power_of_2(D)
    km_k = max([s // (D + 1) for t, s in zip(tiles, sizes) if t == Tile.KMEANS] + [1])
    _tail_kernel[(B, H)](
        kv_cache, block_table, seq_lens, method_ids, cols, states, state_rows, row_tags, scores, kmin, kmax, tags,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_table.stride(0), block_table.stride(1), states.stride(0), states.stride(1),
        scores.stride(0), scores.stride(1), scores.stride(2), kmin.stride(0), kmin.stride(1), kmin.stride(2),
        tags.stride(0),
        HEAD_SIZE=D, D_PAD=D_PAD, BS=BS, DC=min(32, D_PAD), KM_PAD=max(16, triton.next_power_of_2(km_k)),
        ONLY_FULL=only_full, TILES=tiles, STATES_S=sizes, num_warps=4,
    )
