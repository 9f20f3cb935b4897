"""InstanceSupervisor's restart loop, outside Ray, with a tiny HTTP process as the worker.

The real thing (a vLLM worker under a Ray actor) is covered by test_ray_cluster.py; this
checks the supervision logic in a second: restart on death, same port, stop leaves nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deploy import worker_launch
from deploy.instance_actor import InstancePlan, InstanceSupervisor, health_ok
from deploy.worker_launch import free_port

FAKE_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture
def fake_worker(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    specs: list[Any] = []

    def start_worker(spec: Any, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        specs.append(spec)
        return subprocess.Popen(
            [sys.executable, "-c", FAKE_SERVER, str(spec.api_port)], start_new_session=True
        )

    monkeypatch.setattr(worker_launch, "start_worker", start_worker)
    return specs


def _plan(tmp_path: Path) -> InstancePlan:
    return InstancePlan(
        name="prefill-0",
        role="prefill",
        index=0,
        model=str(tmp_path),
        host="127.0.0.1",
        api_port=free_port(),
        kv_port=free_port(),
        cpu_core=1,
        kv_cache_gib=1,
        accelerator="cpu",
        run_dir=str(tmp_path),
        engine_id="pdserve-prefill-0",
        vllm_args=["--max-model-len", "256"],
        restart_backoff_s=0.1,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); waitpid tells.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def test_restarts_dead_worker_and_stops_cleanly(tmp_path: Path, fake_worker: list[Any]) -> None:
    plan = _plan(tmp_path)
    supervisor = InstanceSupervisor(plan)
    info = supervisor.wait_ready(timeout_s=30)
    assert info["state"] == "ready" and info["restarts"] == 0
    assert info["url"] == f"http://127.0.0.1:{plan.api_port}"
    spec = fake_worker[0]
    assert (spec.role, spec.api_port, spec.kv_port, spec.cpu_core) == (
        "prefill",
        plan.api_port,
        plan.kv_port,
        1,
    )
    assert spec.device == "cpu" and spec.extra_args == ("--max-model-len", "256")
    first_pid = info["pid"]
    assert int((tmp_path / "pids" / "prefill-0.pid").read_text()) == first_pid

    os.kill(first_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = supervisor.info()
        if info["restarts"] == 1 and info["state"] == "ready":
            break
        time.sleep(0.1)
    assert info["restarts"] == 1 and info["state"] == "ready", info
    assert info["pid"] != first_pid and info["last_exit"] == -signal.SIGKILL
    assert health_ok(info["url"])

    supervisor.stop()
    assert supervisor.info()["state"] == "stopped"
    assert not _alive(info["pid"])
    assert not (tmp_path / "pids" / "prefill-0.pid").exists()
    time.sleep(1.0)  # the watcher must not start it again
    assert len(fake_worker) == 2


def test_new_incarnation_kills_what_the_previous_left(
    tmp_path: Path, fake_worker: list[Any]
) -> None:
    plan = _plan(tmp_path)
    orphan = subprocess.Popen(
        [sys.executable, "-c", FAKE_SERVER, str(plan.api_port)], start_new_session=True
    )
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "prefill-0.pid").write_text(str(orphan.pid))
    supervisor = InstanceSupervisor(plan)  # as after Ray restarted a crashed actor
    try:
        assert orphan.wait(timeout=15) == -signal.SIGKILL
        info = supervisor.wait_ready(timeout_s=30)
        assert info["pid"] != orphan.pid
    finally:
        supervisor.stop()


def test_planned_restart_is_not_a_crash(tmp_path: Path, fake_worker: list[Any]) -> None:
    """restart_worker (`pdserve restart`): a new process on the same port, at once (no
    backoff), counted apart from crashes; the watcher starts no second one."""
    plan = _plan(tmp_path)
    plan.restart_backoff_s = 30.0  # a restart that went the crash way would take this long
    supervisor = InstanceSupervisor(plan)
    try:
        first = supervisor.wait_ready(timeout_s=30)
        started = time.monotonic()
        info = supervisor.restart_worker()
        assert info["pid"] != first["pid"] and info["state"] in ("starting", "ready")
        info = supervisor.wait_ready(timeout_s=30)
        assert time.monotonic() - started < 15.0
        assert not _alive(first["pid"])
        assert info["url"] == first["url"] and health_ok(info["url"])
        assert (info["restarts"], info["planned_restarts"]) == (0, 1)
        assert info["last_exit"] is None  # no crash was seen
        assert int((tmp_path / "pids" / "prefill-0.pid").read_text()) == info["pid"]
        time.sleep(1.5)  # the watcher did not take the stopped process for a crash
        assert len(fake_worker) == 2
        assert supervisor.info()["pid"] == info["pid"]
    finally:
        supervisor.stop()
    assert not _alive(info["pid"])


def test_crash_after_a_planned_restart_is_still_restarted(
    tmp_path: Path, fake_worker: list[Any]
) -> None:
    supervisor = InstanceSupervisor(_plan(tmp_path))
    try:
        supervisor.wait_ready(timeout_s=30)
        supervisor.restart_worker()
        info = supervisor.wait_ready(timeout_s=30)
        os.kill(info["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = supervisor.info()
            if after["restarts"] == 1 and after["state"] == "ready":
                break
            time.sleep(0.1)
        assert (after["restarts"], after["planned_restarts"]) == (1, 1), after
        assert after["last_exit"] == -signal.SIGKILL and after["pid"] != info["pid"]
        assert len(fake_worker) == 3
    finally:
        supervisor.stop()


def test_restart_after_stop_is_refused(tmp_path: Path, fake_worker: list[Any]) -> None:
    supervisor = InstanceSupervisor(_plan(tmp_path))
    supervisor.stop()
    with pytest.raises(RuntimeError, match="prefill-0: stopped"):
        supervisor.restart_worker()
    assert len(fake_worker) == 1


GATED_SERVER = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ready = os.path.exists(sys.argv[2])
        self.send_response(200 if self.path == "/health" and ready else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a niceness again needs root")
def test_a_starting_worker_is_niced_until_it_answers_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = tmp_path / "ready"
    procs: list[subprocess.Popen[bytes]] = []

    def start_worker(spec: Any, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", GATED_SERVER, str(spec.api_port), str(gate)],
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    monkeypatch.setattr(worker_launch, "start_worker", start_worker)
    plan = _plan(tmp_path)
    plan.startup_niceness = 10
    supervisor = InstanceSupervisor(plan)
    try:
        # Loading: niced, and it stays so for as long as /health says no.
        assert os.getpriority(os.PRIO_PROCESS, procs[0].pid) == 10
        time.sleep(1.5)  # three of the watcher's looks at /health
        assert supervisor.info()["state"] == "starting"
        assert os.getpriority(os.PRIO_PROCESS, procs[0].pid) == 10
        gate.touch()
        supervisor.wait_ready(timeout_s=30)
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, procs[0].pid) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, procs[0].pid) == 0
    finally:
        supervisor.stop()
