"""Per-request prescore controls and server-wide defaults. Imports no vLLM (except for the error type);
the method and mode names come from the kernels' registry (:mod:`prescore.kernels.scoring`, ``Mode``).

Per request: ``SamplingParams.extra_args`` (HTTP ``vllm_xargs``) keys

- ``prescore_budget``  int >= 0, tokens attended beyond sink + window; 0 = dense
- ``prescore_method``  a registered scoring method (:data:`METHOD_NAMES`: ``keynorm`` | ``leverage`` |
  ``kmeans``; block pre-score)
- ``prescore_mode``    :data:`MODE_NAMES`: ``prior`` | ``quest`` | ``hybrid`` (how the budget is spent)
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
``reselect_every`` (decode steps, default 1: a quest/hybrid row runs the query-aware selection when its clock
is a multiple of it and otherwise keeps its last selection plus the blocks new tokens open; with
``reselect_async`` the selection a row uses is then one step old. H100 quality tables, session 13
(results/QUALITY.md), budget 1024: Qwen2.5-Coder 32k ppl 1.077x dense at 16 vs 1.021x at 1, SmolLM2 8k 1.063x vs
1.034x, passkeys equal; a larger interval spreads the selection's cost over more steps at that quality cost) and
``reselect_clock`` (``"request"``, the default: the row's own length, so a request's tokens do not depend on
the step at which it was admitted (the same greedy request twice gives the same tokens), at the cost of about one
selection launch on most steps when rows of different lengths share a batch; ``"step"``: the engine's step
count, the same for every row, so the rows of a batch re-select together and the other steps skip the
selection, but a request's tokens depend on its admission step); ``reselect_async`` (default true): a query-aware row's
re-selection (from its second one on) runs on a side stream beside the other work of the step (CUDA uniform decode
steps, joined before the next layer's step; elsewhere in order, same semantics) into a pending selection that the
row adopts on its next step, so the selection is one step older and a re-selecting row costs no latency (H100,
session 12, same lease, at ``reselect_every`` 16: 8 x 32k 8.09 ms vs 8.70 ms in order, FA3 16.59; results/e2e-h100.json); it doubles the
selection cache per request slot; false selects in order. Token counts are rounded up to whole KV blocks. ``debug`` (default false) logs the builder's plans and, in eager steps, the
first layer's prefill scoring and selections. ``methods`` (a list of method names, default the default
``method`` plus every stateless method) is what the server offers: each stateful method offered costs its fitted
state per request slot and layer (allocated before vLLM sizes the KV cache), and a request for a method not
offered is refused naming ``prescore_method``. Any unknown ``prescore_*`` key or bad value is an error naming the field.

Server policy (same config keys; the ``PRESCORE_*`` variables in :data:`ENV_POLICY`, set by ``prescore-serve``'s
flags, override them): ``min_budget`` / ``max_budget`` (the sparse budgets a request may ask for, default
0 / 16777216), ``allow_dense`` (budget 0 accepted, default true) and ``max_attended`` (tokens: the most
sink + window + budget a sparse request may ask for, before rounding to blocks; 0 = ``max_budget`` + the
default sink + window). :func:`check_request` enforces them where every request passes (the logits-processor
``validate_params`` hook, so every HTTP route and ``LLM.generate``); the server defaults must obey them
(checked when they are loaded).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

from prescore.kernels.scoring import METHODS
from prescore.kernels.selection import MODE_NAMES

METHOD_NAMES = tuple(METHODS)  # the scoring-method registry (kernels/scoring.py), in registration order
PREFIX = "prescore_"
ENV_CONFIG = "PRESCORE_CONFIG"
MAX_TOKENS = 1 << 24
RESELECT_CLOCKS = ("step", "request")


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
    reselect_every: int = 1  # 16 costs ppl at 32k (results/QUALITY.md, session 13)
    reselect_clock: str = "request"  # by the row's length (reproducible); "step": rows re-select together
    reselect_async: bool = True  # a re-selection runs beside the decode (CUDA side stream), adopted a step later
    # server policy (never per request)
    min_budget: int = 0
    max_budget: int = MAX_TOKENS
    allow_dense: bool = True
    max_attended: int = 0  # 0: max_budget + the default sink + window (load_defaults fills it in)
    # diagnostics (never per request): log the builder's plans and the first layer's scoring and selections
    debug: bool = False
    # the scoring methods this server offers (each stateful one costs a fitted state per request slot and layer,
    # allocated before vLLM sizes the KV cache); () = the default method + every stateless method (load_defaults)
    methods: tuple = ()

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
POLICY_FIELDS = ("min_budget", "max_budget", "allow_dense", "max_attended")
CONFIG_FIELDS = REQUEST_FIELDS + ("hybrid_prior_fraction", "hybrid_min_budget", "quest_beta", "max_selected",
                                   "reselect_every", "reselect_clock", "reselect_async") + POLICY_FIELDS \
    + ("debug", "methods")
# environment variables that override the config (prescore-serve's flags set them)
ENV_POLICY = {"PRESCORE_DEFAULT_BUDGET": "budget", "PRESCORE_MIN_BUDGET": "min_budget",
              "PRESCORE_MAX_BUDGET": "max_budget", "PRESCORE_ALLOW_DENSE": "allow_dense",
              "PRESCORE_MAX_ATTENDED": "max_attended"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _show(value) -> str:
    """A short, always printable form of a client's value for error messages."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        r = repr(value)
    except (RecursionError, ValueError):
        r = f"a deeply nested {type(value).__name__}"
    return r if len(r) <= 80 else r[:77] + "..."


