"""`pdserve up` serves from a child process that leads a session of its own.

A local Ray cluster's GCS and raylet are children of the process that calls ``ray.init``.
In the launching terminal's process group they would receive the signals meant for `up`
(a service manager or ``timeout`` stopping the group) at the same moment as `up`: Ray
died under the teardown, which then waited 60 s on a dead GCS and left its state behind.

So `up` forks once it has validated its input. The launcher stays in the foreground:
SIGINT, SIGTERM and SIGHUP become one SIGTERM to the serving child, which tears down in
order, and if the child dies without its teardown (SIGKILL, the OOM killer) the launcher
removes what it left. If the launcher is the one killed, the kernel sends the child
SIGTERM (``PR_SET_PDEATHSIG``) and it tears down as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from deploy.cluster_state import read_state_quietly, remove_leftovers

_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve_in_own_session(directory: Path) -> int | None:
    """Fork. In the child (which goes on to serve) return None; in the launcher wait for
    the child, clean up after it if it died without its teardown, and return the exit
    status `up` should report."""
    sys.stdout.flush()
    sys.stderr.flush()
    launcher = os.getpid()
    child = os.fork()
    if child == 0:
        os.setsid()
        _die_with(launcher)
        return None
    return _supervise(child, directory)


def _die_with(launcher: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != launcher:
        # The launcher died before the request took effect: nobody will signal us.
        os.kill(os.getpid(), signal.SIGTERM)


def _supervise(child: int, directory: Path) -> int:
    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        _, status = os.waitpid(child, 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = os.waitstatus_to_exitcode(status)
    state = read_state_quietly(directory)
    names_child = state is not None and state.up_pid == child
    if names_child and state is not None and not state.foreground:
        return code  # detached: the cluster runs on without `up`
    if code >= 0 and not names_child:
        return code  # the child finished its own teardown (or never started anything)
    if state is not None and names_child and not state.started_ray:
        print(
            f"pdserve up: the serving process (pid {child}) {_how(code)}; its deployment "
            f"still runs on Ray at {state.ray_address}: `pdserve down` stops it",
            file=sys.stderr,
            flush=True,
        )
        return 1
    stopped = remove_leftovers(directory, child)
    print(
        f"pdserve up: the serving process (pid {child}) {_how(code)}; "
        f"stopped the {stopped} process(es) it left",
        file=sys.stderr,
        flush=True,
    )
    return 1


def _how(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code} before its teardown"
