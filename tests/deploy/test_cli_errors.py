"""Bad input to `pdserve up/down/status/scale/restart` fails at once: one line, exit 2,
nothing started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deploy import cluster_state
from deploy.cli import main

# The installed console script (`python -m deploy.cli` would define a second CliError class).
PDSERVE = str(Path(sys.executable).with_name("pdserve"))

BASE = {
    "tiny_model_dir": "/nonexistent/never-created",
    "prefill": {"port": 18910, "kv_port": 18920},
    "decode": {"port": 18930},
    "proxy": {"port": 18940, "admin": {"port": 18941}},
}


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _up(tmp_path: Path, topology: dict[str, object], capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    code = main(["up", "-c", str(path), "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pdserve up: ")
    # Nothing started: no Ray in this process, no state recorded.
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "state" / "cluster.json").exists()
    return lines[0]


def _merge(extra: dict[str, object]) -> dict[str, object]:
    merged: dict[str, object] = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}  # type: ignore[dict-item]
        else:
            merged[key] = value
    return merged


def test_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _up(tmp_path, _merge({"decode": {"replicsa": 2}}), capsys)
    assert "decode.replicsa: unknown key" in line


def test_impossible_resources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _up(tmp_path, _merge({"prefill": {"resources": {"cpus": 512}}}), capsys)
    assert "prefill.resources" in line and "512 CPU" in line


def test_gpu_on_machine_without_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topology = _merge(
        {
            "accelerator": "gpu",
            "ray": {"num_gpus": 0},
            "prefill": {"resources": {"gpus": 1}},
            "decode": {"resources": {"gpus": 1}},
        }
    )
    line = _up(tmp_path, topology, capsys)
    assert "resources" in line and "GPU" in line


def test_port_in_use(tmp_path: Path, busy_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    line = _up(tmp_path, _merge({"proxy": {"port": busy_port}}), capsys)
    assert f"proxy.port: port {busy_port}" in line and "in use" in line
    line = _up(tmp_path, _merge({"decode": {"port": busy_port}}), capsys)
    assert f"decode.port: port {busy_port}" in line


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _up(tmp_path, _merge({"model": str(tmp_path / "no-such-model")}), capsys)
    assert "model: directory" in line and "does not exist" in line
    empty = tmp_path / "empty-model"
    empty.mkdir()
    line = _up(tmp_path, _merge({"model": str(empty)}), capsys)
    assert "model:" in line and "config.json" in line


def test_missing_topology_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["up", "-c", str(tmp_path / "nope.yaml"), "--state-dir", str(tmp_path)])
    assert code == 2
    assert "cannot read topology" in capsys.readouterr().err


def test_detach_needs_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["up", "-c", str(path), "--detach", "--state-dir", str(tmp_path)]) == 2
    assert "--detach needs --address" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["down"], ["status"], ["scale", "--prefill", "2"], ["restart", "decode-0"]]
)
def test_no_running_cluster(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"no running cluster recorded in {tmp_path}")


def test_scale_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "--state-dir", str(tmp_path)]) == 2
    assert "--prefill N and/or --decode M" in capsys.readouterr().err
    assert main(["scale", "--decode", "-1", "--state-dir", str(tmp_path)]) == 2
    assert "--decode: must be >= 0" in capsys.readouterr().err


def test_restart_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("decode", "router-0", "decode-x", "decode-0 "):
        assert main(["restart", name, "--state-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"pdserve restart: NAME must be an instance name like prefill-0 or decode-1, "
            f"got {name!r}"
        )
    assert main(["restart", "decode-0", "--timeout", "0", "--state-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "pdserve restart: --timeout: must be > 0, got 0"


@pytest.mark.parametrize(
    ("failure", "line"),
    [
        ("unknown", "pdserve restart: no instance 'decode-7' (instances: decode-0, prefill-0)"),
        ("timeout", "pdserve restart: decode-7 was not back within 5 s; the controller carries"),
    ],
)
def test_restart_failures_are_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: str,
    line: str,
) -> None:
    """What the controller says reaches the user as one line, without Ray's traceback."""
    import ray

    from deploy.cluster_state import ClusterState, write_state
    from deploy.controller import ControllerError

    write_state(
        tmp_path,
        ClusterState(
            ray_address="127.0.0.1:1",
            namespace="pdserve-test",
            auth_mode="disabled",
            started_ray=True,
            up_pid=os.getpid(),  # alive: the cluster counts as running
            foreground=True,
            api_url="http://127.0.0.1:1/v1",
            metrics_url="http://127.0.0.1:1/metrics",
            admin_url="http://127.0.0.1:1",
            admin_token=None,
            run_dir=str(tmp_path),
        ),
    )
    asked: list[str] = []

    class Restart:
        def remote(self, name: str) -> str:
            asked.append(name)
            return "ref"

    class FakeController:
        restart = Restart()

    def get(ref: str, timeout: float) -> object:
        assert ref == "ref" and timeout == 5.0
        if failure == "timeout":
            raise ray.exceptions.GetTimeoutError("timed out")
        cause = ControllerError("no instance 'decode-7' (instances: decode-0, prefill-0)")
        raise ray.exceptions.RayTaskError("restart", "Traceback (most recent call last):", cause)

    monkeypatch.setattr(cluster_state, "connect", lambda state, command: None)
    monkeypatch.setattr(cluster_state, "get_controller", lambda state: FakeController())
    monkeypatch.setattr(ray, "get", get)
    code = main(["restart", "decode-7", "--timeout", "5", "--state-dir", str(tmp_path)])
    assert code == 2 and asked == ["decode-7"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err


def test_console_script_prints_one_line(tmp_path: Path) -> None:
    """The real entry point: no traceback reaches the user."""
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_merge({"proxy": {"bogus": 1}})))
    result = subprocess.run(
        [PDSERVE, "up", "-c", str(path), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"pdserve up: {path}: proxy.bogus: unknown key"]
