"""Per-request prescore controls and server-wide defaults. Imports no vLLM (except for the error type).

Per request: ``SamplingParams.extra_args`` (HTTP ``vllm_xargs``) keys

- ``prescore_budget``  int >= 0, tokens attended beyond sink + window; 0 = dense
- ``prescore_method``  ``kmeans`` | ``leverage`` | ``keynorm`` (block pre-score)
- ``prescore_mode``    ``prior`` | ``quest`` | ``hybrid`` (how the budget is spent)
- ``prescore_sink``    int >= 0, first tokens always attended
- ``prescore_window``  int >= 0, last tokens always attended

Server-wide defaults: JSON in the env var ``PRESCORE_CONFIG`` and/or ``--additional-config
'{"prescore": {...}}'`` (the latter wins), keys without the ``prescore_`` prefix plus
``hybrid_prior_fraction`` (share of a hybrid budget spent on the prior, default 0.125: the best share of the
H100 sweep in results/QUALITY.md), ``hybrid_min_budget`` (tokens, default 512: a smaller hybrid budget gives the
prior no share), ``quest_beta`` (the query-aware key q.c + beta * |q|.r of a block with key
midpoint c and half range r: 1 = Quest's upper bound, default 0.5, see results/QUALITY.md) and ``max_selected``
(tokens: the fixed capacity of one row's per-step selection on the CUDA decode path, default 8192 beyond
sink + window; a row whose budget plus must-attend blocks exceed it runs dense, never truncated) and
``reselect_every`` (decode steps, default 4: a quest/hybrid row runs the query-aware selection when its length
is a multiple of it and otherwise keeps its last selection plus the blocks new tokens open; 1 = every step). Token counts are
rounded up to whole KV blocks. Any unknown ``prescore_*`` key or bad value is an error naming the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

METHOD_NAMES = ("kmeans", "leverage", "keynorm")
MODE_NAMES = ("prior", "quest", "hybrid")
PREFIX = "prescore_"
ENV_CONFIG = "PRESCORE_CONFIG"
MAX_TOKENS = 1 << 24


@dataclass(frozen=True)
class PrescoreParams:
    budget: int = 2048
    method: str = "kmeans"
    mode: str = "hybrid"
    sink: int = 16
    window: int = 64
    hybrid_prior_fraction: float = 0.125
    hybrid_min_budget: int = 512
    quest_beta: float = 0.5
    max_selected: int = 8192
    reselect_every: int = 4

    def capacity_blocks(self, block_size: int) -> int:
        """Static selection capacity in blocks: max_selected + the default sink and window + the tail block."""
        cdiv = lambda n: -(-n // block_size)  # noqa: E731
        return cdiv(self.max_selected) + cdiv(self.sink) + cdiv(self.window) + 1

    def blocks(self, block_size: int) -> tuple[int, int, int, int]:
        """(budget, sink, window, prior) in blocks; prior is the hybrid share of the budget."""
        cdiv = lambda n: -(-n // block_size)  # noqa: E731
        budget = cdiv(self.budget)
        prior = hybrid_prior_blocks(budget, self.budget, self.hybrid_prior_fraction, self.hybrid_min_budget) \
            if self.mode == "hybrid" else budget
        return budget, cdiv(self.sink), cdiv(self.window), prior


def hybrid_prior_blocks(budget_blocks: int, budget_tokens: int, fraction: float, min_budget: int) -> int:
    """The prior's share of a hybrid budget: none below ``min_budget`` tokens (small budgets go to the query-aware
    key entirely: a prior block is worth less than the query-aware block it displaces, results/QUALITY.md)."""
    return int(round(budget_blocks * fraction)) if budget_tokens >= min_budget else 0


REQUEST_FIELDS = ("budget", "method", "mode", "sink", "window")
CONFIG_FIELDS = REQUEST_FIELDS + ("hybrid_prior_fraction", "hybrid_min_budget", "quest_beta", "max_selected",
                                   "reselect_every")


def _err(msg: str, field: str, value):
    from .compat import validation_error

    return validation_error(msg, parameter=field, value=value)


def _check(field: str, value, shown: str):
    """Validate one field's value; return it normalised. ``shown`` is the name used in errors."""
    if field in ("budget", "sink", "window", "max_selected", "hybrid_min_budget"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(f"{shown} must be an integer number of tokens, got {value!r}", shown, value)
        if not 0 <= value <= MAX_TOKENS:
            raise _err(f"{shown} must be in [0, {MAX_TOKENS}], got {value}", shown, value)
        return value
    if field == "reselect_every":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
            raise _err(f"{shown} must be an integer in [1, 1024] (decode steps), got {value!r}", shown, value)
        return value
    if field == "method":
        if value not in METHOD_NAMES:
            raise _err(f"{shown} must be one of {', '.join(METHOD_NAMES)}; got {value!r}", shown, value)
        return value
    if field == "mode":
        if value not in MODE_NAMES:
            raise _err(f"{shown} must be one of {', '.join(MODE_NAMES)}; got {value!r}", shown, value)
        return value
    if field in ("hybrid_prior_fraction", "quest_beta"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise _err(f"{shown} must be a number in [0, 1], got {value!r}", shown, value)
        return float(value)
    raise _err(f"unknown prescore setting {shown!r}; known: {', '.join(CONFIG_FIELDS)}", shown, value)


def validate_request(extra_args: dict | None) -> dict:
    """The request's prescore overrides ({field: value}); raises (HTTP 400) naming the bad field."""
    out = {}
    for key, value in (extra_args or {}).items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        field = key[len(PREFIX):]
        if field not in REQUEST_FIELDS:
            raise _err(f"unknown per-request field {key!r}; known: "
                       f"{', '.join(PREFIX + f for f in REQUEST_FIELDS)}", key, value)
        out[field] = _check(field, value, key)
    return out


def resolve(defaults: PrescoreParams, extra_args: dict | None) -> PrescoreParams:
    """Server defaults overridden by the request's valid fields."""
    return replace(defaults, **validate_request(extra_args))


def _config_dict(raw, where: str) -> dict:
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        field = key[len(PREFIX):] if isinstance(key, str) and key.startswith(PREFIX) else key
        try:
            out[field] = _check(field, value, f"{where}.{key}")
        except Exception as e:  # noqa: BLE001 - re-raised as a plain startup error
            raise ValueError(str(e)) from None
    return out


def load_defaults(additional_config: dict | None = None, env: dict | None = None) -> PrescoreParams:
    """Built-in defaults <- $PRESCORE_CONFIG <- --additional-config {"prescore": {...}}. Raises ValueError."""
    env = os.environ if env is None else env
    merged = _config_dict(env.get(ENV_CONFIG), ENV_CONFIG)
    merged.update(_config_dict((additional_config or {}).get("prescore"), "additional_config.prescore"))
    return replace(PrescoreParams(), **merged)


def describe(p: PrescoreParams) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(p).items())
