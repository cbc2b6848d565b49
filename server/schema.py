"""Request fields prescore adds to the OpenAI completion / chat bodies, and the server's budget limits.

Imports pydantic and ``prescore.backend.params`` only (no vLLM), so the load generator and tests can use it.

A request may carry, next to the standard OpenAI fields:

- ``key_budget``: int, tokens of KV cache attended beyond the sink and window; 0 = dense attention
- ``prescore``: ``{"method", "mode", "sink", "window"}`` (each optional)
- ``vllm_xargs``: the backend's own per-request keys (``prescore_budget``, ``prescore_method``, ...) keep
  working; a value given both ways must agree.

Server limits (``BudgetLimits``) come from ``prescore-serve`` flags or the environment variables
``PRESCORE_DEFAULT_BUDGET``, ``PRESCORE_MIN_BUDGET``, ``PRESCORE_MAX_BUDGET``, ``PRESCORE_ALLOW_DENSE``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prescore.backend.params import MAX_TOKENS, METHOD_NAMES, MODE_NAMES, PREFIX, REQUEST_FIELDS

Method = Literal["kmeans", "leverage", "keynorm"]
Mode = Literal["prior", "quest", "hybrid"]
assert set(Method.__args__) == set(METHOD_NAMES) and set(Mode.__args__) == set(MODE_NAMES)

ENV_DEFAULT = "PRESCORE_DEFAULT_BUDGET"
ENV_MIN = "PRESCORE_MIN_BUDGET"
ENV_MAX = "PRESCORE_MAX_BUDGET"
ENV_ALLOW_DENSE = "PRESCORE_ALLOW_DENSE"


class PrescoreOptions(BaseModel):
    """How the key budget is spent. Omitted fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"example": {"method": "kmeans", "mode": "hybrid"}})

    method: Method | None = Field(None, description="Block pre-scoring method: kmeans | leverage | keynorm.")
    mode: Mode | None = Field(None, description="How the budget is spent: prior (pre-scores only), quest "
                                                "(query-aware block bounds), hybrid (a share of each).")
    sink: int | None = Field(None, ge=0, le=MAX_TOKENS,
                             description="First tokens always attended (rounded up to whole KV blocks).")
    window: int | None = Field(None, ge=0, le=MAX_TOKENS,
                               description="Last tokens always attended (rounded up to whole KV blocks).")


class PrescoreRequestFields(BaseModel):
    """The top-level fields prescore reads from a /v1/completions or /v1/chat/completions body."""

    model_config = ConfigDict(extra="ignore", strict=True)

    key_budget: int | None = Field(
        None, ge=0, le=MAX_TOKENS,
        description="Tokens of the KV cache each decode step attends beyond sink + window "
                    "(rounded up to whole KV blocks); 0 = dense attention. Omitted: the server default. "
                    "Must be 0 or within the server's [min, max] budget.")
    prescore: PrescoreOptions | None = Field(None, description="Sparse-attention options (prescore).")


@dataclass(frozen=True)
class BudgetLimits:
    default: int | None = None  # None: the backend's default (PRESCORE_CONFIG / --additional-config)
    min: int = 0
    max: int = MAX_TOKENS
    allow_dense: bool = True

    def check_startup(self) -> None:
        if not 0 <= self.min <= self.max <= MAX_TOKENS:
            raise ValueError(f"prescore budget limits: need 0 <= min ({self.min}) <= max ({self.max}) <= {MAX_TOKENS}")

    def violation(self, budget: int) -> str | None:
        """Why ``budget`` is refused, or None."""
        if budget == 0:
            return None if self.allow_dense else "dense attention (budget 0) is disabled on this server"
        if not self.min <= budget <= self.max:
            dense = "0 (dense) or " if self.allow_dense else ""
            return f"must be {dense}in [{self.min}, {self.max}] on this server, got {budget}"
        return None

    @classmethod
    def from_env(cls, env=None) -> "BudgetLimits":
        env = os.environ if env is None else env

        def num(name, default):
            raw = env.get(name, "")
            if raw.strip() == "":
                return default
            try:
                v = int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None
            if not 0 <= v <= MAX_TOKENS:
                raise ValueError(f"{name} must be in [0, {MAX_TOKENS}], got {v}")
            return v

        dense = env.get(ENV_ALLOW_DENSE, "1").strip().lower()
        if dense not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
            raise ValueError(f"{ENV_ALLOW_DENSE} must be a boolean, got {dense!r}")
        lim = cls(default=num(ENV_DEFAULT, None), min=num(ENV_MIN, 0), max=num(ENV_MAX, MAX_TOKENS),
                  allow_dense=dense in ("1", "true", "yes", "on", ""))
        lim.check_startup()
        return lim

    def to_env(self) -> dict[str, str]:
        out = {ENV_MIN: str(self.min), ENV_MAX: str(self.max), ENV_ALLOW_DENSE: "1" if self.allow_dense else "0"}
        if self.default is not None:
            out[ENV_DEFAULT] = str(self.default)
        return out


