"""vLLM plugin entry points.

- ``vllm.platform_plugins: prescore = prescore.backend.platform:activate`` runs early in every vLLM process
  (before a spawned process unpickles a config naming the PRESCORE enum member): registers PRESCORE and,
  on the CPU build, returns :class:`PrescoreCpuPlatform` (stock CpuPlatform ignores any backend but
  CPU_ATTN). On GPUs it returns None, so the built-in platform stays in charge.
- ``vllm.general_plugins: prescore = prescore.backend.platform:register`` registers again (idempotent)
  for processes that skip platform plugins (``VLLM_TARGET_DEVICE=cpu``).
- ``vllm.logits_processors: prescore = prescore.backend.requests:PrescoreRequestTracker`` (see requests.py).
"""

from __future__ import annotations

import logging

from . import compat

logger = logging.getLogger("vllm.prescore")


def register() -> None:
    try:
        compat.check_version()
    except RuntimeError as e:
        logger.error("%s", e)
        return
    compat.register_backend()


def activate() -> str | None:
    register()
    if compat.is_cpu_build():
        return "prescore.backend.platform.PrescoreCpuPlatform"
    return None


def __getattr__(name):  # the CpuPlatform subclass is built lazily: vllm.platforms.cpu imports torch
    if name == "PrescoreCpuPlatform":
        cls = _make_cpu_platform()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _make_cpu_platform():
    from vllm.platforms.cpu import CpuPlatform

    class PrescoreCpuPlatform(CpuPlatform):
        """CpuPlatform that honours ``--attention-backend prescore``."""

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            if not compat.is_prescore(selected_backend):
                return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
            c = attn_selector_config
            if c.use_mla or c.use_sparse:
                raise ValueError("prescore: MLA / model-native sparse attention layers are not supported; "
                                 "serve this model without --attention-backend prescore")
            if c.kv_cache_dtype not in (None, "auto", "float16", "bfloat16"):
                raise ValueError(f"prescore: kv_cache_dtype {c.kv_cache_dtype!r} is not supported "
                                 "(use auto, float16 or bfloat16)")
            if c.attn_type != "decoder":
                return super().get_attn_backend_cls(None, attn_selector_config, num_heads)
            return compat.BACKEND_PATH

    return PrescoreCpuPlatform
