"""Paged sparse decode (Triton, under TRITON_INTERPRET=1 on CPU) against the float64 torch reference."""

import pytest
import torch

from kernel_utils import make_paged, rel_err
from prescore.kernels import sparse_decode, sparse_decode_ref

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def random_selection(seq_lens, Hkv, BS, cap, gen, dense_rows=()):
    B = len(seq_lens)
    ids = torch.full((B, Hkv, cap), 10**6, dtype=torch.int32)
    counts = torch.zeros(B, Hkv, dtype=torch.int32)
    for b, L in enumerate(seq_lens):
        nblk = -(-L // BS)
        for h in range(Hkv):
            if b in dense_rows:
                counts[b, h] = -1
                continue
            n = int(torch.randint(1, min(nblk, cap) + 1, (1,), generator=gen))
            pick = torch.randperm(nblk, generator=gen)[:n].sort().values
            ids[b, h, :n] = pick.int()
            counts[b, h] = n
    return ids, counts


CASES = [
    # (D, G, BS, dtype, layout, seq_lens)
    (64, 1, 16, torch.bfloat16, "NHD", [1, 17, 150]),
    (64, 3, 16, torch.float16, "HND", [31, 64, 5]),
    (128, 4, 16, torch.bfloat16, "NHD", [200, 3]),
    (128, 7, 32, torch.float16, "NHD", [97, 1, 45]),
    (256, 8, 32, torch.bfloat16, "HND", [70, 33]),
    (256, 2, 16, torch.float16, "NHD", [16, 48]),
    (128, 5, 32, torch.float32, "HND", [129]),
]


@pytest.mark.parametrize("D,G,BS,dtype,layout,seq_lens", CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_dense_matches_reference(D, G, BS, dtype, layout, seq_lens, num_splits):
    gen = torch.Generator().manual_seed(hash((D, G, BS, num_splits)) % 2**31)
    Hkv = 2
    kv, bt, seq = make_paged(seq_lens, Hkv, D, BS, dtype, layout, gen=gen)
    q = torch.randn(len(seq_lens), G * Hkv, D, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    sparse_decode(q, kv, bt, seq, num_splits=num_splits, out=out)
    ref = sparse_decode_ref(q, kv, bt, seq)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("D,G,BS,dtype,layout,seq_lens", CASES)
def test_sparse_matches_reference(D, G, BS, dtype, layout, seq_lens):
    gen = torch.Generator().manual_seed(7 * D + G)
    Hkv = 2
    kv, bt, seq = make_paged(seq_lens, Hkv, D, BS, dtype, layout, gen=gen)
    q = torch.randn(len(seq_lens), G * Hkv, D, generator=gen).to(dtype)
    ids, counts = random_selection(seq_lens, Hkv, BS, cap=6, gen=gen, dense_rows=(0,))
    out = sparse_decode(q, kv, bt, seq, ids, counts, num_splits=2)
    ref = sparse_decode_ref(q, kv, bt, seq, ids, counts)
    assert rel_err(out, ref) < TOL[dtype]


def test_everything_selected_equals_dense():
    gen = torch.Generator().manual_seed(1)
    seq_lens, Hkv, D, BS = [37, 160, 16], 2, 64, 16
    kv, bt, seq = make_paged(seq_lens, Hkv, D, BS, torch.bfloat16, gen=gen)
    q = torch.randn(3, 6, D, generator=gen).to(torch.bfloat16)
    MB = bt.shape[1]
    ids = torch.arange(MB, dtype=torch.int32).expand(3, Hkv, MB).contiguous()
    counts = ((seq + BS - 1) // BS).int()[:, None].expand(3, Hkv).contiguous()
    for ns in (1, 4):
        dense = sparse_decode(q, kv, bt, seq, num_splits=ns)
        full = sparse_decode(q, kv, bt, seq, ids, counts, num_splits=ns)
        assert torch.equal(dense, full)


def test_adversarial_values_no_nan():
    gen = torch.Generator().manual_seed(2)
    seq_lens, Hkv, D, BS = [50, 130], 2, 128, 16
    kv, bt, seq = make_paged(seq_lens, Hkv, D, BS, torch.float16, scale=200.0, gen=gen)
    kv.clamp_(-60000, 60000)
    q = (torch.randn(2, 8, D, generator=gen) * 300).clamp(-60000, 60000).to(torch.float16)  # huge logits
    out = sparse_decode(q, kv, bt, seq, num_splits=3)
    ref = sparse_decode_ref(q, kv, bt, seq)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3
    qb = q.to(torch.bfloat16)
    kvb = kv.to(torch.bfloat16)
    out = sparse_decode(qb, kvb, bt, seq, num_splits=2)
    assert torch.isfinite(out).all()
    assert rel_err(out, sparse_decode_ref(qb, kvb, bt, seq)) < 1.5e-2


def test_empty_splits_and_single_token():
    gen = torch.Generator().manual_seed(3)
    kv, bt, seq = make_paged([1, 2], 1, 64, 16, torch.bfloat16, gen=gen)
    q = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    out = sparse_decode(q, kv, bt, seq, num_splits=8)  # most splits have no work
    assert rel_err(out, sparse_decode_ref(q, kv, bt, seq)) < 1.5e-2
