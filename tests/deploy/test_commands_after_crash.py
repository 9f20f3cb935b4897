"""`pdserve down/status/scale/restart` against a cluster that is gone or hung: one line, within
seconds, and `down` removes what is left. No Ray here: the state file is what a crashed
`up` leaves, and its leftovers are stand-in processes (the real crash, with Ray and a vLLM
worker, is in test_up_signals.py)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from deploy.cluster_state import ClusterState, write_state
from deploy.worker_launch import free_port
from tests.deploy.cluster_helpers import PDSERVE, alive

ANSWER_LIMIT_S = 10.0


def _state(directory: Path, **overrides: object) -> ClusterState:
    fields = {
        "ray_address": "127.0.0.1:1",
        "namespace": "pdserve-test",
        "auth_mode": "disabled",
        "started_ray": True,
        "up_pid": _dead_pid(),
        "foreground": True,
        "api_url": "http://127.0.0.1:1/v1",
        "metrics_url": "http://127.0.0.1:1/metrics",
        "admin_url": "http://127.0.0.1:1",
        "admin_token": None,
        "run_dir": str(directory),
    }
    state = ClusterState(**{**fields, **overrides})  # type: ignore[arg-type]
    write_state(directory, state)
    (directory / "kv_secret").write_text("s" * 40)
    return state


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _pdserve(directory: Path, *args: str) -> tuple[int, list[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [PDSERVE, *args, "--state-dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    return result.returncode, (result.stdout + result.stderr).strip().splitlines(), took


@pytest.fixture
def orphans() -> Iterator[tuple[int, psutil.Process, subprocess.Popen[bytes]]]:
    """What a SIGKILLed serving `up` leaves: a process still in its session (whose leader is
    gone), and a worker in a session of its own that only a pid file points to."""
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess; print(subprocess.Popen(['sleep', '300']).pid)"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert leader.stdout is not None
    in_session = psutil.Process(int(leader.stdout.readline()))
    leader.wait()
    worker = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield leader.pid, in_session, worker
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            in_session.kill()
        worker.kill()
        worker.wait()


@pytest.mark.timeout(60)
def test_after_up_died_status_and_scale_answer_and_down_removes_what_it_left(
    tmp_path: Path, orphans: tuple[int, psutil.Process, subprocess.Popen[bytes]]
) -> None:
    session, in_session, worker = orphans
    _state(tmp_path, up_pid=session)
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "decode-0.pid").write_text(str(worker.pid))

    for command in (["status"], ["scale", "--decode", "2"], ["restart", "decode-0"]):
        code, lines, took = _pdserve(tmp_path, *command)
        assert code == 2 and took < ANSWER_LIMIT_S, (lines, took)
        assert len(lines) == 1 and lines[0].startswith(f"pdserve {command[0]}: "), lines
        assert f"`pdserve up` (pid {session}) has exited" in lines[0]
        assert "run `pdserve down`" in lines[0]
    assert alive(in_session) and worker.poll() is None  # status, scale, restart stop nothing
    assert (tmp_path / "cluster.json").exists()

    code, lines, took = _pdserve(tmp_path, "down")
    assert code == 0 and took < ANSWER_LIMIT_S, (lines, took)
    assert lines == [
        f"pdserve down: `pdserve up` (pid {session}) had exited; stopped the 2 process(es) it left"
    ]
    assert worker.wait(timeout=5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while alive(in_session) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(in_session)
    assert not (tmp_path / "cluster.json").exists()
    assert not (tmp_path / "kv_secret").exists()
    assert not list((tmp_path / "pids").iterdir())

    code, lines, took = _pdserve(tmp_path, "down")
    assert code == 2 and lines == [f"pdserve down: no running cluster recorded in {tmp_path}"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "command", [["status"], ["scale", "--prefill", "1"], ["restart", "decode-0"], ["down"]]
)
def test_unreachable_ray_is_one_line_at_once(tmp_path: Path, command: list[str]) -> None:
    """A deployment on a Ray cluster whose GCS is gone (Ray itself retries for minutes)."""
    address = f"127.0.0.1:{free_port()}"
    _state(tmp_path, ray_address=address, started_ray=False, foreground=False, up_pid=1)
    code, lines, took = _pdserve(tmp_path, *command)
    assert code == 2 and took < ANSWER_LIMIT_S, (lines, took)
    assert len(lines) == 1 and lines[0].startswith(f"pdserve {command[0]}: "), lines
    assert f"nothing answers at Ray's GCS {address}" in lines[0]
    assert (tmp_path / "cluster.json").exists()  # `down` can be retried once Ray is back


@pytest.mark.timeout(60)
def test_ray_that_accepts_but_never_answers_is_one_line_within_the_limit(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel accepts; nobody ever reads or answers
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        _state(tmp_path, ray_address=address, started_ray=False, foreground=False, up_pid=1)
        code, lines, took = _pdserve(tmp_path, "status")
    assert code == 2 and took < ANSWER_LIMIT_S, (lines, took)
    assert lines == [f"pdserve status: Ray at {address} accepted but did not answer in 7 s"]
