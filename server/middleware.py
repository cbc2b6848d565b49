"""The ASGI layer prescore puts in front of vLLM's own server (``--middleware``; prescore-serve adds it).

The server policy itself (min / max budget, dense allowed, max attended tokens) is enforced in the engine
(``prescore.backend.requests``: every route and ``LLM.generate``). This layer keeps what is HTTP-specific:

1. API key (``--api-key`` / ``VLLM_API_KEY``): every path but :data:`OPEN` (``/health``, ``/ping``, and
   ``/metrics`` unless ``PRESCORE_PROTECT_METRICS``) needs ``Authorization: Bearer <key>``, whatever vLLM
   guards itself (vLLM checks only ``/v1``, ``/v2``, ``/inference`` and ``/cohere`` paths);
2. request bodies: over ``PRESCORE_MAX_BODY_BYTES`` (default 64 MiB) -> 413; not JSON, undecodable, nested over
   :data:`MAX_DEPTH` levels -> 400 (never a 5xx);
3. on the generation routes (:data:`ROUTES`) it validates ``key_budget`` / ``prescore`` / the backend's keys
   (``vllm_xargs.prescore_*``) against the same rules (a bad value -> 400 in vLLM's error format,
   ``error.param`` naming the field as sent) and rewrites the body vLLM sees: the top-level fields removed, the
   resolved settings in ``vllm_xargs`` (``sampling_params.extra_args`` on ``/inference/v1/generate``); any other
   POST route that carries those fields gets 400 (they would be ignored there);
4. reports what was applied: headers ``x-prescore-budget`` / ``-method`` / ``-mode`` and ``usage.prescore``
   (non-streamed bodies, and the usage of streamed ones: a streamed completion / chat asks vLLM for its usage
   chunk and drops it again when the client did not ask for it);
5. counts ``prescore:requests_total`` once a generation response with status 200 ends, under the ``dense``
   bucket when every decode step ran dense (budget 0, or the context fits in sink + window + budget), and
   ``prescore:rejected_requests_total`` when it refuses a field.

Other requests pass through untouched; after the body, the client's own ``receive`` is used, so a client that
disconnects mid-stream is seen by vLLM, which aborts that request. At startup (ASGI lifespan) it loads the
backend's defaults and policy (``load_defaults``: ``--additional-config``, ``$PRESCORE_CONFIG``, the
``PRESCORE_*`` variables), installs the backend counters in vLLM's Prometheus registry and adds the fields, with
this server's limits, to the OpenAPI schema.

Usable with stock vLLM too: ``vllm serve MODEL --attention-backend prescore --middleware
prescore.server.middleware.PrescoreMiddleware``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

from .schema import FieldError, apply, budget_bucket, ends_dense, openapi_fields, prescore_fields_in, resolve

logger = logging.getLogger("vllm.prescore.server")

# generation routes vLLM serves -> where the backend's per-request keys go
ROUTES = {
    "/v1/completions": "vllm_xargs",
    "/v1/chat/completions": "vllm_xargs",
    "/v1/chat/completions/batch": "vllm_xargs",
    "/v1/responses": "vllm_xargs",
    "/v1/messages": "vllm_xargs",
    "/invocations": "vllm_xargs",  # SageMaker: a chat or completion body
    "/inference/v1/generate": "sampling_params.extra_args",  # token in / token out (--enable-scale-out)
}
# routes that run the model with the server's defaults only (no per-request settings there)
FIXED = ("/generative_scoring", "/v1/systemone")
STREAM_USAGE = ("/v1/completions", "/v1/chat/completions", "/invocations")  # OpenAI stream_options.include_usage
ANTHROPIC = ("/v1/messages",)
OPEN = ("/health", "/ping")
OPENAPI_MODELS = ("CompletionRequest", "ChatCompletionRequest", "BatchChatCompletionRequest", "ResponsesRequest",
                  "AnthropicMessagesRequest", "GenerateRequest")
MAX_DEPTH = 128
DEFAULT_MAX_BODY = 64 << 20
ENV_MAX_BODY = "PRESCORE_MAX_BODY_BYTES"
ENV_PROTECT_METRICS = "PRESCORE_PROTECT_METRICS"
_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def _json_response(status: int, body: dict) -> tuple[bytes, list]:
    raw = json.dumps(body, separators=(",", ":")).encode()
    return raw, [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]


def error_body(status: int, message: str, param: str | None, anthropic: bool = False,
               err_type: str = "BadRequestError") -> dict:
    """vLLM's error format (``ErrorResponse``; the Anthropic one on ``/v1/messages``)."""
    if anthropic:
        return {"type": "error", "error": {"type": err_type, "message": message}}
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def _too_deep(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _truthy(raw: str | None) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


class PrescoreMiddleware:
    def __init__(self, app):
        self.app = app
        self.params = None  # the backend's PrescoreParams (defaults + policy), loaded at startup
        self.model_name = ""
        self.block_size = 16
        self.max_model_len = None
        self.auth = None  # vLLM's token check (same keys, same hashing)
        self.open_paths = OPEN
        self.max_body = DEFAULT_MAX_BODY

    # ---- startup -----------------------------------------------------------------------------------------
    def _setup(self, fastapi_app) -> None:
        from prescore.backend.params import load_defaults

        state = getattr(fastapi_app, "state", None)
        args = getattr(state, "args", None)
        extra = getattr(args, "additional_config", None) or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        self.params = load_defaults(extra)
        cfg = getattr(state, "vllm_config", None)
        self.block_size = int(getattr(getattr(cfg, "cache_config", None), "block_size", None) or 16)
        self.max_model_len = getattr(getattr(cfg, "model_config", None), "max_model_len", None)
        tokens = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
        if tokens:
            from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

            self.auth = AuthenticationMiddleware(None, tokens=tokens)
        self.open_paths = OPEN if _truthy(os.environ.get(ENV_PROTECT_METRICS)) else OPEN + ("/metrics",)
        raw = os.environ.get(ENV_MAX_BODY, "").strip()
        self.max_body = int(raw) if raw else DEFAULT_MAX_BODY
        names = getattr(args, "served_model_name", None)
        self.model_name = (names[0] if names else None) or str(getattr(args, "model", "") or "")
        from .metrics import install_engine_collector, rejected_counter, requests_counter

        requests_counter()
        rejected_counter()
        install_engine_collector(self.model_name)
        _patch_openapi(fastapi_app, self.params, self.auth is not None, self.open_paths)
        logger.info("prescore: defaults and policy %s; open paths %s", asdict(self.params),
                    self.open_paths if self.auth else "all (no --api-key)")

    # ---- requests ----------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if self.params is None and "app" in scope:
            self._setup(scope["app"])
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if self.auth is not None and scope.get("method") != "OPTIONS" and path not in self.open_paths:
            from starlette.datastructures import Headers

            if not self.auth.verify_token(Headers(scope=scope)):
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                out, headers = _json_response(401, {"error": "Unauthorized"})  # vLLM's own 401 body
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                return await send({"type": "http.response.body", "body": out})
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)

        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype in _FORMS and path not in ROUTES and path not in FIXED:
            return await self.app(scope, receive, send)  # uploads (audio): vLLM parses them; the engine checks
        anthropic = path in ANTHROPIC

        async def refuse(status, message, param=None, err_type="BadRequestError", field=None):
            if field is not None:
                from .metrics import field_label, rejected_counter

                rejected_counter().labels(self.model_name, field_label(field)).inc()
            out, hdrs = _json_response(status, error_body(status, message, param, anthropic, err_type))
            await send({"type": "http.response.start", "status": status, "headers": hdrs})
            await send({"type": "http.response.body", "body": out})

        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await refuse(413, f"request body over {self.max_body} bytes", err_type="PayloadTooLargeError")
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await refuse(413, f"request body over {self.max_body} bytes", err_type="PayloadTooLargeError")
            chunks.append(chunk)
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        if not raw.strip():
            return await self.app(scope, _replay(raw, receive), send)  # vLLM answers an empty body itself
        try:
            body = json.loads(raw)
            deep = _too_deep(body, MAX_DEPTH) if isinstance(body, (dict, list)) else False
        except RecursionError:
            body, deep = None, True
        except ValueError as e:  # includes undecodable bytes (UnicodeDecodeError) and oversized integers
            if ctype.endswith("json") or path in ROUTES or path in FIXED:
                return await refuse(400, f"request body is not valid JSON: {str(e)[:200]}")
            return await self.app(scope, _replay(raw, receive), send)
        if deep:
            return await refuse(400, f"request body is nested more than {MAX_DEPTH} levels deep")
        if not isinstance(body, dict):  # vLLM reports the wrong shape itself (400)
            return await self.app(scope, _replay(raw, receive), send)

        xargs_at = ROUTES.get(path)
        strip_usage = False
        if xargs_at is None:
            bad = prescore_fields_in(body)
            if bad:
                return await refuse(400, f"{bad} is not accepted on {path}: prescore settings apply on "
                                         f"{', '.join(ROUTES)}", bad, field=bad)
            if path not in FIXED:
                return await self.app(scope, _replay(raw, receive), send)
            settings = {k: getattr(self.params, k) for k in ("budget", "method", "mode", "sink", "window")}
        else:
            try:
                settings = resolve(body, self.params, xargs_at)
            except FieldError as e:
                return await refuse(400, str(e), e.param, field=e.param)
            body = apply(body, settings, xargs_at)
            if path in STREAM_USAGE and body.get("stream") is True:
                opts = body.get("stream_options")
                if opts is None or (isinstance(opts, dict) and not opts.get("include_usage")
                                    and not opts.get("continuous_usage_stats")):
                    body["stream_options"] = {**(opts or {}), "include_usage": True}
                    strip_usage = True
            raw = json.dumps(body).encode()
        hdrs = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"transfer-encoding")]
        hdrs.append((b"content-length", str(len(raw)).encode()))
        scope = dict(scope, headers=hdrs)
        state: dict = {"strip_usage": strip_usage}
        try:
            await self.app(scope, _replay(raw, receive), self._reporting_send(send, settings, state))
        finally:
            self._count(settings, state)

    # ---- responses ---------------------------------------------------------------------------------------
    def _usage_fields(self, settings: dict, usage: dict) -> dict:
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        out = usage.get("completion_tokens", usage.get("output_tokens"))
        dense = None
        if isinstance(prompt, int) and isinstance(out, int):
            dense = ends_dense(settings, self.block_size, prompt + max(out - 1, 0), out)
        return {"key_budget": settings["budget"], **{k: settings[k] for k in ("method", "mode", "sink", "window")},
                "dense": dense}

    def _count(self, settings: dict, state: dict) -> None:
        if state.get("status") != 200 or state.get("counted"):
            return
        state["counted"] = True
        dense = state.get("dense")
        if dense is None:  # no usage seen: dense when even the longest context fits
            dense = ends_dense(settings, self.block_size, self.max_model_len)
        from .metrics import requests_counter

        requests_counter().labels(self.model_name, "dense" if dense else budget_bucket(settings["budget"]),
                                  settings["method"], settings["mode"]).inc()

    def _add_usage(self, data, settings: dict, state: dict) -> bool:
        """Add usage.prescore where ``data`` carries usage (top level, or ``response.usage``)."""
        if not isinstance(data, dict):
            return False
        holder = data if isinstance(data.get("usage"), dict) else data.get("response")
        if not isinstance(holder, dict) or not isinstance(holder.get("usage"), dict):
            return False
        fields = self._usage_fields(settings, holder["usage"])
        holder["usage"]["prescore"] = fields
        state["dense"] = fields["dense"]
        return True

    def _sse_event(self, event: bytes, settings: dict, state: dict) -> bytes | None:
        if b'"usage"' not in event:
            return event
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            try:
                data = json.loads(line[5:])
            except ValueError:
                continue
            if not self._add_usage(data, settings, state):
                continue
            if state["strip_usage"] and data.get("choices") == [] and "response" not in data:
                return None  # the usage chunk only prescore asked for
            lines[i] = b"data: " + json.dumps(data, separators=(",", ":")).encode()
        return b"\n".join(lines)

    def _reporting_send(self, send, settings: dict, state: dict):
        extra = [(b"x-prescore-budget", str(settings["budget"]).encode()),
                 (b"x-prescore-method", settings["method"].encode()),
                 (b"x-prescore-mode", settings["mode"].encode())]
        held: dict = {}
        parts: list[bytes] = []
        pending = bytearray()

        async def wrapped(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
                msg = dict(msg, headers=list(msg.get("headers", [])) + extra)
                ctype = dict((k.lower(), v) for k, v in msg["headers"]).get(b"content-type", b"")
                if msg["status"] == 200 and ctype.startswith(b"application/json"):
                    held["start"] = msg  # add usage.prescore once the body is complete
                    return
                if msg["status"] == 200 and ctype.startswith(b"text/event-stream"):
                    state["sse"] = True
                return await send(msg)
            if msg["type"] != "http.response.body":
                return await send(msg)
            more = msg.get("more_body", False)
            if "start" in held:
                parts.append(msg.get("body", b""))
                if more:
                    return
                body = b"".join(parts)
                try:
                    data = json.loads(body)
                    if self._add_usage(data, settings, state):
                        body = json.dumps(data, separators=(",", ":")).encode()
                except (ValueError, RecursionError):
                    pass
                start = held.pop("start")
                start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start["headers"].append((b"content-length", str(len(body)).encode()))
                await send(start)
                await send({"type": "http.response.body", "body": body})
                self._count(settings, state)
                return
            if state.get("sse"):
                pending.extend(msg.get("body", b""))
                out = []
                while True:
                    cut = pending.find(b"\n\n")
                    if cut < 0:
                        break
                    event = bytes(pending[:cut + 2])
                    del pending[:cut + 2]
                    event = self._sse_event(event, settings, state)
                    if event is not None:
                        out.append(event)
                if not more and pending:
                    out.append(bytes(pending))
                    pending.clear()
                if out or not more:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": more})
                if not more:
                    self._count(settings, state)
                return
            await send(msg)
            if not more:
                self._count(settings, state)

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


def _patch_openapi(app, params, auth: bool, open_paths) -> None:
    """Document key_budget / prescore, with this server's limits, on vLLM's generation request schemas."""
    base = getattr(app, "openapi", None)
    if base is None or getattr(base, "_prescore", False):
        return

    def openapi():
        if getattr(app, "openapi_schema", None):
            return app.openapi_schema
        schema = base()
        extra = openapi_fields(params)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(extra.pop("$defs", {}))
        for name in OPENAPI_MODELS:
            if name in comps:
                comps[name].setdefault("properties", {}).update(extra["properties"])
        cap = params.max_attended or params.max_budget + params.sink + params.window
        info = schema.setdefault("info", {})
        info["x-prescore-policy"] = {"default_budget": params.budget, "min_budget": params.min_budget,
                                     "max_budget": params.max_budget, "allow_dense": params.allow_dense,
                                     "max_attended": cap, "default_sink": params.sink,
                                     "default_window": params.window, "methods": list(params.methods)}
        info["description"] = (info.get("description") or "") + (
            f"\n\nprescore: the generation routes ({', '.join(ROUTES)}) take `key_budget` (tokens; this server: "
            f"{'0 = dense or ' if params.allow_dense else 'dense disabled; '}{params.min_budget}.."
            f"{params.max_budget}, default {params.budget}) and a `prescore` object (method, mode, sink, window; "
            f"sink + window + budget <= {cap}); the applied settings come back in the `x-prescore-*` headers and "
            "`usage.prescore`.")
        if auth:
            info["description"] += (" Every path but " + ", ".join(open_paths) + " needs the API key.")
        app.openapi_schema = schema
        return schema

    openapi._prescore = True
    app.openapi = openapi
