"""`pdserve down`: stop the cluster `pdserve up` started, leaving no process behind.

A foreground `up` is asked to stop (SIGTERM) and does its own teardown, Ray included
when it started Ray. A detached deployment on a shared Ray cluster is torn down from
here through its controller; the Ray cluster itself is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time

from deploy.cli import CliError
from deploy.cluster_state import (
    ClusterState,
    add_state_dir_argument,
    clear_state,
    connect,
    get_controller,
    kill_recorded_workers,
    pid_alive,
    read_state,
    state_dir,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_state_dir_argument(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the teardown (default 300)",
    )


def run(args: argparse.Namespace) -> int:
    directory = state_dir(args.state_dir)
    try:
        state = read_state(directory)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if state is None:
        raise CliError(f"no running cluster recorded in {directory}")
    if state.foreground and pid_alive(state.up_pid):
        _stop_foreground(state, args.timeout)
    else:
        _stop_through_controller(state, args.timeout)
        kill_recorded_workers(directory)
    clear_state(directory)
    print("pdserve down: stopped", flush=True)
    return 0


def _stop_foreground(state: ClusterState, timeout_s: float) -> None:
    os.kill(state.up_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pid_alive(state.up_pid):
        if time.monotonic() > deadline:
            raise CliError(
                f"`pdserve up` (pid {state.up_pid}) did not stop within {timeout_s:.0f} s"
            )
        time.sleep(0.2)
        _reap(state.up_pid)


def _reap(pid: int) -> None:
    # `up` may be our child (tests); a zombie would look alive forever.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stop_through_controller(state: ClusterState, timeout_s: float) -> None:
    import ray

    try:
        connect(state)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if state.started_ray:
            return  # the local cluster died with its `up`; nothing is left to stop there
        raise CliError(f"cannot reach Ray at {state.ray_address}: {exc}") from None
    try:
        controller = get_controller(state)
    except ValueError:
        ray.shutdown()
        return
    try:
        ray.get(controller.shutdown.remote(), timeout=timeout_s)
    except ray.exceptions.RayError as exc:
        print(f"pdserve down: controller shutdown failed ({exc.__class__.__name__}); killing it")
    ray.kill(controller, no_restart=True)
    ray.shutdown()
