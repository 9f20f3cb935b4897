"""`pdserve up` under signals and crashes, on a real local Ray cluster.

`up` forks: the launcher stays in the terminal's process group, the serving process leads
a session of its own with Ray under it (deploy/up_session.py). Each test starts its own
cluster with empty pools (Ray, controller and proxy start in seconds), except the last,
whose single real vLLM decode worker must not outlive a SIGKILL of both `up` processes.
The group SIGTERM with engines serving is the last test of test_ray_cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from tests.deploy.cluster_helpers import (
    PDSERVE,
    alive,
    describe,
    pick_ports,
    ports_free,
    session_processes,
)

pytestmark = pytest.mark.slow

STOP_LIMIT_S = 15.0  # SIGTERM (or a lost launcher) to nothing left running
ANSWER_LIMIT_S = 10.0  # `down`, `status`, `scale` after a crash
READY_TIMEOUT_S = 600.0


@dataclass
class Up:
    launcher: subprocess.Popen[str]
    state_dir: Path
    ray_temp_dir: Path
    ports: dict[str, int]
    lines: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def serving_pid(self) -> int:
        pid: int = json.loads((self.state_dir / "cluster.json").read_text())["up_pid"]
        return pid

    def processes(self) -> list[psutil.Process]:
        """The launcher, the serving process and every process in its session."""
        found = [psutil.Process(self.launcher.pid), psutil.Process(self.serving_pid)]
        return found + session_processes(self.serving_pid)

    def processes_if_any(self) -> list[psutil.Process]:
        with contextlib.suppress(FileNotFoundError, ValueError, psutil.NoSuchProcess):
            return self.processes()
        return []

    def pdserve(self, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = subprocess.run(
            [PDSERVE, *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result, time.monotonic() - started

    def output_after_ready(self) -> list[str]:
        assert self.done.wait(30), "up's output did not end"
        ready = next(i for i, line in enumerate(self.lines) if "] serving " in line)
        return self.lines[ready + 1 :]


def _write_topology(directory: Path, ports: dict[str, int], decode_replicas: int) -> Path:
    topology = {
        "tiny_model_dir": str(directory / "tiny-llama"),
        "prefill": {
            "replicas": 0,
            "max_replicas": 2,
            "port": ports["prefill"],
            "kv_port": ports["kv"],
        },
        "decode": {
            "replicas": decode_replicas,
            "max_replicas": 2,
            "port": ports["decode"],
            "resources": {"cpus": 0.5, "cpu_cores": [1]},
            "kv_cache_gib": 1,
        },
        "proxy": {"port": ports["proxy"], "admin": {"port": ports["admin"]}},
        "ray": {
            "namespace": f"pdserve-signals-{os.getpid()}-{ports['proxy']}",
            "temp_dir": str(directory / "ray"),
            "num_cpus": 2,
        },
        "controller": {"ready_timeout_s": READY_TIMEOUT_S},
    }
    path = directory / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    return path


@contextlib.contextmanager
def _running_up(decode_replicas: int = 0) -> Iterator[Up]:
    # Ray's socket paths live under its temp dir and must stay short (108 bytes).
    directory = Path(tempfile.mkdtemp(prefix="pds-", dir="/tmp"))
    ports = pick_ports()
    topology = _write_topology(directory, ports, decode_replicas)
    launcher = subprocess.Popen(
        [PDSERVE, "up", "-c", str(topology), "--state-dir", str(directory / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        start_new_session=True,  # its own process group, as in a terminal
    )
    up = Up(launcher, directory / "state", directory / "ray", ports)
    ready = threading.Event()

    def pump() -> None:
        assert launcher.stdout is not None
        for line in launcher.stdout:
            up.lines.append(line.rstrip())
            if "] serving " in line:
                ready.set()
        up.done.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.5):
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            pytest.fail("pdserve up did not become ready:\n" + "\n".join(up.lines[-40:]))
    seen = up.processes()
    try:
        yield up
    finally:
        print("\n".join(["pdserve up output:", *up.lines]))
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for process in seen + up.processes_if_any():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                process.kill()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_all_gone(processes: list[psutil.Process], since: float, limit_s: float) -> float:
    """Seconds from ``since`` until none of ``processes`` runs; fails past ``limit_s``."""
    remaining = list(processes)
    while remaining and time.monotonic() - since < limit_s:
        time.sleep(0.1)
        remaining = [p for p in remaining if alive(p)]
    assert not remaining, [describe(p) for p in remaining]
    return time.monotonic() - since


def _assert_nothing_left(up: Up) -> None:
    assert not (up.state_dir / "cluster.json").exists()
    assert not (up.state_dir / "kv_secret").exists()
    assert not list((up.state_dir / "pids").glob("*.pid"))
    ray_dir = str(up.ray_temp_dir)
    ours = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if ray_dir in " ".join(process.info.get("cmdline") or []) and alive(process):
            ours.append(process.info)
    assert not ours, ours
    assert ports_free([up.ports["proxy"], up.ports["admin"], up.ports["decode"]])


def _one_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pdserve {command}: "), lines
    return lines[0]


@pytest.mark.timeout(300)
def test_down_stops_a_live_cluster() -> None:
    with _running_up() as up:
        processes = up.processes()
        result, took = up.pdserve("down")
        assert result.returncode == 0, result.stderr
        assert _one_line(result, "down") == "pdserve down: stopped"
        assert up.launcher.wait(timeout=30) == 0
        _wait_all_gone(processes, time.monotonic() - took, STOP_LIMIT_S)
        assert took < STOP_LIMIT_S
        assert any("] stopped " in line for line in up.output_after_ready())
        _assert_nothing_left(up)


@pytest.mark.timeout(300)
def test_sigterm_to_the_process_group_stops_everything_quietly() -> None:
    with _running_up() as up:
        processes = up.processes()
        started = time.monotonic()
        os.killpg(up.launcher.pid, signal.SIGTERM)
        assert up.launcher.wait(timeout=60) == 0
        took = _wait_all_gone(processes, started, STOP_LIMIT_S)
        output = up.output_after_ready()
        # Progress lines only: no traceback, no Ray log line.
        assert output and all(line.startswith("[") and "] " in line for line in output), output
        assert "stopped" in output[-1]
        print(f"group SIGTERM -> all stopped in {took:.1f} s")
        _assert_nothing_left(up)


@pytest.mark.timeout(300)
def test_killed_launcher_leaves_the_serving_process_to_tear_down() -> None:
    with _running_up() as up:
        processes = up.processes()
        serving = psutil.Process(up.serving_pid)
        started = time.monotonic()
        up.launcher.kill()
        up.launcher.wait()
        took = _wait_all_gone(processes, started, STOP_LIMIT_S)
        assert not alive(serving)
        assert any("] stopped " in line for line in up.output_after_ready())
        print(f"launcher SIGKILL -> all stopped in {took:.1f} s")
        _assert_nothing_left(up)


@pytest.mark.timeout(300)
def test_killed_serving_process_is_cleaned_up_by_the_launcher() -> None:
    with _running_up() as up:
        processes = up.processes()
        pid = up.serving_pid
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert up.launcher.wait(timeout=60) == 1
        took = _wait_all_gone(processes, started, STOP_LIMIT_S)
        output = up.output_after_ready()
        # One line, from the launcher: no Ray error, no traceback.
        assert len(output) == 1, output
        assert output[-1].startswith(
            f"pdserve up: the serving process (pid {pid}) was killed by SIGKILL; stopped the "
        )
        print(f"serving SIGKILL -> all stopped in {took:.1f} s")
        _assert_nothing_left(up)


@pytest.mark.timeout(900)
def test_after_both_up_processes_are_killed_commands_answer_and_down_cleans_up() -> None:
    """The worst case: launcher and serving process SIGKILLed together (an OOM kill of the
    session, `kill -9` of both). A real vLLM worker runs in a session of its own: only the
    pid file the instance actor wrote leads `down` to it."""
    with _running_up(decode_replicas=1) as up:
        worker = psutil.Process(int((up.state_dir / "pids" / "decode-0.pid").read_text()))
        worker_group = [worker, *worker.children(recursive=True)]
        assert len(worker_group) >= 2  # the API server and its engine core
        serving_pid = up.serving_pid
        os.kill(up.launcher.pid, signal.SIGKILL)
        os.kill(serving_pid, signal.SIGKILL)
        up.launcher.wait()

        status, took = up.pdserve("status")
        assert status.returncode == 2 and took < ANSWER_LIMIT_S, (status, took)
        assert "has exited" in _one_line(status, "status")
        scale, took = up.pdserve("scale", "--decode", "2")
        assert scale.returncode == 2 and took < ANSWER_LIMIT_S, (scale, took)
        assert "pdserve down" in _one_line(scale, "scale")
        # Status and scale stop nothing. The API server is what they could have stopped; its
        # children include start-up helpers of vLLM's that exit by themselves (CI saw one go).
        assert alive(worker)

        down, took = up.pdserve("down")
        assert down.returncode == 0 and took < ANSWER_LIMIT_S, (down, took)
        assert f"`pdserve up` (pid {serving_pid}) had exited" in _one_line(down, "down")
        _wait_all_gone(worker_group, time.monotonic(), 5.0)
        _assert_nothing_left(up)

        again, took = up.pdserve("down")
        assert again.returncode == 2 and took < ANSWER_LIMIT_S
        assert "no running cluster" in _one_line(again, "down")
