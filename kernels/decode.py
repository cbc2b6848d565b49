"""Paged sparse decode attention (Triton) and its float64 torch reference.

Tensor-shape contract (all on one device):

- ``q``           ``[B, Hq, D]`` fp16/bf16/fp32, one query token per row (decode).
- ``kv_cache``    ``[num_blocks, Hkv, block_size, 2*D]``: vLLM 0.32+ per-layer view, K in ``[..., :D]`` and V in
                  ``[..., D:]``. Any strides (vLLM's GPU layout is token-major inside a block, the CPU one
                  head-major); nothing is assumed contiguous.
- ``block_table`` ``[B, max_blocks]`` int32: logical block -> physical block.
- ``seq_lens``    ``[B]`` int32: tokens in the context (the current token included).
- ``sel_ids``     ``[B, Hkv, S]`` int32: selected LOGICAL block ids per (row, KV head), sorted ascending,
                  the first ``sel_counts[b, h]`` valid. ``None`` means dense (every block of the context).
- ``sel_counts``  ``[B, Hkv]`` int32; a negative count marks a dense row (attend every block).

Every query head of a GQA group is handled by one program (grid ``B x Hkv x num_splits``); a row's selected
blocks are split across ``num_splits`` programs (flash-decoding) and merged with a log-sum-exp reduction.
Scores and accumulation are fp32. The last, partial block is masked by ``seq_lens``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


# Triton's interpreter (CPU tests) computes bf16 dots wrongly (triton 3.7): upcast there, never on a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Arguments that follow the batch size (the split count and the partials' strides) are not specialised: one
# compile serves every batch, so a mixed step with an uncaptured decode-row count compiles nothing while serving
# (vLLM's jit monitor flagged it on the H100; results/h100/e2e-session9-*.log).
_BATCH_ARGS = ["NUM_SPLITS", "stride_ob", "stride_oh", "stride_lb", "stride_lh"]


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _decode_split_kernel(
    Q, KV, BT, SEL, CNT, SEQ, O_PART, LSE_PART, ROWS,
    stride_qb, stride_qh, stride_qd,
    stride_kvb, stride_kvh, stride_kvt, stride_kvd,
    stride_btb, stride_btn,
    stride_sb, stride_sh, stride_ss,
    stride_cb, stride_ch,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    sm_scale_log2, NUM_SPLITS,
    HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    BS: tl.constexpr, BPI: tl.constexpr, HAS_SEL: tl.constexpr,
    UPCAST: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_ROWS:  # the selection lives in persistent per-slot buffers: row b reads slot ROWS[b]
        srow = tl.load(ROWS + b)
    else:
        srow = b

    seq_len = tl.load(SEQ + b)
    nblk = (seq_len + BS - 1) // BS
    if HAS_SEL:
        cnt = tl.load(CNT + srow * stride_cb + kvh * stride_ch)
        dense_row = cnt < 0
        count = tl.where(dense_row, nblk, cnt)
    else:
        dense_row = True
        count = nblk
    per = (count + NUM_SPLITS - 1) // NUM_SPLITS
    per = ((per + BPI - 1) // BPI) * BPI
    start = split * per
    end = tl.minimum(start + per, count)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < G
    d_mask = offs_d < HEAD_SIZE
    q_ptrs = Q + b * stride_qb + (kvh * G + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    N: tl.constexpr = BPI * BS
    offs_n = tl.arange(0, N)
    blk_in = offs_n // BS
    tok = offs_n % BS

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)

    kv_head_base = KV + kvh.to(tl.int64) * stride_kvh
    for i in range(start, end, BPI):
        idx = i + blk_in
        valid_blk = idx < end
        if HAS_SEL:
            lsel = tl.load(SEL + srow * stride_sb + kvh * stride_sh + idx * stride_ss,
                           mask=valid_blk & (cnt >= 0), other=0)
            lblk = tl.where(dense_row, idx, lsel)
        else:
            lblk = idx
        pblk = tl.load(BT + b * stride_btb + lblk * stride_btn, mask=valid_blk, other=0)
        pos = lblk * BS + tok
        valid = valid_blk & (pos < seq_len)
        row_off = pblk.to(tl.int64) * stride_kvb + tok * stride_kvt
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(kv_head_base + row_off[:, None] + offs_d[None, :] * stride_kvd, mask=kv_mask, other=0.0)
        v = tl.load(kv_head_base + row_off[:, None] + (offs_d + HEAD_SIZE)[None, :] * stride_kvd,
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * sm_scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    # natural-log LSE of this split (-inf for an empty split)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = (O_PART + b * stride_ob + (kvh * G + offs_g)[:, None] * stride_oh + split * stride_os
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(LSE_PART + b * stride_lb + (kvh * G + offs_g) * stride_lh + split * stride_ls, lse, mask=g_mask)


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _merge_kernel(
    O_PART, LSE_PART, OUT,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_outb, stride_outh, stride_outd, NUM_SPLITS,
    HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_SIZE
    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + offs_s * stride_ls, mask=s_mask,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    w = tl.where(s_mask, w, 0.0)
    o = tl.load(O_PART + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    denom = tl.sum(w, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    out = tl.sum(o * w[:, None], 0) / denom
    tl.store(OUT + b * stride_outb + h * stride_outh + offs_d * stride_outd, out.to(OUT.dtype.element_ty),
             mask=d_mask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks_per_row: int, device: torch.device,
                      blocks_per_iter: int) -> int:
    """Splits per (row, KV head): enough programs for ~4 waves, each with >= 2 iterations of work.

    Depends only on shapes (never on data), so a CUDA graph can capture it.
    """
    programs = max(1, batch * num_kv_heads)
    target = max(1, (4 * _num_sms(device) + programs - 1) // programs)
    most = max(1, max_blocks_per_row // (2 * blocks_per_iter))
    return int(max(1, min(target, most, MAX_SPLITS)))


MAX_SPLITS = 128


def merge_pad(num_splits: int) -> int:
    """The merge kernel's split tile: a power of two from 16 to MAX_SPLITS (:data:`MERGE_PADS`: a build each, which
    the backend's warm-up makes)."""
    return max(16, triton.next_power_of_2(num_splits))


