"""``pdserve bench NAME [options]``: run one benchmark module.

Each benchmark is a module of this package with its own ``add_arguments(parser)``
and ``run(args) -> int``. The module is imported only when its benchmark runs, so a
benchmark with heavy dependencies (vLLM, torch) costs nothing to the others and to
``pdserve --help``; ``pdserve bench NAME --help`` shows that benchmark's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from deploy.cli import CliError

# name -> (module, one-line help). Adding a benchmark is a module plus a line here.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "proxy": (
        "benchmarks.proxy_overhead",
        "added latency and CPU per request of the proxy, against fake workers",
    ),
    "kv": ("benchmarks.kv_transfer", "KV transfer throughput and latency"),
    "kv-link": (
        "benchmarks.kv_link",
        "KV pull throughput across a veth link between two network namespaces vs loopback",
    ),
    "pd": (
        "benchmarks.pd_vs_aggregated",
        "goodput under SLOs: 1P1D vs 2 aggregated engines on the same cores (vllm bench serve)",
    ),
    "faults": ("benchmarks.faults", "one fault at a time under load on a 2P2D `pdserve up`"),
    "routing": (
        "benchmarks.routing",
        "cache-aware routing (kv_cache, prefix_affinity, least_load) on shared prefixes, 2P2D "
        "and aggregated",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    listing = "\n".join(f"  {name:<8} {help_text}" for name, (_, help_text) in BENCHMARKS.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = f"benchmarks:\n{listing}\n\n`pdserve bench NAME --help` lists NAME's options."
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="NAME", help="benchmark")
    # Everything after NAME belongs to the benchmark's own parser, built in run().
    parser.add_argument("benchmark_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    name: str = args.benchmark
    module_name, help_text = BENCHMARKS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise CliError(f"benchmark {name!r} is unavailable: no module {module_name}") from None
        raise CliError(f"benchmark {name!r} cannot start: {exc}") from None
    parser = argparse.ArgumentParser(prog=f"pdserve bench {name}", description=help_text)
    module.add_arguments(parser)
    bench_args = parser.parse_args(args.benchmark_args)
    return int(module.run(bench_args) or 0)


def standalone(module: ModuleType, argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.NAME``: the benchmark's own options and run, with the answers
    ``pdserve`` gives: bad input is one line and exit 2, Ctrl-C exit 130."""
    module_name = module.__spec__.name if module.__spec__ else module.__name__
    name = module_name.rsplit(".", 1)[-1]
    doc = (module.__doc__ or "").strip()
    parser = argparse.ArgumentParser(
        prog=f"python -m {module_name}", description=doc.splitlines()[0] if doc else None
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except CliError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
