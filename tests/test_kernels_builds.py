"""One build per kernel for every batch size and prompt length: the launches that follow the batch (decode split
count, merge partials) or the prompt (prefill scoring: k-means, key gathering, block summaries) must give Triton the
same specialisation key whatever their sizes, so a server builds them at start (backend warm-up) and never while
serving (vLLM's jit monitor flagged such builds on the H100, each a latency spike of seconds). Computed with
Triton's own binder for an sm_90 target on this machine, in a process without the interpreter; no launch (each
kernel's first build is compiled for sm_90)."""

import textwrap

from kernel_utils import run_compile_check

CODE = textwrap.dedent("""
    import collections
    import torch
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
        import triton
        from triton.compiler import ASTSource
        TARGET = GPUTarget("cuda", 90, 32)
        backend = make_backend(TARGET)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"SKIP no Triton NVIDIA backend here: {e}")

    keys = collections.defaultdict(set)

    def record(self, *args, grid, warmup, **kwargs):  # the key Triton's run() caches builds under; nothing launches
        bound, spec, options = create_function_from_signature(self.signature, self.params, backend)(*args, **kwargs)
        name = self.fn.__name__
        if name not in keys:  # and each kernel's first build really builds for sm_90 (the interpreter checks less)
            opts, sig, cx, attrs = self._pack_args(backend, kwargs, bound, spec, options)
            assert triton.compile(ASTSource(self, sig, cx, attrs), target=TARGET, options=opts.__dict__).asm["cubin"]
        keys[name].add(str(spec) + str(sorted(options.items())))

    JITFunction.run = record
    import prescore.kernels.decode as dec
    from prescore.kernels.decode import sparse_decode
    dec._num_sms = lambda device: 132  # an H100's split counts
    from prescore.kernels.kmeans_triton import kmeanspp_triton, lloyd_triton
    from prescore.kernels.summarize import gather_keys_triton, summarize_triton
    from prescore.kernels.selection import BlockSummaries

    H, Hq, D, BS, NB, MB, S = 8, 32, 128, 16, 64, 8192, 518
    kv = torch.zeros(NB, H, BS, 2 * D, dtype=torch.bfloat16)
    # decode: batch 1..33 (graph-captured or not), the persistent selection buffers of the CUDA step
    ids = torch.zeros(40, H, S, dtype=torch.int32)
    kc = torch.zeros(40, H, dtype=torch.int32)
    bt_all = torch.zeros(40, MB, dtype=torch.int32)
    for B in range(1, 34):
        q = torch.zeros(B, Hq, D, dtype=torch.bfloat16)
        sparse_decode(q, kv, bt_all[:B], torch.full((B,), 4000, dtype=torch.int32), ids, kc, 0.088,
                      sel_rows=torch.arange(B, dtype=torch.int32), out=torch.empty_like(q))
    # prefill scoring sizes: keys of prompts of many lengths
    for i, T in enumerate((17, 160, 1000, 2048, 4093, 8192, 16384, 20000, 32768, 65536, 100000, 131072)):
        x = torch.zeros(H, T, D, dtype=torch.bfloat16)
        lloyd_triton(x, torch.zeros(H, 64, D), 2)
        n = min(T, 4096)
        kmeanspp_triton(x[:, :n], torch.zeros(H, dtype=torch.int64), torch.zeros(64, H, n), 64)
        # a chunk's blocks are a slice of the block table row at any block offset (pointer alignment varies)
        row = torch.zeros(MB + 4, dtype=torch.int32)
        off = i % 4
        phys = row[off: off + -(-T // BS)]
        gather_keys_triton(kv, phys, T)
        summ = BlockSummaries(scores=torch.zeros(NB, H), kmin=torch.zeros(NB, H, D, dtype=torch.bfloat16),
                              kmax=torch.zeros(NB, H, D, dtype=torch.bfloat16), tags=torch.zeros(NB, dtype=torch.int64))
        for tag in (2, 12345678901234567, (1 << 62) + 7):
            summarize_triton(kv, summ, phys, T, tag, key_scores=torch.zeros(H, T + 3).view(H, -1, 1)[:, off: off +
                             phys.shape[0]].expand(H, phys.shape[0], BS).permute(1, 0, 2))
    # builds per kernel over all those sizes: decode 2 (64- and 128-token tiles), merge 4 (split tiles 16..128)
    want = {"_decode_split_kernel": 2, "_merge_kernel": 4, "_assign_kernel": 1, "_update_kernel": 1,
            "_kmeanspp_kernel": 1, "_gather_keys_kernel": 1, "_summarize_kernel": 1}
    got = {k: len(keys[k]) for k in want}
    assert got == want, got
    print("compiled", got)
""")


def test_one_build_per_kernel_for_every_batch_and_length():
    run_compile_check(CODE)
