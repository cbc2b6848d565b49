"""Request fields prescore adds to vLLM's generation bodies, and how they resolve against the server policy.

Imports pydantic and ``prescore.backend.params`` only (no vLLM), so the load generator and tests can use it.

A request may carry, next to the standard fields:

- ``key_budget``: int, tokens of KV cache attended beyond the sink and window; 0 = dense attention
- ``prescore``: ``{"method", "mode", "sink", "window"}`` (each optional)
- ``vllm_xargs``: the backend's own per-request keys (``prescore_budget``, ``prescore_method``, ...) keep
  working; a value given both ways must agree.

The server policy (min / max budget, dense allowed, max attended tokens) lives in the backend's
``PrescoreParams`` (``prescore.backend.params``): ``prescore-serve`` flags or the ``PRESCORE_*`` variables
(:data:`ENV_DEFAULT`, ...), ``PRESCORE_CONFIG``, ``--additional-config``. The engine enforces it on every
route; :func:`resolve` applies the same rules here so the HTTP layer names the field as the client sent it.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prescore.backend.params import (MAX_TOKENS, METHOD_NAMES, MODE_NAMES, PREFIX, REQUEST_FIELDS, PrescoreParams,
                                     policy_violation, validate_request)

Method = Literal[METHOD_NAMES]  # the scoring-method registry (prescore.kernels.scoring)
Mode = Literal[MODE_NAMES]  # prescore.kernels.selection.Mode

ENV_DEFAULT = "PRESCORE_DEFAULT_BUDGET"
ENV_MIN = "PRESCORE_MIN_BUDGET"
ENV_MAX = "PRESCORE_MAX_BUDGET"
ENV_ALLOW_DENSE = "PRESCORE_ALLOW_DENSE"
ENV_MAX_ATTENDED = "PRESCORE_MAX_ATTENDED"
TOP_FIELDS = ("key_budget", "prescore")


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
    """The top-level fields prescore reads from a generation request body."""

    model_config = ConfigDict(extra="ignore", strict=True)

    key_budget: int | None = Field(
        None, ge=0, le=MAX_TOKENS,
        description="Tokens of the KV cache each decode step attends beyond sink + window "
                    "(rounded up to whole KV blocks); 0 = dense attention. Omitted: the server default. "
                    "Must be 0 or within the server's [min, max] budget.")
    prescore: PrescoreOptions | None = Field(None, description="Sparse-attention options (prescore).")


class FieldError(ValueError):
    """A bad prescore field; ``param`` is the dotted field name as the client sent it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _pydantic_error(e: ValidationError) -> FieldError:
    from prescore.backend.params import _show

    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return FieldError(f"{loc}: {err['msg']} (got {_show(err.get('input'))})", loc)


def resolve(body: dict, defaults: PrescoreParams, xargs_at: str = "vllm_xargs") -> dict:
    """The request's effective prescore settings {budget, method, mode, sink, window}.

    ``defaults``: the server's ``PrescoreParams`` (defaults and policy, from ``load_defaults``); ``xargs_at``:
    where this route keeps the backend's keys (``vllm_xargs``, or ``sampling_params.extra_args`` for
    ``/inference/v1/generate``). Raises FieldError naming the offending field as sent: ``key_budget``,
    ``prescore.mode``, ``vllm_xargs.prescore_budget``, ...
    """
    try:
        fields = PrescoreRequestFields.model_validate(body)
    except ValidationError as e:
        raise _pydantic_error(e) from None
    except RecursionError:
        raise FieldError("prescore fields are nested too deeply", "prescore") from None
    top = {}
    if fields.key_budget is not None:
        top["budget"] = ("key_budget", fields.key_budget)
    if fields.prescore is not None:
        for k, v in fields.prescore.model_dump(exclude_none=True).items():
            top[k] = (f"prescore.{k}", v)

    xargs = _get(body, xargs_at)
    from_x = {}
    if xargs is not None:
        if not isinstance(xargs, dict):
            raise FieldError(f"{xargs_at} must be an object, got {type(xargs).__name__}", xargs_at)
        try:
            valid = validate_request(xargs, prefix=xargs_at + ".")  # the backend's own rules and messages
        except Exception as e:  # noqa: BLE001 - VLLMValidationError (naming the field) or ValueError
            if not isinstance(e, ValueError) and getattr(e, "parameter", None) is None:
                raise
            msg = e.args[0] if e.args else str(e)
            raise FieldError(str(msg), str(getattr(e, "parameter", "") or xargs_at)) from None
        from_x = {k: (f"{xargs_at}.{PREFIX}{k}", v) for k, v in valid.items()}

    out = {k: getattr(defaults, k) for k in REQUEST_FIELDS}
    source = {}
    for k, (name, v) in from_x.items():
        out[k], source[k] = v, name
    for k, (name, v) in top.items():
        if k in from_x and from_x[k][1] != v:
            raise FieldError(f"{name}={v!r} conflicts with {from_x[k][0]}={from_x[k][1]!r}", name)
        out[k], source[k] = v, name
    if defaults.max_attended == 0:
        defaults = replace(defaults, max_attended=defaults.max_budget + defaults.sink + defaults.window)
    bad = policy_violation(replace(defaults, **out), set(source))
    if bad:
        field, reason = bad
        name = source.get(field, "key_budget" if field == "budget" else f"prescore.{field}")
        raise FieldError(f"{name} {reason}", name)
    return out


