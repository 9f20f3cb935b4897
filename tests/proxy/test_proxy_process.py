"""`pdserve proxy` as a process in front of fake workers running as processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from proxy_helpers import PDSERVE, fetch, wait_http

from deploy.worker_launch import free_port


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
def test_proxy_process_serves_and_stops_on_sigterm(
    processes: list[subprocess.Popen[bytes]],
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ports = {name: free_port() for name in ("prefill", "decode", "proxy", "admin")}
    for role in ("prefill", "decode"):
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.fake_worker", "--role", role,
                 "--port", str(ports[role]), "--tokens", "3"],
                env=env, stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
    proxy = subprocess.Popen(
        [*PDSERVE, "proxy",
         "--prefill", f"http://127.0.0.1:{ports['prefill']}",
         "--decode", f"127.0.0.1:{ports['decode']}",
         "--port", str(ports["proxy"]), "--admin-port", str(ports["admin"])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    processes.append(proxy)
    base = f"http://127.0.0.1:{ports['proxy']}"
    wait_http(f"http://127.0.0.1:{ports['decode']}/health")
    wait_http(base + "/health")
    status, answer = fetch(
        base + "/v1/completions", {"model": "fake-model", "prompt": "hi", "max_tokens": 3}
    )
    assert status == 200
    assert answer["choices"][0]["text"] == " tok0 tok1 tok2"
    status, listing = fetch(f"http://127.0.0.1:{ports['admin']}/admin/instances")
    assert status == 200
    assert {i["role"] for i in listing["instances"]} == {"prefill", "decode"}
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=20) == 0
    assert proxy.stderr is not None and b"Traceback" not in proxy.stderr.read()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--port", "70000"], "port"),
        (["--decode-policy", "no_such_policy"], "no_such_policy"),
        (["--decode", "ftp://x:1"], "decode"),
        (["--decode", "http://127.0.0.1:1", "--port", "{busy}"], "cannot listen"),
    ],
)
def test_bad_command_lines_are_one_line_and_exit_2(extra: list[str], expected: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = [a.replace("{busy}", str(busy.getsockname()[1])) for a in extra]
        result = subprocess.run(
            [*PDSERVE, "proxy", "--admin-port", "0", *argv],
            capture_output=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
