"""Where a running `pdserve up` leaves the facts `down`, `status` and `scale` need.

One JSON file per state directory (default ``~/.cache/pdserve/run``, or
``$PDSERVE_STATE_DIR``, or ``--state-dir``): the Ray address and namespace, whether
``up`` started Ray itself, its pid, and the proxy's URLs. It may hold the admin token,
so it is written 0600. Next to it, ``kv_secret`` (0600) holds the KV-transfer secret that
``up`` generated for the cluster when the topology configured none; it goes when the state
does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("~/.cache/pdserve/run")
STATE_FILE = "cluster.json"
KV_SECRET_FILE = "kv_secret"
# `down`, `status` and `scale` answer within seconds even when the cluster is gone or hung.
CONNECT_TIMEOUT_S = 7.0


@dataclass(slots=True)
class ClusterState:
    ray_address: str
    namespace: str
    auth_mode: str  # RAY_AUTH_MODE the cluster runs with ("token" or "disabled")
    started_ray: bool  # True: `up` owns a local Ray cluster and stops it on exit
    up_pid: int
    foreground: bool  # `up` stays attached; `down` signals it instead of tearing down itself
    api_url: str
    metrics_url: str
    admin_url: str
    admin_token: str | None
    run_dir: str
    temp_dir: str | None = None


def add_state_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=None,
        help="where `pdserve up` records the running cluster "
        f"(default $PDSERVE_STATE_DIR or {DEFAULT_STATE_DIR})",
    )


def state_dir(value: str | None) -> Path:
    raw = value or os.environ.get("PDSERVE_STATE_DIR") or str(DEFAULT_STATE_DIR)
    return Path(raw).expanduser().resolve()


def write_state(directory: Path, state: ClusterState) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(state), handle, indent=2)
    os.replace(tmp, path)


def write_secret_file(directory: Path, secret: str) -> Path:
    """Store ``secret`` as ``directory/kv_secret``, readable by this user only (0600)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / KV_SECRET_FILE
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # O_EXCL below: never reuse a file someone else made
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(secret + "\n")
    os.replace(tmp, path)
    return path


def read_state(directory: Path) -> ClusterState | None:
    try:
        data: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
        return ClusterState(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"state file {directory / STATE_FILE} is unreadable: {exc}") from None


def clear_state(directory: Path) -> None:
    for name in (STATE_FILE, KV_SECRET_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; an exited process its parent has not reaped yet (a zombie)
    counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    # Field 3, after the parenthesised command name (which may itself contain spaces).
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def kill_recorded_workers(directory: Path) -> int:
    """Last resort: worker process groups whose actor died without stopping them. Returns
    how many were still running."""
    from deploy.instance_actor import kill_process_group

    pid_dir = directory / "pids"
    if not pid_dir.is_dir():
        return 0
    killed = 0
    for pid_file in pid_dir.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            killed += kill_process_group(int(pid_file.read_text().strip()))
        pid_file.unlink(missing_ok=True)
    return killed


def session_members(session_id: int) -> list[int]:
    """Live processes of session ``session_id`` (other than this one)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if os.getsid(int(entry)) == session_id and pid_alive(int(entry)):
                members.append(int(entry))
    return members


def remove_leftovers(directory: Path, up_pid: int, grace_s: float = 3.0) -> int:
    """After the serving `pdserve up` (pid ``up_pid``, leader of its own session, see
    :mod:`deploy.up_session`) died without its teardown: stop the processes it left (its
    session: the local Ray cluster and its actors; the recorded vLLM workers, which run in
    sessions of their own) and drop its state. Returns how many processes were stopped.

    Only for a cluster whose Ray ``up`` started: a joined cluster's instances belong to its
    controller, which outlives ``up`` (`pdserve down` stops them through it).
    """
    deadline = time.monotonic() + grace_s
    # Ray's processes die with their driver on their own (kernel fate-sharing); give them
    # the moment that takes before making sure.
    while session_members(up_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = 0
    for pid in session_members(up_pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            stopped += 1
    stopped += kill_recorded_workers(directory)
    state = read_state_quietly(directory)
    if state is None or state.up_pid == up_pid:
        clear_state(directory)
    return stopped


def read_state_quietly(directory: Path) -> ClusterState | None:
    with contextlib.suppress(ValueError):
        return read_state(directory)
    return None


def require_running(directory: Path) -> ClusterState:
    """The recorded cluster, or a one-line error when there is none (or it died)."""
    state = read_state(directory)
    if state is None:
        raise ValueError(f"no running cluster recorded in {directory}")
    if state.started_ray and not pid_alive(state.up_pid):
        # The local Ray cluster shares the fate of its `pdserve up`. Its state stays for
        # `down`, which removes what the dead `up` left.
        raise ValueError(
            f"the cluster's `pdserve up` (pid {state.up_pid}) has exited and its local Ray "
            "cluster with it; run `pdserve down` to remove what it left"
        )
    return state


def connect(state: ClusterState, command: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Attach this process to the cluster as a Ray driver (token auth included).

    Raises ConnectionError at once when nothing listens at the GCS address (Ray itself
    would retry a dead GCS for minutes), and ends the process with a one-line error if
    Ray has not connected after ``timeout_s`` (a GCS that accepts but never answers).

    Ray reads the token itself (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``), but only looks for one when ``RAY_AUTH_MODE=token``.
    """
    _probe_gcs(state.ray_address)
    if state.auth_mode == "token" and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray" in sys.modules:
            # Ray caches its config at import; re-read it so token mode takes effect.
            from ray._raylet import Config  # type: ignore[attr-defined]

            Config.initialize("")
    import ray

    # Ray's core logs each failed attempt to reach the GCS to stderr (not configurable before
    # its logging starts); a command that answers in one line keeps them off the terminal.
    terminal = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    # ray.init waits inside Ray's core, where no Python exception can reach it.
    watchdog = threading.Timer(
        timeout_s, _give_up, args=(terminal, command, state.ray_address, timeout_s)
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(
            address=state.ray_address,
            namespace=state.namespace,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    finally:
        watchdog.cancel()
        os.dup2(terminal, 2)
        os.close(terminal)


def _probe_gcs(address: str, timeout_s: float = 3.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except ValueError:
        raise ConnectionError(f"the recorded Ray address {address!r} is not host:port") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConnectionError(f"nothing answers at Ray's GCS {address} ({reason})") from None


def _give_up(terminal: int, command: str, address: str, timeout_s: float) -> None:
    line = f"pdserve {command}: Ray at {address} accepted but did not answer in {timeout_s:.0f} s"
    os.write(terminal, (line + "\n").encode())
    os._exit(2)


def get_controller(state: ClusterState) -> Any:
    import ray

    from deploy.controller import CONTROLLER_NAME

    return ray.get_actor(CONTROLLER_NAME, namespace=state.namespace)


def reach_controller(state_dir_value: str | None, command: str) -> tuple[ClusterState, Any]:
    """The running cluster's state and its controller's handle, Ray connected for ``command``.

    Raises ValueError with one line for a user: no running cluster, or no controller."""
    state = require_running(state_dir(state_dir_value))
    try:
        connect(state, command)
        return state, get_controller(state)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot reach the cluster's controller: {exc}") from None
