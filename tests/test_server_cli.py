"""prescore-serve's command line and the request-field rules, without starting an engine; the container entrypoint
run outside Docker with a stub server command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_vllm

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = ("PRESCORE_DEFAULT_BUDGET", "PRESCORE_MIN_BUDGET", "PRESCORE_MAX_BUDGET", "PRESCORE_ALLOW_DENSE",
            "PRESCORE_MAX_ATTENDED", "PRESCORE_PROTECT_METRICS", "PRESCORE_METRICS_DIR", "PRESCORE_CONFIG")


@pytest.fixture
def clean_env(monkeypatch):
    for k in ENV_KEYS:  # setenv first so that undo also removes what prepare() sets
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    return monkeypatch


# ------------------------------------------------------------------------------------------ request fields

DEFAULTS = {"budget": 2048, "method": "kmeans", "mode": "hybrid", "sink": 64, "window": 256}


def _params(**kw):
    from prescore.backend.params import PrescoreParams, check_policy

    return check_policy(PrescoreParams(**{**DEFAULTS, **kw}))


def test_resolve_precedence_and_apply():
    from prescore.server.schema import apply, resolve

    p = _params()
    assert resolve({}, p) == DEFAULTS
    assert resolve({}, _params(budget=512))["budget"] == 512
    s = resolve({"key_budget": 0, "prescore": {"mode": "quest", "sink": 0}}, p)
    assert s == {**DEFAULTS, "budget": 0, "mode": "quest", "sink": 0}
    s = resolve({"vllm_xargs": {"prescore_budget": 128, "prescore_method": "keynorm", "other": "x"}}, p)
    assert (s["budget"], s["method"]) == (128, "keynorm")
    body = apply({"model": "m", "key_budget": 128, "prescore": {"method": "keynorm"},
                  "vllm_xargs": {"other": "x"}}, s)
    assert "key_budget" not in body and "prescore" not in body and body["model"] == "m"
    assert body["vllm_xargs"] == {"other": "x", "prescore_budget": 128, "prescore_method": "keynorm",
                                  "prescore_mode": "hybrid", "prescore_sink": 64, "prescore_window": 256}
    # token in / token out keeps the backend's keys in sampling_params.extra_args
    at = "sampling_params.extra_args"
    s = resolve({"key_budget": 96, "sampling_params": {"extra_args": {"prescore_mode": "prior"}}}, p, at)
    assert (s["budget"], s["mode"]) == (96, "prior")
    body = apply({"key_budget": 96, "sampling_params": {"max_tokens": 3}}, s, at)
    assert body["sampling_params"]["max_tokens"] == 3 and body["sampling_params"]["extra_args"]["prescore_budget"] == 96


@pytest.mark.parametrize("body,param", [
    ({"key_budget": -1}, "key_budget"), ({"key_budget": 1 << 30}, "key_budget"), ({"key_budget": 1.0}, "key_budget"),
    ({"key_budget": "1"}, "key_budget"), ({"key_budget": None, "prescore": {"window": "8"}}, "prescore.window"),
    ({"key_budget": 8}, "key_budget"), ({"key_budget": 100_000}, "key_budget"),
    ({"prescore": {"method": "KMEANS"}}, "prescore.method"), ({"prescore": []}, "prescore"),
    ({"vllm_xargs": {"prescore_window": -1}}, "vllm_xargs.prescore_window"),
    ({"vllm_xargs": {"prescore_budget": 8}}, "vllm_xargs.prescore_budget"),  # under the server minimum
    ({"vllm_xargs": ["prescore_budget"]}, "vllm_xargs"),
    ({"prescore": {"mode": "prior"}, "vllm_xargs": {"prescore_mode": "quest"}}, "prescore.mode"),
    ({"key_budget": 256, "prescore": {"window": 1 << 24}}, "prescore.window"),  # over max attended tokens
    ({"vllm_xargs": {"prescore_sink": 70_000}}, "vllm_xargs.prescore_sink"),
])
def test_resolve_rejects_naming_the_field(body, param):
    from prescore.server.schema import FieldError, resolve

    with pytest.raises(FieldError) as ei:
        resolve(body, _params(min_budget=32, max_budget=65536))
    assert ei.value.param == param
    assert str(ei.value).startswith(param), str(ei.value)  # messages name the field as sent


def test_dense_can_be_disabled_and_buckets():
    from prescore.server.schema import FieldError, budget_bucket, ends_dense, resolve

    with pytest.raises(FieldError, match="dense"):
        resolve({"key_budget": 0}, _params(allow_dense=False))
    assert [budget_bucket(b) for b in (0, 1, 256, 257, 4096, 16384, 16385)] == [
        "dense", "le_256", "le_256", "le_512", "le_4096", "le_16384", "gt_16384"]
    s = {"budget": 64, "sink": 16, "window": 64, "method": "kmeans", "mode": "hybrid"}  # 1 + 2 + 2 blocks of 32
    assert ends_dense(s, 32, 160) and not ends_dense(s, 32, 161)
    assert ends_dense({**s, "budget": 0}, 32, 10_000) and ends_dense(s, 32, 10_000, completion=1)
    assert not ends_dense(s, 32, None)


def test_openapi_fields_carry_the_server_limits():
    from prescore.server.schema import openapi_fields

    sch = openapi_fields(_params(budget=512, min_budget=256, max_budget=1024, allow_dense=False))
    kb = sch["properties"]["key_budget"]
    assert {"type": "integer", "minimum": 256, "maximum": 1024} in kb["anyOf"] and "disabled" in kb["description"]
    assert not any(a.get("const") == 0 or a.get("minimum") == 0 for a in kb["anyOf"])
    win = sch["$defs"]["PrescoreOptions"]["properties"]["window"]["anyOf"][0]
    assert win["maximum"] == 1024 + 64 + 256 - 256
    kb = openapi_fields(_params(budget=512, min_budget=256, max_budget=1024))["properties"]["key_budget"]
    assert {"type": "integer", "const": 0} in kb["anyOf"]


def test_policy_from_env_and_config():
    from prescore.backend.params import load_defaults

    env = {"PRESCORE_DEFAULT_BUDGET": "512", "PRESCORE_MIN_BUDGET": "64", "PRESCORE_MAX_BUDGET": "4096",
           "PRESCORE_ALLOW_DENSE": "false", "PRESCORE_MAX_ATTENDED": "5000"}
    p = load_defaults({"prescore": {"budget": 2048, "max_budget": 100_000}}, env=env)  # the variables win
    assert (p.budget, p.min_budget, p.max_budget, p.allow_dense, p.max_attended) == (512, 64, 4096, False, 5000)
    p = load_defaults({"prescore": {"max_budget": 4096, "allow_dense": False, "sink": 16, "window": 64}}, env={})
    assert (p.max_budget, p.allow_dense, p.max_attended) == (4096, False, 4096 + 16 + 64)
    for bad in ({"PRESCORE_MIN_BUDGET": "lots"}, {"PRESCORE_MIN_BUDGET": "10", "PRESCORE_MAX_BUDGET": "5"},
                {"PRESCORE_ALLOW_DENSE": "maybe"}, {"PRESCORE_MAX_BUDGET": "-1"},
                {"PRESCORE_MAX_ATTENDED": "100"}):  # under the default sink + window + budget
        with pytest.raises(ValueError, match="PRESCORE|limits|default"):
            load_defaults({}, env=bad)
    with pytest.raises(ValueError, match="allow_dense"):
        load_defaults({"prescore": {"allow_dense": "no"}}, env={})


# -------------------------------------------------------------------------------------------- command line

@requires_vllm
def test_prepare_defaults_and_overrides(clean_env, tmp_path):
    from prescore.server.cli import MIDDLEWARE, prepare

    args, _ = prepare([str(tmp_path), "--port", "9"])
    assert str(args.attention_backend).lower().endswith("prescore") and args.host == "127.0.0.1"
    assert args.middleware == [MIDDLEWARE] and args.model_tag == str(tmp_path)
    assert os.path.isdir(os.environ["PRESCORE_METRICS_DIR"])
    for var in ("PRESCORE_DEFAULT_BUDGET", "PRESCORE_MIN_BUDGET", "PRESCORE_ALLOW_DENSE", "PRESCORE_CONFIG"):
        assert var not in os.environ  # flags not given: nothing exported, the config's policy stands

    clean_env.setenv("PRESCORE_MAX_BUDGET", "8192")
    args, _ = prepare(["serve", str(tmp_path), "--host", "0.0.0.0", "--attention-backend", "TRITON_ATTN",
                       "--prescore-default-budget", "256", "--prescore-min-budget", "128", "--no-prescore-allow-dense",
                       "--prescore-max-attended", "9000", "--prescore-protect-metrics",
                       "--additional-config", '{"prescore": {"mode": "quest"}}'])
    assert args.host == "0.0.0.0" and "prescore" not in str(args.attention_backend).lower()
    assert (os.environ["PRESCORE_DEFAULT_BUDGET"], os.environ["PRESCORE_MIN_BUDGET"],
            os.environ["PRESCORE_MAX_BUDGET"], os.environ["PRESCORE_ALLOW_DENSE"]) == ("256", "128", "8192", "0")
    assert (os.environ["PRESCORE_MAX_ATTENDED"], os.environ["PRESCORE_PROTECT_METRICS"]) == ("9000", "1")
    assert json.loads(os.environ["PRESCORE_CONFIG"]) == {"mode": "quest"}  # the engine's frontend sees the config


@requires_vllm
def test_prepare_embedded_default_model(clean_env, monkeypatch, tmp_path):
    import prescore.models
    from prescore.server.cli import prepare

    monkeypatch.setattr(prescore.models, "smollm2_dir", lambda: tmp_path / "smollm2")
    args, _ = prepare(["--port", "9"])
    assert args.model_tag == str(tmp_path / "smollm2")


@requires_vllm
@pytest.mark.parametrize("argv,msg", [
    (["--prescore-min-budget", "100", "--prescore-default-budget", "50"], "default budget"),
    (["--prescore-min-budget", "100", "--prescore-max-budget", "50"], "min"),
    (["--prescore-max-budget", "1024"], "default budget"),  # the backend's built-in 2048 exceeds it
    (["--prescore-min-budget", "64", "--additional-config", '{"prescore": {"budget": 32}}'], "default budget"),
    (["--no-prescore-allow-dense", "--prescore-default-budget", "0"], "dense"),
    (["--prescore-max-attended", "100"], "default sink + window + budget"),
    (["--prescore-min-budget", "-1"], "PRESCORE_MIN_BUDGET"),
])
def test_bad_limits_fail_at_startup(clean_env, tmp_path, capsys, argv, msg):
    from prescore.server.cli import prepare

    with pytest.raises(SystemExit) as ei:
        prepare([str(tmp_path), *argv])
    assert ei.value.code == 2 and msg in capsys.readouterr().err


@requires_vllm
def test_help_lists_prescore_flags():
    exe = Path(sys.executable).parent / "prescore-serve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prescore.server"]
    p = subprocess.run([*cmd, "--help=prescore"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for flag in ("--prescore-default-budget", "--prescore-min-budget", "--prescore-max-budget",
                 "--prescore-max-attended", "--prescore-allow-dense", "--prescore-protect-metrics"):
        assert flag in p.stdout


# ------------------------------------------------------------------------------------------ the entrypoint

def _entrypoint(tmp_path, env, *args):
    stub = tmp_path / "stub-serve"
    stub.write_text('#!/bin/sh\nexec python3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@"\n')
    stub.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k not in ("MODEL", "HOST", "PORT", "API_KEY")}
    full.update(env, PRESCORE_SERVE=str(stub))
    p = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True,
                       env=full, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_entrypoint_builds_the_command(tmp_path):
    assert _entrypoint(tmp_path, {}) == ["--host", "0.0.0.0", "--port", "8000"]
    got = _entrypoint(tmp_path, {"MODEL": "org/model", "PORT": "9000", "API_KEY": "s3cret", "HOST": "127.0.0.1"},
                      "--max-model-len", "32768", "--served-model-name", "a b")
    assert got == ["org/model", "--host", "127.0.0.1", "--port", "9000", "--max-model-len", "32768",
                   "--served-model-name", "a b", "--api-key", "s3cret"]
