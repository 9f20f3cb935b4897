"""The ``pdserve`` command line.

Each subcommand lives with the package that owns it and is imported only when
used, so ``pdserve proxy`` never pays for importing vLLM, torch or Ray. A
subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("proxy.cli", "run the OpenAI-compatible PD proxy"),
    "worker": ("deploy.worker_cli", "run one prefill or decode vLLM worker"),
    "make-tiny-model": ("deploy.tiny_model", "write a tiny random-weight Llama and its tokenizer"),
    "up": ("deploy.up_cli", "start an xPyD cluster on Ray (local by default)"),
    "down": ("deploy.down_cli", "stop the cluster started by `pdserve up`"),
    "status": ("deploy.status_cli", "show the instances of a running cluster"),
    "scale": ("deploy.scale_cli", "change the prefill/decode pool sizes at run time"),
    "restart": ("deploy.restart_cli", "restart one instance without losing requests"),
    "bench": ("benchmarks.cli", "run a benchmark (prints a table, writes JSON)"),
    "plan": ("benchmarks.planner.cli", "profile a model, simulate a fleet, recommend a P:D split"),
}


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


def add_removed_secret_flag(
    parser: argparse.ArgumentParser, flag: str, env_var: str, file_flag: str
) -> None:
    """``flag`` took a secret on the command line (ps, shell history): it is refused with
    the way out, and it stops argparse taking ``flag`` as an abbreviation of ``file_flag``."""
    message = (
        f"{flag} was removed (a secret in argv shows in ps and shell history): "
        f"set ${env_var} or pass {file_flag} FILE (mode 0600)"
    )

    class _Removed(argparse.Action):
        def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: object,
            option_string: str | None = None,
        ) -> None:
            parser.error(message)

    parser.add_argument(flag, nargs="?", action=_Removed, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        # Subcommand modules keep heavy imports (vllm, torch, ray) inside run(),
        # so importing all of them to build the parser stays cheap.
        importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except CliError as exc:
        print(f"pdserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: subcommands raise deploy.cli.CliError,
    # which would otherwise be a different class from the one main() catches here.
    from deploy.cli import main as _main

    sys.exit(_main())
