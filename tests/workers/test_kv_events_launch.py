"""Workers publish vLLM's KV cache events: the --kv-events-config they get, the ports, the
off switch and the endpoints a proxy is told (no vLLM engine started)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from deploy import worker_cli
from deploy.worker_launch import (
    WorkerConfigError,
    WorkerSpec,
    advertised_kv_events,
    build_command,
    free_port,
    validate_spec,
    zmq_bind_endpoint,
)
from proxy.instances import KvEventsEndpoint


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")  # all validate_spec looks for
    return tmp_path


def _events_config(argv: list[str]) -> dict[str, object]:
    config = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert isinstance(config, dict)
    return config


def test_every_role_publishes_with_replay_by_default(model_dir: Path) -> None:
    expected = {"prefill": (16101, 17101), "decode": (16201, 17201), "aggregated": (16301, 17301)}
    for role, (port, replay) in expected.items():
        spec = WorkerSpec(role=role, model=model_dir, index=1)  # type: ignore[arg-type]
        assert (spec.resolved_kv_events_port, spec.resolved_kv_events_replay_port) == (port, replay)
        argv, _ = build_command(spec)
        assert _events_config(argv) == {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://[::ffff:127.0.0.1]:{port}",
            "replay_endpoint": f"tcp://[::ffff:127.0.0.1]:{replay}",
            "topic": f"kv-events.{role}",
        }


def test_the_json_is_a_valid_vllm_kv_events_config(model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from vllm.config.kv_events import KVEventsConfig
    from vllm.distributed.kv_events import ZmqEventPublisher

    argv, _ = build_command(WorkerSpec(role="prefill", model=model_dir, host="10.1.2.3"))
    config = KVEventsConfig(**_events_config(argv))  # refuses unknown or mistyped fields
    assert config.enable_kv_cache_events and config.publisher == "zmq"
    assert config.replay_endpoint is not None
    # vLLM binds the PUB socket only for the endpoints it takes for bind addresses; any
    # other it would connect to, and nothing would listen on the advertised port.
    assert ZmqEventPublisher._is_bind_endpoint(config.endpoint)


def test_bind_endpoints_listen_on_the_worker_host_only() -> None:
    zmq = pytest.importorskip("zmq")
    port = free_port()
    endpoint = zmq_bind_endpoint("127.0.0.1", port)
    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    try:
        sock.bind(endpoint)
        assert sock.getsockopt_string(zmq.LAST_ENDPOINT) == f"tcp://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            pass
    finally:
        sock.close(linger=0)
        context.term()


def test_bind_endpoint_forms() -> None:
    assert zmq_bind_endpoint("0.0.0.0", 5) == "tcp://*:5"
    assert zmq_bind_endpoint("10.0.0.5", 5) == "tcp://[::ffff:10.0.0.5]:5"
    assert zmq_bind_endpoint("localhost", 5) == "tcp://[::ffff:127.0.0.1]:5"
    with pytest.raises(ValueError, match="IPv6"):
        zmq_bind_endpoint("fe80::1", 5)


def test_off_switch_removes_the_config_and_its_ports(model_dir: Path) -> None:
    spec = WorkerSpec(role="decode", model=model_dir, kv_events=False)
    argv, _ = build_command(spec)
    assert "--kv-events-config" not in argv
    assert advertised_kv_events(spec) is None


def test_ports_overridable_and_advertised_on_the_dialled_host(model_dir: Path) -> None:
    spec = WorkerSpec(
        role="prefill", model=model_dir, host="0.0.0.0", advertise_host="10.0.0.5",
        kv_events_port=20001, kv_events_replay_port=20002,
    )  # fmt: skip
    config = _events_config(build_command(spec)[0])
    assert (config["endpoint"], config["replay_endpoint"]) == ("tcp://*:20001", "tcp://*:20002")
    assert advertised_kv_events(spec) == KvEventsEndpoint(
        endpoint="tcp://10.0.0.5:20001", replay_endpoint="tcp://10.0.0.5:20002"
    )
    # Without an advertised host a wildcard bind is dialled where its URL points.
    local = WorkerSpec(role="decode", model=model_dir, host="0.0.0.0")
    assert local.url.startswith("http://127.0.0.1:")
    assert advertised_kv_events(local) == KvEventsEndpoint(
        endpoint="tcp://127.0.0.1:16200", replay_endpoint="tcp://127.0.0.1:17200"
    )


def test_two_instances_on_one_host_never_share_a_port(model_dir: Path) -> None:
    used: dict[int, str] = {}
    for role in ("prefill", "decode", "aggregated"):
        for index in range(8):
            spec = WorkerSpec(role=role, model=model_dir, index=index)  # type: ignore[arg-type]
            ports = [spec.resolved_api_port, spec.resolved_kv_events_port]
            ports += [spec.resolved_kv_events_replay_port]
            ports += [spec.resolved_kv_port] if spec.resolved_kv_port is not None else []
            for port in ports:
                assert port not in used, f"{role}-{index} and {used[port]} share port {port}"
                used[port] = f"{role}-{index}"


def test_validate_refuses_taken_or_clashing_event_ports(model_dir: Path) -> None:
    api = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for field in ("kv_events_port", "kv_events_replay_port"):
            ports = {"kv_events_port": free_port(), "kv_events_replay_port": free_port()}
            ports[field] = busy
            spec = WorkerSpec(role="decode", model=model_dir, api_port=api, **ports)
            with pytest.raises(WorkerConfigError, match=rf"{field}: 127.0.0.1:{busy} is already"):
                validate_spec(spec)
    with pytest.raises(WorkerConfigError, match=r"kv_events_port: port \d+ is also the api_port"):
        validate_spec(WorkerSpec(role="decode", model=model_dir, api_port=api, kv_events_port=api))
    same = free_port()
    clash = WorkerSpec(
        role="decode", model=model_dir, api_port=api, kv_events_port=same,
        kv_events_replay_port=same,
    )  # fmt: skip
    with pytest.raises(
        WorkerConfigError, match=r"kv_events_replay_port: port \d+ is also the kv_events_port"
    ):
        validate_spec(clash)
    with pytest.raises(WorkerConfigError, match=r"kv_events_port: must be in 1\.\.65535"):
        validate_spec(WorkerSpec(role="decode", model=model_dir, api_port=api, kv_events_port=0))
    # Off, the same clash is no clash: the ports are not opened at all.
    validate_spec(
        WorkerSpec(
            role="decode", model=model_dir, api_port=api, kv_events_port=api, kv_events=False
        )
    )


def _cli(*argv: str) -> WorkerSpec:
    import argparse

    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    return worker_cli.spec_from_args(parser.parse_args(argv))


def test_worker_flags(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_KV_SECRET", raising=False)
    monkeypatch.delenv("PDSERVE_KV_SECRET_FILE", raising=False)
    spec = _cli("decode", "--model", str(model_dir))
    assert spec.kv_events and spec.kv_events_port is None
    spec = _cli(
        "decode", "--model", str(model_dir),
        "--kv-events-port", "21000", "--kv-events-replay-port", "21001",
    )  # fmt: skip
    assert (spec.resolved_kv_events_port, spec.resolved_kv_events_replay_port) == (21000, 21001)
    assert not _cli("decode", "--model", str(model_dir), "--no-kv-events").kv_events


def test_worker_prints_the_endpoints_to_register(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import subprocess

    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    args = parser.parse_args(["aggregated", "--model", str(model_dir), "--cpu-core", "0"])
    stand_in = subprocess.Popen([sys.executable, "-c", "pass"])
    monkeypatch.setattr(worker_cli, "validate_spec", lambda spec: None)
    monkeypatch.setattr(worker_cli, "start_worker", lambda spec, **kwargs: stand_in)
    assert worker_cli.run(args) == 0
    stand_in.wait()
    assert "kv events tcp://127.0.0.1:16300 replay tcp://127.0.0.1:17300" in capsys.readouterr().err
