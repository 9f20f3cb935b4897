"""`pdserve restart NAME`: restart one instance (``decode-0``) without losing requests.

The controller drains the instance in the proxy (nothing new is routed there), waits
until its in-flight requests have finished and, for a prefill instance, until decode
instances have pulled the KV blocks it holds (both bounded by
``controller.drain_timeout_s``), stops its vLLM worker and starts it again on the same
ports, waits until it is ready and puts it back in rotation. Requests still in flight
when the drain times out are moved by the proxy when the worker stops (a decode leg
that fails before its first byte is retried elsewhere, a broken stream continues on
another decode instance).
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from deploy.cli import CliError
from deploy.cluster_state import add_state_dir_argument, reach_controller
from deploy.scale_cli import ray_error_message

# Instance names as the controller makes them (deploy.controller.Controller._plan).
_NAME = re.compile(r"(prefill|decode)-[0-9]+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the instance, as `pdserve status` names it")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="seconds to wait for the restart (default 1200: drain, stop, engine start)",
    )
    add_state_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    if not _NAME.fullmatch(args.name):
        raise CliError(
            f"NAME must be an instance name like prefill-0 or decode-1, got {args.name!r}"
        )
    if args.timeout <= 0:
        raise CliError(f"--timeout: must be > 0, got {args.timeout:g}")
    import ray  # after the checks above: a mistake is reported without waiting for it

    try:
        _state, controller = reach_controller(args.state_dir, "restart")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    started = time.monotonic()
    try:
        result = ray.get(controller.restart.remote(args.name), timeout=args.timeout)
    except ray.exceptions.GetTimeoutError:
        raise CliError(
            f"{args.name} was not back within {args.timeout:.0f} s; the controller carries on "
            "with the restart (see `pdserve status`)"
        ) from None
    except ray.exceptions.RayError as exc:
        raise CliError(ray_error_message(exc)) from None
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(summary(result, time.monotonic() - started), flush=True)
    return 0


def summary(result: dict[str, Any], seconds: float) -> str:
    """The one line printed on success."""
    drained = f"drained in {result['drain_seconds']:.1f} s"
    if result["drain_timed_out"]:
        left = [f"{result['in_flight_at_stop']} request(s) in flight"]
        if result["kv_blocks_at_stop"]:
            left.append(f"{result['kv_blocks_at_stop']} KV block(s) held")
        drained = f"drain timed out with {' and '.join(left)}: the proxy moved them"
    if not result["undrained"]:
        rotation = "could not be put back in rotation (see the controller's log)"
    elif result["readmitted"]:
        rotation = "back in rotation"
    else:
        rotation = "back in rotation, not yet healthy in the proxy"
    return (
        f"pdserve restart: {result['name']} restarted on {result['url']} in {seconds:.1f} s "
        f"({drained}; {rotation})"
    )
