"""``step.warm`` (run by the CUDA builder before graph capture) drives the whole decode step and each offered
method's prefill scoring once on vLLM's null block, then leaves no trace: block 0's summaries and tags, request
slot 0's state and selection-cache row and the counters are as before (Triton ops under the interpreter here)."""

import torch

from prescore.backend import params as P
from prescore.backend import step as core
from prescore.backend.plan import DecodeBuffers
from prescore.backend.store import LayerStore


def test_warm_runs_every_kernel_and_leaves_no_trace():
    torch.manual_seed(0)
    NB, H, BS, D, G = 40, 2, 16, 16, 2
    kv = torch.randn(NB, H, BS, 2 * D)
    defaults = P.load_defaults({"prescore": {"budget": 128, "reselect_every": 4}})
    store = LayerStore(kv, mirror=False, num_slots=4)
    bufs = DecodeBuffers(8, "cpu")
    cap = defaults.capacity_blocks(BS)
    cache = store.selection_cache(cap, bufs.max_rows)
    store.states.normal_()
    before = [t.clone() for t in (store.tags2, store.scores3, store.kmin, store.kmax, store.states, cache.ids,
                                  cache.counts, cache.kcounts, cache.dense, cache.key, store.acc)]
    calls = []
    orig = core.decode

    def spy(*a, **k):
        calls.append(a[1].every)
        return orig(*a, **k)

    core.decode = spy
    try:
        core.warm(store, kv, bufs, 24, cap, BS, H * G, defaults, defaults.methods)
    finally:
        core.decode = orig
    assert calls == [1, 1, 4, 4]
    after = (store.tags2, store.scores3, store.kmin, store.kmax, store.states, cache.ids, cache.counts,
             cache.kcounts, cache.dense, cache.key, store.acc)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