def _err(msg: str, field: str, value):
    from .compat import validation_error

    return validation_error(msg, parameter=field, value=_show(value))


def _check(field: str, value, shown: str):
    """Validate one field's value; return it normalised. ``shown`` is the name used in errors."""
    if field in ("budget", "sink", "window", "max_selected", "hybrid_min_budget", "min_budget", "max_budget",
                 "max_attended"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(f"{shown} must be an integer number of tokens, got {_show(value)}", shown, value)
        if not 0 <= value <= MAX_TOKENS:
            raise _err(f"{shown} must be in [0, {MAX_TOKENS}], got {_show(value)}", shown, value)
        return value
    if field == "reselect_every":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
            raise _err(f"{shown} must be an integer in [1, 1024] (decode steps), got {_show(value)}", shown, value)
        return value
    if field == "reselect_clock":
        if value not in RESELECT_CLOCKS:
            raise _err(f"{shown} must be one of {', '.join(RESELECT_CLOCKS)}; got {_show(value)}", shown, value)
        return value
    if field == "method":
        if value not in METHOD_NAMES:
            raise _err(f"{shown} must be one of {', '.join(METHOD_NAMES)}; got {_show(value)}", shown, value)
        return value
    if field == "mode":
        if value not in MODE_NAMES:
            raise _err(f"{shown} must be one of {', '.join(MODE_NAMES)}; got {_show(value)}", shown, value)
        return value
    if field in ("allow_dense", "debug", "reselect_async"):
        if not isinstance(value, bool):
            raise _err(f"{shown} must be true or false, got {_show(value)}", shown, value)
        return value
    if field == "methods":
        if not isinstance(value, (list, tuple)) or not value or any(m not in METHOD_NAMES for m in value) \
                or len(set(value)) != len(value):
            raise _err(f"{shown} must be a non-empty list of distinct methods out of {', '.join(METHOD_NAMES)}; got "
                       f"{_show(value)}", shown, value)
        return tuple(value)
    if field in ("hybrid_prior_fraction", "quest_beta"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise _err(f"{shown} must be a number in [0, 1], got {_show(value)}", shown, value)
        return float(value)
    raise _err(f"unknown prescore setting {shown!r}; known: {', '.join(CONFIG_FIELDS)}", shown, value)


def validate_request(extra_args: dict | None, prefix: str = "") -> dict:
    """The request's prescore overrides ({field: value}), types and ranges only (no server policy); raises
    (HTTP 400) naming the bad field, as ``prefix`` + the key (e.g. ``vllm_xargs.prescore_budget``)."""
    out = {}
    for key, value in (extra_args or {}).items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        field = key[len(PREFIX):]
        if field not in REQUEST_FIELDS:
            raise _err(f"{prefix + key} is not a per-request field; known: "
                       f"{', '.join(prefix + PREFIX + f for f in REQUEST_FIELDS)}", prefix + key, value)
        out[field] = _check(field, value, prefix + key)
    return out


def policy_violation(p: PrescoreParams, given=()) -> tuple[str, str] | None:
    """(field, reason) when the resolved ``p`` breaks the server policy, else None. ``given``: the request
    fields the client set (the one named when sink + window + budget is over the cap). ``reason`` reads after
    the field's name: ``f"{name} {reason}"``."""
    if p.methods and p.method not in p.methods:
        return "method", (f"{p.method!r} is not offered on this server (config field methods: "
                          f"{', '.join(p.methods)})")
    b = p.budget
    if b == 0:
        return None if p.allow_dense else ("budget", "0 (dense attention) is disabled on this server")
    if not p.min_budget <= b <= p.max_budget:
        dense = "0 (dense) or " if p.allow_dense else ""
        return "budget", f"must be {dense}in [{max(p.min_budget, 1)}, {p.max_budget}] on this server, got {b}"
    cap = p.max_attended or p.max_budget + p.sink + p.window
    total = p.sink + p.window + b
    if total > cap:
        cands = [f for f in ("window", "sink", "budget") if f in given] or ["window", "sink", "budget"]
        field = max(cands, key=lambda f: getattr(p, f))
        return field, (f"is too large: sink + window + budget = {p.sink} + {p.window} + {b} = {total} tokens, "
                       f"over this server's maximum of {cap} attended tokens")
    return None


def check_request(defaults: PrescoreParams, extra_args: dict | None, prefix: str = "") -> PrescoreParams:
    """The request's params (server defaults overridden by its ``prescore_*`` keys), checked against the
    field rules and the server policy; raises (HTTP 400) naming the field (``prefix`` + ``prescore_<field>``)."""
    given = validate_request(extra_args, prefix)
    p = replace(defaults, **given)
    cap = defaults.max_attended or defaults.max_budget + defaults.sink + defaults.window  # never the request's
    bad = policy_violation(replace(p, max_attended=cap), given)
    if bad:
        field, reason = bad
        name = prefix + PREFIX + field
        raise _err(f"{name} {reason}", name, getattr(p, field))
    return p


def resolve(defaults: PrescoreParams, extra_args: dict | None) -> PrescoreParams:
    """Server defaults overridden by the request's valid fields (the server policy checked too)."""
    return check_request(defaults, extra_args)


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


def _env_policy(env) -> dict:
    out = {}
    for var, field in ENV_POLICY.items():
        raw = str(env.get(var, "")).strip()
        if not raw:
            continue
        if field == "allow_dense":
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError(f"{var} must be a boolean (1/0, true/false), got {raw!r}")
            out[field] = raw.lower() in _TRUE
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{var} must be an integer, got {raw!r}") from None
        try:
            out[field] = _check(field, value, var)
        except Exception as e:  # noqa: BLE001 - re-raised as a plain startup error
            raise ValueError(str(e)) from None
    return out


def check_policy(p: PrescoreParams) -> PrescoreParams:
    """Startup check of the server policy against the defaults; returns ``p`` with ``max_attended`` resolved.
    Raises ValueError."""
    if not p.methods:
        p = replace(p, methods=default_methods(p.method))
    if p.method not in p.methods:
        raise ValueError(f"prescore: the default method {p.method!r} is not in the offered methods "
                         f"({', '.join(p.methods)})")
    if not 0 <= p.min_budget <= p.max_budget:
        raise ValueError(f"prescore budget limits: need 0 <= min ({p.min_budget}) <= max ({p.max_budget}) "
                         f"<= {MAX_TOKENS}")
    if p.max_attended == 0:
        p = replace(p, max_attended=p.max_budget + p.sink + p.window)
    bad = policy_violation(replace(p, max_attended=4 * MAX_TOKENS))  # the budget rules alone
    if bad:
        raise ValueError(f"prescore: the default budget {bad[1]}")
    if p.budget and p.sink + p.window + p.budget > p.max_attended:
        raise ValueError(f"prescore: the default sink + window + budget ({p.sink} + {p.window} + {p.budget}) is over "
                         f"the maximum attended tokens ({p.max_attended})")
    return p


def stateless(method: str) -> bool:
    """A method without a fitted state: its block score is a function of the block's content alone."""
    return METHODS[method]().state_size(128) == 0


def default_methods(method: str) -> tuple:
    """The offered methods when the config names none: the default method and every stateless method (no
    per-request state, so no memory)."""
    return (method,) + tuple(m for m in METHOD_NAMES if m != method and stateless(m))


def load_defaults(additional_config: dict | None = None, env: dict | None = None) -> PrescoreParams:
    """Built-in defaults <- $PRESCORE_CONFIG <- --additional-config {"prescore": {...}} <- the ``PRESCORE_*``
    policy variables (:data:`ENV_POLICY`); the policy checked against the defaults. Raises ValueError."""
    env = os.environ if env is None else env
    merged = _config_dict(env.get(ENV_CONFIG), ENV_CONFIG)
    merged.update(_config_dict((additional_config or {}).get("prescore"), "additional_config.prescore"))
    merged.update(_env_policy(env))
    return check_policy(replace(PrescoreParams(), **merged))


def describe(p: PrescoreParams) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(p).items())
