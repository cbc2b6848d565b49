"""Plugin registration and version / model checks (no engine)."""

import pytest

from conftest import requires_vllm

pytestmark = requires_vllm


def test_version_range():
    from prescore.backend import compat

    for ok in ("0.32.0", "0.32.0+cpu", "0.33.1"):
        assert compat.check_version(ok) == ok
    for bad in ("0.31.2", "0.34.0", "1.0.0"):
        with pytest.raises(RuntimeError, match="0.32 <= vLLM < 0.34"):
            compat.check_version(bad)


def test_activate_is_idempotent_and_returns_the_cpu_platform():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from prescore.backend import platform

    assert platform.activate() == "prescore.backend.platform.PrescoreCpuPlatform"
    assert platform.activate() == "prescore.backend.platform.PrescoreCpuPlatform"
    platform.register()
    assert AttentionBackendEnum["PRESCORE"].get_path() == "prescore.backend.attention.PrescoreBackend"
    assert AttentionBackendEnum["prescore".upper()] is AttentionBackendEnum.PRESCORE


def test_cpu_platform_selection():
    import torch
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from prescore.backend.platform import PrescoreCpuPlatform

    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=32)
    P = AttentionBackendEnum.PRESCORE
    assert PrescoreCpuPlatform.get_attn_backend_cls(P, cfg) == "prescore.backend.attention.PrescoreBackend"
    assert PrescoreCpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, cfg).endswith("CPUAttentionBackend")
    with pytest.raises(ValueError, match="MLA"):
        PrescoreCpuPlatform.get_attn_backend_cls(P, cfg._replace(use_mla=True))
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        PrescoreCpuPlatform.get_attn_backend_cls(P, cfg._replace(kv_cache_dtype="fp8"))