class FieldError(ValueError):
    """A bad prescore field; ``param`` is the dotted field name as the client sent it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _pydantic_error(e: ValidationError) -> FieldError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else type(value).__name__
    return FieldError(f"{loc}: {err['msg']} (got {shown})", loc)


def resolve(body: dict, defaults: dict, limits: BudgetLimits) -> dict:
    """The request's effective prescore settings {budget, method, mode, sink, window}.

    ``defaults`` holds the backend's server-wide defaults (``PrescoreParams`` as a dict). Raises FieldError
    naming the offending field: ``key_budget``, ``prescore.mode``, ``vllm_xargs.prescore_budget``, ...
    """
    try:
        fields = PrescoreRequestFields.model_validate(body)
    except ValidationError as e:
        raise _pydantic_error(e) from None
    top = {}
    if fields.key_budget is not None:
        top["budget"] = ("key_budget", fields.key_budget)
    if fields.prescore is not None:
        for k, v in fields.prescore.model_dump(exclude_none=True).items():
            top[k] = (f"prescore.{k}", v)

    xargs = body.get("vllm_xargs")
    from_x = {}
    if xargs is not None:
        if not isinstance(xargs, dict):
            raise FieldError(f"vllm_xargs must be an object, got {type(xargs).__name__}", "vllm_xargs")
        from prescore.backend.params import validate_request

        try:
            valid = validate_request(xargs)  # the backend's own rules: names and errors as it gives them
        except Exception as e:  # noqa: BLE001 - VLLMValidationError (naming the field) or ValueError
            if not isinstance(e, ValueError) and getattr(e, "parameter", None) is None:
                raise
            msg = e.args[0] if e.args else str(e)
            raise FieldError(str(msg), "vllm_xargs." + str(getattr(e, "parameter", "") or "prescore")) from None
        from_x = {k: (f"vllm_xargs.{PREFIX}{k}", v) for k, v in valid.items()}

    out = {k: defaults[k] for k in REQUEST_FIELDS}
    source = {"budget": "key_budget"}  # a default outside the limits is refused at startup
    if limits.default is not None:
        out["budget"] = limits.default
    for k, (name, v) in from_x.items():
        out[k], source[k] = v, name
    for k, (name, v) in top.items():
        if k in from_x and from_x[k][1] != v:
            raise FieldError(f"{name}={v!r} conflicts with {from_x[k][0]}={from_x[k][1]!r}", name)
        out[k], source[k] = v, name
    why = limits.violation(out["budget"])
    if why:
        raise FieldError(f"{source['budget']} {why}", source["budget"])
    return out


def apply(body: dict, settings: dict) -> dict:
    """The body vLLM sees: prescore's top-level fields removed, the settings in ``vllm_xargs``."""
    body = {k: v for k, v in body.items() if k not in ("key_budget", "prescore")}
    xargs = dict(body.get("vllm_xargs") or {})
    xargs.update({PREFIX + k: v for k, v in settings.items()})
    body["vllm_xargs"] = xargs
    return body


def budget_bucket(budget: int) -> str:
    """Prometheus label for a budget: dense, le_256, le_512, ..., le_16384, gt_16384."""
    if budget == 0:
        return "dense"
    edge = 256
    while edge <= 16384:
        if budget <= edge:
            return f"le_{edge}"
        edge *= 2
    return "gt_16384"