def _get(body: dict, path: str):
    node = body
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def apply(body: dict, settings: dict, xargs_at: str = "vllm_xargs") -> dict:
    """The body vLLM sees: prescore's top-level fields removed, the settings in ``xargs_at``."""
    body = {k: v for k, v in body.items() if k not in TOP_FIELDS}
    parent = body
    *dirs, leaf = xargs_at.split(".")
    for d in dirs:
        parent[d] = dict(parent.get(d) or {})
        parent = parent[d]
    xargs = dict(parent.get(leaf) or {})
    xargs.update({PREFIX + k: v for k, v in settings.items()})
    parent[leaf] = xargs
    return body


def prescore_fields_in(body: dict, xargs_at: str = "vllm_xargs") -> str | None:
    """The first prescore field a body carries (for routes that cannot apply them), or None."""
    for k in TOP_FIELDS:
        if k in body:
            return k
    xargs = _get(body, xargs_at)
    if isinstance(xargs, dict):
        for k in xargs:
            if isinstance(k, str) and k.startswith(PREFIX):
                return f"{xargs_at}.{k}"
    return None


def ends_dense(settings: dict, block_size: int, context: int | None, completion: int | None = None) -> bool:
    """Whether every decode step of a request ran dense: budget 0, no decode step at all (one token or
    none), or its longest context (``context`` tokens) fits in sink + window + budget (whole blocks, the
    backend's rule)."""
    if settings["budget"] == 0 or (completion is not None and completion <= 1):
        return True
    if context is None:
        return False
    cdiv = lambda n: -(-n // block_size)  # noqa: E731
    return cdiv(context) <= cdiv(settings["sink"]) + cdiv(settings["window"]) + cdiv(settings["budget"])


def openapi_fields(p: PrescoreParams) -> dict:
    """JSON schema of ``key_budget`` and ``prescore`` with this server's limits (for /openapi.json)."""
    schema = copy.deepcopy(PrescoreRequestFields.model_json_schema(ref_template="#/components/schemas/{model}"))
    cap = p.max_attended or p.max_budget + p.sink + p.window
    dense = "0 (dense attention) or " if p.allow_dense else "dense attention (0) disabled; "
    kb = schema["properties"]["key_budget"]
    sparse = {"type": "integer", "minimum": max(p.min_budget, 1), "maximum": p.max_budget}
    if p.allow_dense and p.min_budget <= 1:
        ints = [{"type": "integer", "minimum": 0, "maximum": p.max_budget}]
    else:
        ints = ([{"type": "integer", "const": 0}] if p.allow_dense else []) + [sparse]
    kb["anyOf"] = ints + [{"type": "null"}]
    kb["description"] = (f"Tokens of the KV cache each decode step attends beyond sink + window (rounded up to whole "
                         f"KV blocks). This server: {dense}{max(p.min_budget, 1)}..{p.max_budget}; omitted = "
                         f"{p.budget}; sink + window + budget <= {cap}.")
    opts = schema["$defs"]["PrescoreOptions"]["properties"]
    for k in ("sink", "window"):
        opts[k]["anyOf"] = [{"type": "integer", "minimum": 0, "maximum": max(cap - max(p.min_budget, 1), 0)},
                             {"type": "null"}]
        opts[k].update({"description": opts[k].get("description", "") + f" This server: omitted = {getattr(p, k)}; "
                                       f"sink + window + budget <= {cap}."})
    return schema


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
