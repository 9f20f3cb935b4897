"""`pdserve scale --prefill N --decode M`: resize the pools of a running cluster.

New instances are placed, started and registered with the proxy before any old one
is retired; a retired instance is drained first (no new requests; the controller
waits until its in-flight requests reach zero and, for a prefill instance, until decode
instances have pulled the KV blocks it holds, up to ``controller.drain_timeout_s``) and
then stopped.
"""

from __future__ import annotations

import argparse
import time

from deploy.cli import CliError
from deploy.cluster_state import add_state_dir_argument, reach_controller


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", type=int, default=None, metavar="N", help="prefill pool size")
    parser.add_argument("--decode", type=int, default=None, metavar="M", help="decode pool size")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the change (default 900)"
    )
    add_state_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    import ray

    if args.prefill is None and args.decode is None:
        raise CliError("give --prefill N and/or --decode M")
    for flag in ("prefill", "decode"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise CliError(f"--{flag}: must be >= 0, got {value}")
    try:
        _state, controller = reach_controller(args.state_dir, "scale")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    started = time.monotonic()
    try:
        result = ray.get(controller.scale.remote(args.prefill, args.decode), timeout=args.timeout)
    except ray.exceptions.GetTimeoutError:
        raise CliError(f"scaling did not finish within {args.timeout:.0f} s") from None
    except ray.exceptions.RayError as exc:
        raise CliError(ray_error_message(exc)) from None
    finally:
        ray.shutdown()
    added = ", ".join(result["added"]) or "none"
    removed = ", ".join(result["removed"]) or "none"
    print(
        f"pdserve scale: {result['prefill']} prefill + {result['decode']} decode "
        f"(added {added}; drained and removed {removed}) in {time.monotonic() - started:.1f} s",
        flush=True,
    )
    return 0


def ray_error_message(exc: BaseException) -> str:
    """The last line of the controller's own error (a ControllerError is meant for users)
    inside the RayError that carries it."""
    cause = getattr(exc, "cause", None)
    lines = str(cause if cause is not None else exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
