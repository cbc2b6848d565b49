"""``prescore-serve [MODEL] [vLLM serve args...]``: vLLM's own ``vllm serve`` with prescore switched on.

Same parser, same server, same engine as ``vllm serve`` (every vLLM flag works), plus:

- ``--attention-backend prescore`` unless another backend is given;
- ``--host 127.0.0.1`` unless ``--host`` is given (vLLM binds every interface by default);
- ``--middleware prescore.server.middleware.PrescoreMiddleware``: ``key_budget`` / ``prescore`` request
  fields on every generation route, ``x-prescore-*`` headers, the API key on every route but /health,
  prescore counters on ``/metrics``;
- server-policy flags ``--prescore-default-budget``, ``--prescore-min-budget``, ``--prescore-max-budget``,
  ``--prescore-max-attended``, ``--[no-]prescore-allow-dense`` and ``--[no-]prescore-protect-metrics``, exported
  as ``PRESCORE_DEFAULT_BUDGET``, ``PRESCORE_MIN_BUDGET``, ``PRESCORE_MAX_BUDGET``, ``PRESCORE_MAX_ATTENDED``,
  ``PRESCORE_ALLOW_DENSE``, ``PRESCORE_PROTECT_METRICS`` (the engine reads them: the policy holds on every
  route), and ``PRESCORE_CONFIG`` merged with ``--additional-config``'s prescore object;
- ``PRESCORE_METRICS_DIR`` set to a fresh temporary folder unless already set (the engine's workers write
  their counters there; the API server reads them at scrape time);
- no MODEL: the embedded SmolLM2-135M-Instruct (``prescore.models.smollm2_dir()``).

Other backend defaults (method, mode, sink, window) come from ``PRESCORE_CONFIG`` or
``--additional-config '{"prescore": {...}}'`` as for the backend itself.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile

MIDDLEWARE = "prescore.server.middleware.PrescoreMiddleware"
ENV_PROTECT_METRICS = "PRESCORE_PROTECT_METRICS"


def _has(argv: list[str], flag: str) -> bool:
    alt = flag.replace("-", "_")
    return any(a in (flag, alt) or a.startswith(flag + "=") or a.startswith(alt + "=") for a in argv)


def add_prescore_args(parser) -> None:
    from .schema import ENV_ALLOW_DENSE, ENV_DEFAULT, ENV_MAX, ENV_MAX_ATTENDED, ENV_MIN

    g = parser.add_argument_group("prescore", "Server policy for per-request key budgets (prescore-serve); enforced "
                                              "by the engine on every route. Each flag sets its variable.")
    g.add_argument("--prescore-default-budget", type=int, default=None, metavar="TOKENS",
                   help=f"budget of requests that send none (0 = dense); default ${ENV_DEFAULT}, else the "
                        "backend's default (PRESCORE_CONFIG / --additional-config, built-in 2048)")
    g.add_argument("--prescore-min-budget", type=int, default=None, metavar="TOKENS",
                   help=f"smallest sparse budget a request may ask for (default ${ENV_MIN} or the config's "
                        "min_budget, else 0)")
    g.add_argument("--prescore-max-budget", type=int, default=None, metavar="TOKENS",
                   help=f"largest sparse budget a request may ask for (default ${ENV_MAX} or the config's "
                        "max_budget, else 16777216)")
    g.add_argument("--prescore-max-attended", type=int, default=None, metavar="TOKENS",
                   help=f"most sink + window + budget a sparse request may ask for (default ${ENV_MAX_ATTENDED} or "
                        "the config's max_attended, else max budget + the default sink + window)")
    g.add_argument("--prescore-allow-dense", action=argparse.BooleanOptionalAction, default=None,
                   help=f"accept budget 0 (dense attention) (default ${ENV_ALLOW_DENSE} or the config's allow_dense, "
                        "else true)")
    g.add_argument("--prescore-protect-metrics", action=argparse.BooleanOptionalAction, default=None,
                   help=f"with --api-key, /metrics needs the key too (default ${ENV_PROTECT_METRICS} or false)")


FLAG_ENV = {"prescore_default_budget": "PRESCORE_DEFAULT_BUDGET", "prescore_min_budget": "PRESCORE_MIN_BUDGET",
            "prescore_max_budget": "PRESCORE_MAX_BUDGET", "prescore_max_attended": "PRESCORE_MAX_ATTENDED",
            "prescore_allow_dense": "PRESCORE_ALLOW_DENSE", "prescore_protect_metrics": ENV_PROTECT_METRICS}


def policy_env(args, environ=None) -> dict[str, str]:
    """The environment prescore-serve hands its engine: the flags given as ``PRESCORE_*`` variables and
    ``PRESCORE_CONFIG`` merged with ``--additional-config``'s ``prescore`` object (so the policy is the same
    in every process). Raises ValueError if the policy or the defaults are invalid."""
    from prescore.backend.params import ENV_CONFIG, _config_dict, load_defaults

    environ = dict(os.environ if environ is None else environ)
    out = {}
    for attr, var in FLAG_ENV.items():
        v = getattr(args, attr, None)
        if v is not None:
            out[var] = ("1" if v else "0") if isinstance(v, bool) else str(v)
    extra = getattr(args, "additional_config", None) or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    merged = _config_dict(environ.get(ENV_CONFIG), ENV_CONFIG)
    merged.update(_config_dict(extra.get("prescore"), "additional_config.prescore"))
    if merged:
        out[ENV_CONFIG] = json.dumps(merged)
    load_defaults(extra, env={**environ, **out})
    return out


def build_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="prescore-serve",
                                    description="vLLM's OpenAI-compatible server with prescore sparse decode.")
    sub = parser.add_subparsers(dest="subparser", required=True)
    cmd = ServeSubcommand()
    serve = cmd.subparser_init(sub)
    serve.set_defaults(dispatch_function=cmd.cmd)
    serve.usage = "prescore-serve [model_tag] [options]"
    serve.description = (
        "vLLM's OpenAI-compatible server with prescore: --attention-backend prescore, --host 127.0.0.1 and the "
        "prescore request layer by default; without a model, the embedded SmolLM2-135M-Instruct.\n\n"
        "Every `vllm serve` flag works. Search by using: `--help=<ConfigGroup>` (e.g. --help=prescore for the "
        "budget limits, --help=Frontend, --help=ModelConfig); `--help=all` shows every flag.")
    add_prescore_args(serve)
    return parser, cmd


def prepare(argv: list[str]):
    """Parsed vLLM serve args with prescore's defaults applied, and the environment set. No engine yet."""
    argv = list(argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    if not _has(argv, "--attention-backend"):
        argv += ["--attention-backend", "prescore"]
    if not _has(argv, "--host"):
        argv += ["--host", "127.0.0.1"]
    argv += ["--middleware", MIDDLEWARE]
    parser, cmd = build_parser()
    args = parser.parse_args(["serve", *argv])
    if args.model_tag is None and not _has(argv, "--model") and not _has(argv, "--config"):
        from prescore.models import smollm2_dir

        args.model_tag = str(smollm2_dir())
    try:
        env = policy_env(args)
    except ValueError as e:
        parser.error(str(e))
    os.environ.update(env)
    if not os.environ.get("PRESCORE_METRICS_DIR"):
        d = tempfile.mkdtemp(prefix="prescore-metrics-")
        os.environ["PRESCORE_METRICS_DIR"] = d
        atexit.register(shutil.rmtree, d, True)
    return args, cmd


def main(argv: list[str] | None = None) -> None:
    try:  # vLLM 0.32
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    except ImportError:  # vLLM 0.33
        from vllm.entrypoints.common.startup import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args, cmd = prepare(sys.argv[1:] if argv is None else argv)
    configure_logging_from_args(args)
    cmd.validate(args)
    cmd.cmd(args)


if __name__ == "__main__":
    main()