MERGE_PADS = tuple(1 << i for i in range(4, MAX_SPLITS.bit_length()))  # 16, 32, 64, 128


def default_blocks_per_iter(head_size: int, block_size: int, programs: int = 1) -> int:
    """Tokens per inner iteration: 64 (32 for D=256); 128 when B x Hkv alone fills the GPU twice (H100 sweep:
    B=32, Hkv=8 runs 13% faster with 128-token tiles, smaller batches prefer 64)."""
    tokens = 64 if head_size <= 128 else 32
    if programs >= 256 and head_size <= 128:
        tokens = 128
    return max(1, tokens // block_size)


def sparse_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  sel_ids: torch.Tensor | None = None, sel_counts: torch.Tensor | None = None,
                  scale: float | None = None, out: torch.Tensor | None = None, num_splits: int | None = None,
                  blocks_per_iter: int | None = None, workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                  num_warps: int = 4, num_stages: int = 4, sel_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per row over the selected blocks of the paged cache. See module doc.
    ``sel_rows [B]``: row b's selection is ``sel_ids[sel_rows[b]]`` / ``sel_counts[sel_rows[b]]`` (persistent
    per-slot selection buffers, no gather)."""
    B, Hq, D = q.shape
    NB, Hkv, BS, D2 = kv_cache.shape
    if D2 != 2 * D:
        raise ValueError(f"kv_cache last dim {D2} != 2 * head_size {D}")
    if Hq % Hkv:
        raise ValueError(f"num query heads {Hq} not a multiple of num kv heads {Hkv}")
    if (sel_ids is None) != (sel_counts is None):
        raise ValueError("sel_ids and sel_counts go together")
    G = Hq // Hkv
    scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    bpi = blocks_per_iter or default_blocks_per_iter(D, BS, B * Hkv)
    if num_splits is None:
        cap = sel_ids.shape[2] if sel_ids is not None else block_table.shape[1]
        # dense rows in a selection batch may need every block
        cap = max(cap, block_table.shape[1]) if sel_ids is not None else cap
        num_splits = choose_num_splits(B, Hkv, cap, q.device, bpi)
    if out is None:
        out = torch.empty_like(q)
    if workspace is None:
        o_part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        o_part, lse_part = workspace
    has_sel = sel_ids is not None
    if not has_sel:
        sel_ids = block_table[:, None, :1]  # unused placeholders with valid strides
        sel_counts = seq_lens[:, None]
    D_PAD = triton.next_power_of_2(D)
    G_PAD = max(16, triton.next_power_of_2(G))
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, kv_cache, block_table, sel_ids, sel_counts, seq_lens, o_part, lse_part,
        sel_rows.contiguous() if sel_rows is not None else seq_lens,
        q.stride(0), q.stride(1), q.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_table.stride(0), block_table.stride(1),
        sel_ids.stride(0), sel_ids.stride(1), sel_ids.stride(2),
        sel_counts.stride(0), sel_counts.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        scale * 1.4426950408889634, num_splits,
        HEAD_SIZE=D, D_PAD=D_PAD, G=G, G_PAD=G_PAD, BS=BS, BPI=bpi, HAS_SEL=has_sel,
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16, HAS_ROWS=sel_rows is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    _merge_kernel[(B, Hq)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2), num_splits,
        HEAD_SIZE=D, D_PAD=D_PAD, S_PAD=merge_pad(num_splits),
        num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# Torch reference (float64 by default): loops over rows and KV heads, gathers the selected tokens explicitly.
# ----------------------------------------------------------------------------------------------------------

def selected_token_positions(seq_len: int, block_size: int, ids: torch.Tensor | None, count: int | None
                             ) -> torch.Tensor:
    """Token positions attended for one (row, KV head): selected blocks' tokens that lie inside the context."""
    nblk = -(-seq_len // block_size)
    if ids is None or count is None or count < 0:
        blocks = torch.arange(nblk)
    else:
        blocks = ids[:count].long().cpu()
    pos = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).reshape(-1)
    return pos[pos < seq_len]


def sparse_decode_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      sel_ids: torch.Tensor | None = None, sel_counts: torch.Tensor | None = None,
                      scale: float | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    B, Hq, D = q.shape
    NB, Hkv, BS, _ = kv_cache.shape
    G = Hq // Hkv
    scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    out = torch.zeros(B, Hq, D, dtype=dtype, device=q.device)
    for b in range(B):
        L = int(seq_lens[b])
        for h in range(Hkv):
            if sel_ids is None:
                pos = selected_token_positions(L, BS, None, None)
            else:
                pos = selected_token_positions(L, BS, sel_ids[b, h], int(sel_counts[b, h]))
            pos = pos.to(q.device)
            phys = block_table[b, pos // BS].long()
            kv = kv_cache[phys, h, pos % BS].to(dtype)  # [n, 2D]
            k, v = kv[:, :D], kv[:, D:]
            qh = q[b, h * G:(h + 1) * G].to(dtype)  # [G, D]
            p = torch.softmax((qh @ k.T) * scale, dim=-1)
            out[b, h * G:(h + 1) * G] = p @ v
    return out
