"""A Ray actor that supervises one vLLM worker process (one prefill or decode instance).

The actor owns exactly one process group started by :mod:`deploy.worker_launch`. When
that process dies the actor starts it again (with backoff) on the same ports, so the
instance URL never changes and the proxy re-admits it through its health checks. When
the actor itself dies, Ray restarts it (``max_restarts``); the new incarnation first
kills whatever the previous one left behind (recorded in a pid file), then starts a
fresh worker.

A planned restart (:meth:`InstanceSupervisor.restart_worker`, used by ``pdserve restart``
after the controller drained the instance) stops and starts the worker on the same ports
without the crash path's backoff, and counts it apart from crashes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

from deploy import worker_launch

logger = logging.getLogger(__name__)

# A worker that stayed up this long is considered healthy again: backoff resets.
_STABLE_AFTER_S = 60.0
_POLL_S = 0.5


@dataclass(slots=True)
class InstancePlan:
    """Everything one instance actor needs; picklable, built by the controller."""

    name: str  # "prefill-0"
    role: str  # "prefill" | "decode"
    index: int
    model: str
    host: str
    api_port: int
    kv_port: int | None
    cpu_core: int | None
    kv_cache_gib: int
    accelerator: str  # "cpu" | "gpu" | "npu"
    run_dir: str
    engine_id: str
    served_model_name: str | None = None
    # Reaches the worker through its environment (worker_launch.build_command); kept out of
    # repr so that no log or error message that shows a plan shows the secret.
    kv_secret: str = field(default="", repr=False)
    vllm_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 600.0
    restart_backoff_s: float = 1.0
    startup_niceness: int = 0
    restart_backoff_max_s: float = 30.0
    pin_process_tree: bool = False
    # vLLM's KV cache events (ZMQ PUB + replay ROUTER); the ports are the pool's range + index.
    kv_events: bool = True
    kv_events_port: int | None = None  # None: the role's default base + index
    kv_events_replay_port: int | None = None


def health_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def kill_process_group(pid: int) -> bool:
    """SIGKILL the worker's whole group: vLLM's engine-core children hold ports too. False
    when no such group runs."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class InstanceSupervisor:
    """Body of the instance actor (wrapped with ``ray.remote`` by the controller).

    Runs as a threaded actor: ``wait_ready`` blocks one thread while ``info`` answers
    on another; a daemon thread watches the worker process.
    """

    def __init__(self, plan: InstancePlan) -> None:
        self._plan = plan
        self._lock = threading.Lock()
        # Held by whichever thread stops or starts the worker process (the watcher after a
        # crash, restart_worker), so that the two never start a worker each. Taken before
        # ``_lock``, never while holding it.
        self._lifecycle = threading.Lock()
        self._proc: Popen[bytes] | None = None
        # Per worker group (by leader pid): kills it should this actor die without stopping it.
        self._lifelines: dict[int, worker_launch.GroupLifeline] = {}
        self._state = "starting"
        self._stopping = False
        self._restarts = 0  # after crashes
        self._planned_restarts = 0  # restart_worker
        # While restart_worker runs, the watcher neither reads the missing process as a
        # crash nor starts one itself.
        self._restarting_on_purpose = False
        # Without the right to lower it again, a niced start would leave the engine niced.
        self._startup_niceness = plan.startup_niceness if can_lower_niceness() else 0
        self._last_exit: int | None = None
        self._started_at = 0.0
        self._ready = threading.Event()
        self._error: str | None = None
        self._node_ip = _node_ip()
        self._pid_file = Path(plan.run_dir) / "pids" / f"{plan.name}.pid"
        self._apply_accelerator_env()
        _undo_worker_niceness()
        self._kill_leftover()
        self._start_worker()
        threading.Thread(target=self._watch, name=f"watch-{plan.name}", daemon=True).start()

    # -- public actor methods -------------------------------------------------------

    def url(self) -> str:
        host = self._node_ip if self._plan.host in ("0.0.0.0", "") else self._plan.host
        return f"http://{host}:{self._plan.api_port}"

    def wait_ready(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Block until the worker answers /health (after the current (re)start)."""
        limit = timeout_s or self._plan.ready_timeout_s
        deadline = time.monotonic() + limit
        while not self._ready.wait(_POLL_S):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self._plan.name}: worker not ready after {limit:.0f} s "
                    f"(state {self._state}, last exit {self._last_exit})"
                )
            if self._state == "stopped":
                raise RuntimeError(f"{self._plan.name}: stopped while starting")
            if self._state == "failed" and self._restarts == 0 and self._error:
                # A configuration problem (port taken, bad model): retrying will not help.
                raise RuntimeError(f"{self._plan.name}: {self._error}")
        return self.info()

    def info(self) -> dict[str, Any]:
        with self._lock:
            proc = self._proc
            return {
                "name": self._plan.name,
                "role": self._plan.role,
                "index": self._plan.index,
                "url": self.url(),
                "node_ip": self._node_ip,
                "pid": proc.pid if proc is not None else None,
                "state": self._state,
                "restarts": self._restarts,
                "planned_restarts": self._planned_restarts,
                "last_exit": self._last_exit,
                "error": self._error,
                "cpu_core": self._plan.cpu_core,
                "actor_pid": os.getpid(),
                "api_port": self._plan.api_port,
                "kv_port": self._plan.kv_port,
                # What the controller registers with the proxy, next to "url" (same host).
                "kv_events": self._advertised_kv_events(),
            }

    def _advertised_kv_events(self) -> dict[str, str | None] | None:
        spec = build_worker_spec(self._plan, self._node_ip, None)
        events = worker_launch.advertised_kv_events(spec)
        return None if events is None else events.to_json()

    def restart_worker(self) -> dict[str, Any]:
        """Planned restart: stop the worker's process group and start it again on the same
        ports. Returns once the new process runs; ``wait_ready`` then waits for its
        ``/health``. Not a crash: no backoff, ``restarts`` stays, ``planned_restarts``
        counts it. The caller drains the instance first; whatever is still in flight on
        it breaks here (the proxy moves it to another instance)."""
        with self._lifecycle:
            with self._lock:
                if self._stopping:
                    raise RuntimeError(f"{self._plan.name}: stopped; cannot restart it")
                proc, self._proc = self._proc, None
                self._state = "restarting"
                self._ready.clear()
                self._planned_restarts += 1
                self._restarting_on_purpose = True
            try:
                if proc is not None:
                    worker_launch.stop_worker(proc)
                    self._end_group(proc.pid)
                    logger.info(
                        "%s: planned restart: worker pid %d stopped", self._plan.name, proc.pid
                    )
                self._wait_ports_free()
                self._start_worker()
            finally:
                with self._lock:
                    self._restarting_on_purpose = False
        return self.info()

    def stop(self) -> None:
        """Stop the worker for good (the actor is killed by the controller afterwards)."""
        with self._lock:
            self._stopping = True
            self._state = "stopped"
            proc = self._proc
        if proc is not None:
            worker_launch.stop_worker(proc)
            self._end_group(proc.pid)
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()

    # -- internals ------------------------------------------------------------------

    def _apply_accelerator_env(self) -> None:
        # Ray assigned this actor its devices; the worker must see exactly those.
        self._visible_devices: str | None = None
        if self._plan.accelerator == "cpu":
            return
        import ray

        kind = "NPU" if self._plan.accelerator == "npu" else "GPU"
        ids = ray.get_runtime_context().get_accelerator_ids().get(kind, [])
        self._visible_devices = ",".join(str(i) for i in ids)

    def _end_group(self, pid: int) -> None:
        """Make sure the worker group led by ``pid`` is gone, and disarm its lifeline."""
        kill_process_group(pid)
        lifeline = self._lifelines.pop(pid, None)
        if lifeline is not None:
            lifeline.release()

    def _kill_leftover(self) -> None:
        """A previous incarnation of this actor may have died with its worker running."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        kill_process_group(pid)
        self._wait_ports_free()

    def _wait_ports_free(self, timeout_s: float = 15.0) -> None:
        # The ports are released once the old group is gone; a start before that fails.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._ports_free():
            time.sleep(0.2)

    def _ports_free(self) -> bool:
        spec = build_worker_spec(self._plan, self._node_ip, None)
        ports = [port for _, port in worker_launch.listening_ports(spec)]
        return all(worker_launch.port_is_free(self._plan.host, port) for port in ports)

    def _start_worker(self) -> bool:
        """Start the worker process; False (and the reason in ``info``) if it cannot start."""
        spec = build_worker_spec(self._plan, self._node_ip, self._visible_devices)
        log_path = Path(self._plan.run_dir) / "logs" / f"{self._plan.name}.log"
        try:
            proc = worker_launch.start_worker(spec, log_path=log_path)
        except (OSError, ValueError) as exc:
            with self._lock:
                self._error = str(exc)
                self._state = "failed" if not self._stopping else self._state
            logger.error("%s: cannot start worker: %s", self._plan.name, exc)
            return False
        try:
            self._lifelines[proc.pid] = worker_launch.GroupLifeline(proc.pid)
        except OSError as exc:
            # The worker still runs; only the sweep after an abrupt death of this actor is
            # lost (the next incarnation's pid-file sweep remains).
            logger.warning("%s: no lifeline for worker pid %d: %s", self._plan.name, proc.pid, exc)
        if self._startup_niceness:
            set_group_niceness(proc.pid, self._startup_niceness, self._plan.name)
        self._pid_file.parent.mkdir(parents=True, exist_ok=True)
        self._pid_file.write_text(str(proc.pid))
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._proc = proc
                self._error = None
                self._started_at = time.monotonic()
                self._ready.clear()
                self._state = "starting"
        if stopping:
            # stop() ran while this process started, before it was ours to see: end it here.
            worker_launch.stop_worker(proc)
            self._end_group(proc.pid)
            with contextlib.suppress(FileNotFoundError):
                self._pid_file.unlink()
            return False
        logger.info("%s: worker pid %d started on %s", self._plan.name, proc.pid, self.url())
        return True

    def _watch(self) -> None:
        backoff = self._plan.restart_backoff_s
        while True:
            time.sleep(_POLL_S)
            with self._lock:
                if self._stopping:
                    return
                if self._restarting_on_purpose:
                    continue
                proc = self._proc
                state = self._state
            if proc is not None:
                code = proc.poll()
                if code is None:
                    if state == "starting" and health_ok(self.url()):
                        with self._lock:
                            # Not a process a planned restart replaced meanwhile.
                            if not self._stopping and self._proc is proc:
                                self._state = "ready"
                                self._ready.set()
                        if self._startup_niceness:
                            set_group_niceness(proc.pid, 0, self._plan.name)
                    continue
                with self._lifecycle, self._lock:
                    if self._stopping:
                        return
                    if self._proc is not proc:
                        continue  # restart_worker stopped it on purpose and started another
                    # The worker died: clear its group, then start it again on the same ports.
                    self._proc = None
                    self._state = "restarting"
                    self._last_exit = code
                    self._restarts += 1
                self._end_group(proc.pid)
                lived = time.monotonic() - self._started_at
                if lived > _STABLE_AFTER_S:
                    backoff = self._plan.restart_backoff_s
                logger.warning(
                    "%s: worker exited with %s after %.0f s; restarting in %.1f s",
                    self._plan.name,
                    code,
                    lived,
                    backoff,
                )
            # No process (it died, or could not start): wait out the backoff and retry.
            time.sleep(backoff)
            backoff = min(backoff * 2, self._plan.restart_backoff_max_s)
            with self._lifecycle:
                with self._lock:
                    if self._stopping:
                        return
                    if self._proc is not None:
                        continue  # a planned restart started one during the backoff
                self._wait_ports_free()
                self._start_worker()


def build_worker_spec(plan: InstancePlan, node_ip: str, visible_devices: str | None) -> Any:
    """The :class:`deploy.worker_launch.WorkerSpec` for ``plan`` on this node."""
    device = {"cpu": "cpu", "gpu": "cuda", "npu": "npu"}[plan.accelerator]
    return worker_launch.WorkerSpec(
        role=plan.role,  # type: ignore[arg-type]
        model=Path(plan.model),
        api_port=plan.api_port,
        kv_port=plan.kv_port,
        index=plan.index,
        host=plan.host,
        cpu_core=plan.cpu_core,
        kv_cache_gib=plan.kv_cache_gib,
        engine_id=plan.engine_id,
        secret=plan.kv_secret,
        served_model_name=plan.served_model_name,
        # Decode instances on other nodes dial the KV server at the node's address.
        advertise_host=node_ip if plan.host in ("0.0.0.0", "") else None,
        device=device,  # type: ignore[arg-type]
        visible_devices=visible_devices,
        pin_process_tree=plan.pin_process_tree,
        kv_events=plan.kv_events,
        kv_events_port=plan.kv_events_port,
        kv_events_replay_port=plan.kv_events_replay_port,
        extra_args=tuple(plan.vllm_args),
        env=dict(plan.env),
    )


def set_group_niceness(pgid: int, niceness: int, name: str) -> bool:
    """Set every process of the worker's group to ``niceness``; False (logged) if not allowed.

    Raising it is always allowed; lowering it back needs root (CAP_SYS_NICE), so a plan
    asks for a startup niceness only where :func:`can_lower_niceness` holds. Processes the
    worker forks later inherit the niceness of their parent."""
    try:
        os.setpriority(os.PRIO_PGRP, pgid, niceness)
    except ProcessLookupError:
        return False  # the worker is gone; its supervisor sees that on its own
    except PermissionError as exc:
        logger.warning("%s: cannot set the worker's niceness to %d: %s", name, niceness, exc)
        return False
    return True


def can_lower_niceness() -> bool:
    """Whether this process may lower a niceness it raised (root, or CAP_SYS_NICE)."""
    return os.geteuid() == 0


def _undo_worker_niceness() -> None:
    """Ray may start workers niced (``RAY_worker_niceness``, 15 by default); an engine
    inheriting that starves next to any busy process. Lowering needs privileges; without
    them the cluster should be started with ``RAY_worker_niceness=0``."""
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)


def _node_ip() -> str:
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # outside Ray (unit tests)
        return "127.0.0.1"
