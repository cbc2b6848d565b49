"""The kernel bench's step is the backend's step: ``benchmarks/select_bench.shared_step`` (what ``step_ms`` times on
a GPU) runs ``prescore.backend.step.decode`` with the Triton ops (interpreter here) on a LayerStore and a uniform
plan, and attends what the torch step attends on the same inputs."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_select_bench_step_is_the_backend_step():
    import select_bench
    from prescore.backend import step as core

    torch.manual_seed(0)
    B, H, G, D, BS = 2, 2, 2, 16, 16
    L = 60 * BS
    NB = B * 60 + 1
    kv = torch.randn(NB, H, BS, 2 * D)
    bt = torch.randperm(NB - 1)[: B * 60].view(B, 60).int() + 1
    kmin, kmax = kv[..., :D].amin(2), kv[..., :D].amax(2)
    scores = torch.rand(NB, H)
    seq = torch.tensor([L - 5, L - 20], dtype=torch.int32)
    q = torch.randn(B, H * G, D)
    outs = []
    for ops in (core.TRITON, core.TORCH):
        step = select_bench.shared_step(kv, bt, scores, kmin, kmax, 256, "hybrid", 4, "cpu", ops=ops)
        out = torch.empty(B, H * G, D)
        step(q, seq, out)
        step(q, seq + 1, out)
        outs.append(out)
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
