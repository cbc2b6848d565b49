"""The ASGI layer prescore puts in front of vLLM's own OpenAI server (``--middleware``; prescore-serve adds it).

For ``POST /v1/completions`` and ``/v1/chat/completions`` it

1. validates ``key_budget`` / ``prescore`` / ``vllm_xargs.prescore_*`` (pydantic, strict types) against the
   server's budget limits; a bad value gets HTTP 400 in vLLM's error format, ``error.param`` naming the field;
2. rewrites the body vLLM sees: the top-level fields removed, the fully resolved settings in ``vllm_xargs``
   (the backend's per-request keys), so vLLM's serving code, chat templates, streaming, usage and errors are
   used unchanged;
3. reports what was applied: headers ``x-prescore-budget`` / ``-method`` / ``-mode`` on every response and,
   for non-streamed JSON, ``usage.prescore``;
4. counts ``prescore:requests_total`` when the response starts with 200 and
   ``prescore:rejected_requests_total`` when it refuses one.

Other requests pass through untouched; after the body, the client's own ``receive`` is used, so a client that
disconnects mid-stream is seen by vLLM, which aborts that request. At startup (ASGI lifespan) it reads the
backend's defaults from ``app.state.args.additional_config`` and ``$PRESCORE_CONFIG``, installs the backend
counters in vLLM's Prometheus registry and adds the fields to the OpenAPI schema.

Usable with stock vLLM too: ``vllm serve MODEL --attention-backend prescore --middleware
prescore.server.middleware.PrescoreMiddleware`` (limits from ``PRESCORE_*_BUDGET`` environment variables).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

from .schema import BudgetLimits, FieldError, PrescoreRequestFields, apply, budget_bucket, resolve

logger = logging.getLogger("vllm.prescore.server")
PATHS = ("/v1/completions", "/v1/chat/completions")
OPENAPI_MODELS = ("CompletionRequest", "ChatCompletionRequest")


def _error(status: int, message: str, param: str | None) -> tuple[bytes, list]:
    from http import HTTPStatus

    body = {"error": {"message": message, "type": HTTPStatus(status).phrase, "param": param, "code": status}}
    raw = json.dumps(body).encode()
    return raw, [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]


class PrescoreMiddleware:
    def __init__(self, app):
        self.app = app
        self.limits = BudgetLimits.from_env()
        self.defaults: dict | None = None
        self.model_name = ""
        self.auth = None  # vLLM's --api-key check: unauthenticated requests go straight to vLLM's 401

    # ---- startup -----------------------------------------------------------------------------------------
    def _setup(self, fastapi_app) -> None:
        from prescore.backend.params import load_defaults

        args = getattr(getattr(fastapi_app, "state", None), "args", None)
        extra = getattr(args, "additional_config", None) or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        self.defaults = asdict(load_defaults(extra))
        if self.limits.default is not None:
            self.defaults["budget"] = self.limits.default
        why = self.limits.violation(self.defaults["budget"])
        if why:
            raise ValueError(f"prescore: the default budget {why}")
        tokens = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
        if tokens:
            from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

            self.auth = AuthenticationMiddleware(None, tokens=tokens)
        names = getattr(args, "served_model_name", None)
        self.model_name = (names[0] if names else None) or str(getattr(args, "model", "") or "")
        from .metrics import install_engine_collector, rejected_counter, requests_counter

        requests_counter()
        rejected_counter()
        install_engine_collector(self.model_name)
        _patch_openapi(fastapi_app)
        logger.info("prescore: defaults %s; budget limits %s", self.defaults, self.limits)

    # ---- requests ----------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if self.defaults is None and "app" in scope:
            self._setup(scope["app"])
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if path not in PATHS:
            return await self.app(scope, receive, send)
        if self.auth is not None:
            from starlette.datastructures import Headers

            if not self.auth.verify_token(Headers(scope=scope)):
                return await self.app(scope, receive, send)

        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # vLLM reports malformed bodies itself
            return await self.app(scope, _replay(raw, receive), send)

        try:
            settings = resolve(body, self.defaults, self.limits)
        except FieldError as e:
            from .metrics import field_label, rejected_counter

            rejected_counter().labels(self.model_name, field_label(e.param)).inc()
            out, headers = _error(400, str(e), e.param)
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": out})
            return

        raw = json.dumps(apply(body, settings)).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        scope = dict(scope, headers=headers)
        await self.app(scope, _replay(raw, receive), self._reporting_send(send, settings, bool(body.get("stream"))))

    def _reporting_send(self, send, settings: dict, stream: bool):
        extra = [(b"x-prescore-budget", str(settings["budget"]).encode()),
                 (b"x-prescore-method", settings["method"].encode()),
                 (b"x-prescore-mode", settings["mode"].encode())]
        held: dict = {}
        parts: list[bytes] = []

        async def wrapped(msg):
            if msg["type"] == "http.response.start":
                msg = dict(msg, headers=list(msg.get("headers", [])) + extra)
                if msg["status"] == 200:
                    from .metrics import requests_counter

                    requests_counter().labels(self.model_name, budget_bucket(settings["budget"]),
                                              settings["method"], settings["mode"]).inc()
                    ctype = dict((k.lower(), v) for k, v in msg["headers"]).get(b"content-type", b"")
                    if not stream and ctype.startswith(b"application/json"):
                        held["start"] = msg  # add usage.prescore once the body is complete
                        return
                return await send(msg)
            if msg["type"] == "http.response.body" and "start" in held:
                parts.append(msg.get("body", b""))
                if msg.get("more_body", False):
                    return
                body = b"".join(parts)
                try:
                    data = json.loads(body)
                    if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                        data["usage"]["prescore"] = {"key_budget": settings["budget"], **{
                            k: settings[k] for k in ("method", "mode", "sink", "window")}}
                        body = json.dumps(data).encode()
                except ValueError:
                    pass
                start = held.pop("start")
                start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start["headers"].append((b"content-length", str(len(body)).encode()))
                await send(start)
                return await send({"type": "http.response.body", "body": body})
            return await send(msg)

        return wrapped


def _replay(raw: bytes, receive):
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()  # http.disconnect reaches vLLM (aborts the request)

    return replay


def _patch_openapi(app) -> None:
    """Document key_budget / prescore on vLLM's completion and chat request schemas."""
    base = getattr(app, "openapi", None)
    if base is None or getattr(base, "_prescore", False):
        return

    def openapi():
        if getattr(app, "openapi_schema", None):
            return app.openapi_schema
        schema = base()
        extra = PrescoreRequestFields.model_json_schema(ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(extra.pop("$defs", {}))
        for name in OPENAPI_MODELS:
            if name in comps:
                comps[name].setdefault("properties", {}).update(extra["properties"])
        info = schema.setdefault("info", {})
        info["description"] = (info.get("description") or "") + (
            "\n\nprescore: completion and chat requests take `key_budget` (tokens, 0 = dense) and a `prescore` "
            "object (method, mode, sink, window); the applied budget comes back in the `x-prescore-budget` "
            "header and `usage.prescore`.")
        app.openapi_schema = schema
        return schema

    openapi._prescore = True
    app.openapi = openapi
