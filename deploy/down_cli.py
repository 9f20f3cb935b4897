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
from pathlib import Path

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
    remove_leftovers,
    state_dir,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_state_dir_argument(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the teardown before killing what is left (default 60)",
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
        outcome = _stop_foreground(state, directory, args.timeout)
        clear_state(directory)
        print(f"pdserve down: {outcome}", flush=True)
        return 0
    if state.started_ray:
        # `up` died without its teardown, and its local Ray cluster with it.
        stopped = remove_leftovers(directory, state.up_pid)
        print(
            f"pdserve down: `pdserve up` (pid {state.up_pid}) had exited; "
            f"stopped the {stopped} process(es) it left",
            flush=True,
        )
        return 0
    _stop_through_controller(state, args.timeout)
    kill_recorded_workers(directory)
    clear_state(directory)
    print("pdserve down: stopped", flush=True)
    return 0


def _stop_foreground(state: ClusterState, directory: Path, timeout_s: float) -> str:
    """SIGTERM the serving `up`, which tears down itself; kill it if it has not after
    ``timeout_s`` and remove what it left."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.up_pid, signal.SIGTERM)
    if _wait_gone(state.up_pid, timeout_s):
        return "stopped"
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.up_pid, signal.SIGKILL)
    _wait_gone(state.up_pid, 5.0)
    how = f"`pdserve up` (pid {state.up_pid}) did not stop within {timeout_s:.0f} s; killed it"
    if state.started_ray:
        return f"{how} and the {remove_leftovers(directory, state.up_pid)} process(es) it left"
    _stop_through_controller(state, timeout_s)
    kill_recorded_workers(directory)
    return f"{how} and stopped its deployment through the controller"


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
        _reap(pid)
    return True


def _reap(pid: int) -> None:
    # `up` may be our child (tests); a zombie would look alive forever.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stop_through_controller(state: ClusterState, timeout_s: float) -> None:
    import ray

    try:
        connect(state, "down")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CliError(
            f"cannot reach Ray at {state.ray_address}: {exc}; the deployment's state stays "
            f"in {state.run_dir} for a later `pdserve down`"
        ) from None
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
