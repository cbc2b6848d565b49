"""``prescore-serve [MODEL] [vLLM serve args...]``: vLLM's own ``vllm serve`` with prescore switched on.

Same parser, same server, same engine as ``vllm serve`` (every vLLM flag works), plus:

- ``--attention-backend prescore`` unless another backend is given;
- ``--host 127.0.0.1`` unless ``--host`` is given (vLLM binds every interface by default);
- ``--middleware prescore.server.middleware.PrescoreMiddleware``: ``key_budget`` / ``prescore`` request
  fields, budget limits, ``x-prescore-budget`` header, prescore counters on ``/metrics``;
- budget flags ``--prescore-default-budget``, ``--prescore-min-budget``, ``--prescore-max-budget``,
  ``--prescore-allow-dense`` / ``--no-prescore-allow-dense`` (defaults from ``PRESCORE_DEFAULT_BUDGET``,
  ``PRESCORE_MIN_BUDGET``, ``PRESCORE_MAX_BUDGET``, ``PRESCORE_ALLOW_DENSE``);
- ``PRESCORE_METRICS_DIR`` set to a fresh temporary folder unless already set (the engine's workers write
  their counters there; the API server reads them at scrape time);
- no MODEL: the embedded SmolLM2-135M-Instruct (``prescore.models.smollm2_dir()``).

Other backend defaults (method, mode, sink, window) come from ``PRESCORE_CONFIG`` or
``--additional-config '{"prescore": {...}}'`` as for the backend itself.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile

MIDDLEWARE = "prescore.server.middleware.PrescoreMiddleware"


def _has(argv: list[str], flag: str) -> bool:
    alt = flag.replace("-", "_")
    return any(a in (flag, alt) or a.startswith(flag + "=") or a.startswith(alt + "=") for a in argv)


def _env_int(name: str):
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else None


def add_prescore_args(parser) -> None:
    from .schema import ENV_ALLOW_DENSE, ENV_DEFAULT, ENV_MAX, ENV_MIN

    g = parser.add_argument_group("prescore", "Per-request key budget limits (prescore-serve).")
    g.add_argument("--prescore-default-budget", type=int, default=_env_int(ENV_DEFAULT), metavar="TOKENS",
                   help=f"budget of requests that send none (0 = dense); default ${ENV_DEFAULT} or the "
                        "backend's default (PRESCORE_CONFIG / --additional-config, built-in 2048)")
    g.add_argument("--prescore-min-budget", type=int, default=_env_int(ENV_MIN) or 0, metavar="TOKENS",
                   help=f"smallest sparse budget a request may ask for (default ${ENV_MIN} or 0)")
    g.add_argument("--prescore-max-budget", type=int, default=_env_int(ENV_MAX), metavar="TOKENS",
                   help=f"largest sparse budget a request may ask for (default ${ENV_MAX} or 16777216)")
    dense = os.environ.get(ENV_ALLOW_DENSE, "1").strip().lower() not in ("0", "false", "no", "off")
    g.add_argument("--prescore-allow-dense", action=argparse.BooleanOptionalAction, default=dense,
                   help=f"accept key_budget 0 (dense attention) (default ${ENV_ALLOW_DENSE} or true)")


def limits_from_args(args):
    from prescore.backend.params import MAX_TOKENS, load_defaults

    from .schema import BudgetLimits

    lim = BudgetLimits(default=args.prescore_default_budget, min=args.prescore_min_budget,
                       max=MAX_TOKENS if args.prescore_max_budget is None else args.prescore_max_budget,
                       allow_dense=args.prescore_allow_dense)
    lim.check_startup()
    extra = getattr(args, "additional_config", None) or {}
    default = lim.default if lim.default is not None else load_defaults(extra).budget
    why = lim.violation(default)
    if why:
        raise ValueError(f"prescore: the default budget {why}")
    return lim


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
        limits = limits_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    os.environ.update(limits.to_env())
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
