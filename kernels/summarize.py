"""Per-block summaries written straight from the paged cache (Triton, one program per (block, KV head)).

For item i (a physical block ``phys[i]`` whose first ``nvalid[i]`` tokens are valid) and KV head h:
``scores[phys, h]`` = max over valid tokens of the key score (``key_scores[i, h, t]`` when given, else the key's
L2 norm computed here), ``kmin/kmax[phys, h, :]`` = per-channel min/max of the valid keys, ``tags[phys]`` =
``item_tags[i]``. An item with ``nvalid == 0`` writes nothing (padding rows). ``summarize_torch`` is the
reference (and the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Lengths, tags and length-derived strides are not specialised (and a tag is always int64): one build serves
# every prompt, built at start (backend warm-up), none while serving.
# index/score pointers may be slices of a block table at any offset (a chunk starting at any block): never
# specialised on alignment, so every chunk shares one build (the KV cache and summaries keep theirs)
@triton.jit(do_not_specialize=["PHYS", "NVALID", "KS", "ITAGS", "tok_end", "tag_val", "s_ks_i", "s_ks_h", "s_ks_t"])
def _summarize_kernel(KV, PHYS, NVALID, KS, ITAGS, SCORES, KMIN, KMAX, TAGS, tok_end, tag_val: tl.int64,
                      s_kv_b, s_kv_h, s_kv_t, s_kv_d, s_ks_i, s_ks_h, s_ks_t,
                      s_sc_b, s_sc_h, s_mn_b, s_mn_h, s_mn_d,
                      HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, HAS_KS: tl.constexpr,
                      RANGE: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    phys = tl.load(PHYS + i).to(tl.int64)
    if RANGE:  # consecutive blocks of one sequence; tokens [0, tok_end) of the range are valid; one tag
        nvalid = tl.minimum(tok_end - i * BS, BS)
    else:
        nvalid = tl.load(NVALID + i)
    t = tl.arange(0, BS)
    d = tl.arange(0, D_PAD)
    tv = t < nvalid
    dm = d < HEAD_SIZE
    k = tl.load(KV + phys * s_kv_b + h * s_kv_h + t[:, None] * s_kv_t + d[None, :] * s_kv_d,
                mask=tv[:, None] & dm[None, :], other=0.0).to(tl.float32)
    if HAS_KS:
        ks = tl.load(KS + i * s_ks_i + h * s_ks_h + t * s_ks_t, mask=tv, other=0.0)
    else:
        ks = tl.sqrt(tl.sum(k * k, 1))
    score = tl.max(tl.where(tv, ks, float("-inf")), 0)
    kmin = tl.min(tl.where(tv[:, None], k, float("inf")), 0)
    kmax = tl.max(tl.where(tv[:, None], k, float("-inf")), 0)
    live = nvalid > 0
    tl.store(SCORES + phys * s_sc_b + h * s_sc_h, score, mask=live)
    base = phys * s_mn_b + h * s_mn_h + d * s_mn_d
    tl.store(KMIN + base, kmin.to(KMIN.dtype.element_ty), mask=dm & live)
    tl.store(KMAX + base, kmax.to(KMAX.dtype.element_ty), mask=dm & live)
    if RANGE:
        tag = tag_val
    else:
        tag = tl.load(ITAGS + i)
    tl.store(TAGS + phys, tag, mask=(h == 0) & live)


def summarize_triton(kv_cache, summ, phys, nvalid, item_tags, key_scores=None):
    """phys [n] int, key_scores [n, H, BS] float32 (any strides) or None; either per-item ``nvalid`` [n] int32
    and ``item_tags`` [n] int64, or a range: ``nvalid`` = an int (valid tokens from the first item's start) and
    ``item_tags`` = an int."""
    n = phys.shape[0]
    rng = isinstance(nvalid, int)
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    ks = key_scores if key_scores is not None else summ.scores.new_empty(1, 1, 1)
    _summarize_kernel[(n, H)](
        kv_cache, phys, phys if rng else nvalid, ks, phys if rng else item_tags, summ.scores, summ.kmin, summ.kmax,
        summ.tags, nvalid if rng else 0, item_tags if rng else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        ks.stride(0), ks.stride(1), ks.stride(2),
        summ.scores.stride(0), summ.scores.stride(1), summ.kmin.stride(0), summ.kmin.stride(1), summ.kmin.stride(2),
        HEAD_SIZE=D, D_PAD=triton.next_power_of_2(D), BS=BS, HAS_KS=key_scores is not None, RANGE=rng,
        num_warps=2,
    )


def summarize_torch(kv_cache, summ, phys, nvalid, item_tags, key_scores=None):
    BS = kv_cache.shape[2]
    D = kv_cache.shape[-1] // 2
    if isinstance(nvalid, int):  # range form
        n = phys.shape[0]
        nvalid = (nvalid - torch.arange(n, device=phys.device) * BS).clamp(max=BS).to(torch.int32)
        item_tags = torch.full((n,), item_tags, dtype=torch.int64, device=phys.device)
    live = nvalid > 0  # items with no valid token write nothing
    phys, nvalid, item_tags = phys[live].long(), nvalid[live], item_tags[live]
    if key_scores is not None:
        key_scores = key_scores[live]
    k = kv_cache[phys, :, :, :D].float()  # [n, H, BS, D]
    valid = torch.arange(BS, device=k.device)[None, :] < nvalid.long()[:, None]  # [n, BS]
    ks = key_scores if key_scores is not None else torch.linalg.vector_norm(k, dim=-1)  # [n, H, BS]
    vm = valid[:, None, :, None]
    summ.kmin[phys] = torch.where(vm, k, torch.inf).amin(2).to(summ.kmin.dtype)
    summ.kmax[phys] = torch.where(vm, k, -torch.inf).amax(2).to(summ.kmax.dtype)
    summ.scores[phys] = torch.where(valid[:, None, :], ks, -torch.inf).amax(-1)
    summ.tags[phys] = item_tags


def summarize(kv_cache, summ, phys, nvalid, item_tags, key_scores=None, use_triton=None):
    if use_triton is None:
        use_triton = kv_cache.is_cuda
    (summarize_triton if use_triton else summarize_torch)(kv_cache, summ, phys, nvalid, item_tags, key_scores)


@triton.jit(do_not_specialize=["PHYS", "ntok", "s_oh", "s_ot"])
def _gather_keys_kernel(KV, PHYS, OUT, ntok, s_kv_b, s_kv_h, s_kv_t, s_kv_d, s_oh, s_ot, s_od,
                        HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    phys = tl.load(PHYS + i).to(tl.int64)
    t = tl.arange(0, BS)
    d = tl.arange(0, D_PAD)
    pos = i * BS + t
    m = (pos < ntok)[:, None] & (d < HEAD_SIZE)[None, :]
    k = tl.load(KV + phys * s_kv_b + h * s_kv_h + t[:, None] * s_kv_t + d[None, :] * s_kv_d, mask=m)
    tl.store(OUT + h * s_oh + pos[:, None].to(tl.int64) * s_ot + d[None, :] * s_od, k, mask=m)


def gather_keys_triton(kv_cache: torch.Tensor, phys: torch.Tensor, ntok: int) -> torch.Tensor:
    """Keys of the first ``ntok`` tokens held by physical blocks ``phys`` -> [H, ntok, D] (cache dtype)."""
    NB, H, BS, D2 = kv_cache.shape
    D = D2 // 2
    n = -(-ntok // BS)
    out = torch.empty(H, ntok, D, dtype=kv_cache.dtype, device=kv_cache.device)
    _gather_keys_kernel[(n, H)](kv_cache, phys, out, ntok, kv_cache.stride(0), kv_cache.stride(1),
                                kv_cache.stride(2), kv_cache.stride(3), out.stride(0), out.stride(1), out.stride(2),
                                HEAD_SIZE=D, D_PAD=triton.next_power_of_2(D), BS=BS, num_warps=2)
    return out
