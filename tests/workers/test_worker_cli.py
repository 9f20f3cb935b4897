"""``pdserve worker``: one-line errors, and SIGTERM stops the server's whole process group."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deploy import worker_cli
from deploy.cli import CliError
from deploy.worker_launch import WorkerSpec


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(CliError) as info:
        worker_cli.run(_args("decode", "--model", str(tmp_path / "missing")))
    assert "\n" not in str(info.value) and "model:" in str(info.value)


def test_port_in_use_is_one_line(model_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(CliError, match=f"api_port: 127.0.0.1:{port} is already in use"):
            worker_cli.run(_args("prefill", "--model", str(model_dir), "--port", str(port)))


def test_bad_vllm_args_is_one_line(model_dir: Path) -> None:
    with pytest.raises(CliError, match="--vllm-args"):
        worker_cli.spec_from_args(_args("decode", "--model", str(model_dir), '--vllm-args="x'))


def test_flags_reach_the_spec(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_KV_SECRET", "worker-cli-test-secret")
    monkeypatch.delenv("PDSERVE_KV_SECRET_FILE", raising=False)
    spec = worker_cli.spec_from_args(
        _args(
            "prefill", "--model", str(model_dir), "--index", "1", "--cpu-core", "1",
            "--block-size", "32", "--vllm-args=--seed 7 --max-model-len 512",
        )
    )  # fmt: skip
    assert spec.resolved_api_port == 8101 and spec.resolved_kv_port == 15101
    assert (
        spec.cpu_core == "1" and spec.block_size == 32 and spec.secret == "worker-cli-test-secret"
    )
    assert spec.extra_args == ("--seed", "7", "--max-model-len", "512")


def test_sigterm_stops_the_server_group(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Runs the command's real loop with a stand-in server (a process group with a child)."""
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(60)\n"
    )
    started: list[subprocess.Popen[bytes]] = []

    def fake_start(
        spec: WorkerSpec,
        log_path: Path | None = None,
        *,
        validate: bool = True,
        pass_fds: tuple[int, ...] = (),
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script], start_new_session=True, pass_fds=pass_fds
        )
        started.append(proc)
        return proc

    monkeypatch.setattr(worker_cli, "start_worker", fake_start)
    monkeypatch.setenv("PDSERVE_CORE_CLAIMS_DIR", str(tmp_path / "claims"))  # not the host's
    args = _args("decode", "--model", str(model_dir), "--port", "0", "--stop-grace-s", "5")
    monkeypatch.setattr(worker_cli, "validate_spec", lambda spec: None)

    def send_sigterm() -> None:
        while not pid_file.exists() or not pid_file.read_text():
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm, daemon=True).start()
    assert worker_cli.run(args) == 0
    (proc,) = started
    assert proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_pdserve_dispatches_worker_and_make_tiny_model() -> None:
    from deploy.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["worker", "decode", "--model", "/m", "--port", "9"])
    assert args._module == "deploy.worker_cli" and args.role == "decode" and args.port == 9
    assert parser.parse_args(["make-tiny-model", "/d"])._module == "deploy.tiny_model"
