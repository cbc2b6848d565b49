"""The selection and bound kernels build for an H100 (sm_90) with the constexprs the CUDA step uses: Triton's
NVIDIA compiler on this machine, no GPU (a process without the interpreter, which accepts code the compiler
rejects: a constexpr reassigned in an unrolled loop passed every interpreter test and failed on the GPU)."""

import textwrap

from kernel_utils import run_compile_check

CODE = textwrap.dedent("""
    import sys
    from kernel_utils import compile_for_cuda
    from prescore.kernels.select_triton import _qbound_kernel, _select_kernel

    i64 = "*i64"
    ptrs = {"SCORES": "*fp32", "TAGS": i64, "BT": "*i32", "SEQ": "*i32", "CLOCK": i64, "BUDGET": i64, "SINK": i64,
            "WINDOW": i64, "MODE": i64, "PRIOR": i64, "RTAG": i64, "CTAG": i64, "BND": "*fp32", "PMAX": "*fp32",
            "WS": "*i32", "IDS": "*i32", "COUNTS": "*i32", "KCOUNTS": "*i32", "DENSE": "*i8", "ROW": i64,
            "CKEY": i64, "COL": i64, "SPARSE": i64, "LABEL": i64, "ACC": "*fp64", "PIDS": "*i32", "PCOUNTS": "*i32",
            "PKCOUNTS": "*i32", "PKEY": i64}
    try:
        # the in-order launch, reselect_async's main (ADOPT) and side (DUE_ONLY) launches
        for ch, reg, adopt, due in [(2048, True, False, False), (8192, True, False, False), (16384, False, False, False),
                                    (8192, True, True, False), (8192, True, False, True)]:
            cx = dict(H=8, BS=16, CH=min(ch, 8192), ONE=ch <= 8192, HAS_QKEY=True, USE_CACHE=True, HAS_COL=True,
                      OVERFLOW_DENSE=True, S_PAD=256, STATS=not due, G=4, G_PAD=4, NS_PAD=max(2, ch // 128), REG=reg,
                      ADOPT=adopt, DUE_ONLY=due)
            out = compile_for_cuda(_select_kernel, ptrs, cx, scalar="i32")
            assert out.asm["cubin"]
        qp = {"Q": "*bf16", "KMIN": "*bf16", "KMAX": "*bf16", "BT": "*i32", "SEQ": "*i32", "CLOCK": i64, "MODE": i64,
              "BND": "*fp32", "PMAX": "*fp32", "ROW": i64, "CKEY": i64, "KCOUNTS": "*i32", "RTAG": i64,
              "BUDGET": i64, "SINK": i64, "WINDOW": i64, "scale": "fp32", "beta": "fp32"}
        for due in (False, True):
            out = compile_for_cuda(_qbound_kernel, qp, dict(H=8, USE_CACHE=True, DUE_ONLY=due, HEAD_SIZE=128,
                                                            D_PAD=128, G=4, G_PAD=4, BS=16, CHUNK=128, TILE=32),
                                   scalar="i32")
            assert out.asm["cubin"]
    except ImportError as e:
        raise SystemExit(f"SKIP {e}")
    print("compiled")
""")


def test_selection_kernels_compile_for_cuda():
    run_compile_check(CODE)
