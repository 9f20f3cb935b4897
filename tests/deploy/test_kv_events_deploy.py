"""KV events under `pdserve up`: the pool knob, its reserved port ranges, the plan -> worker
spec pass-through, and the controller registering each instance's endpoints with the proxy
(no Ray: the controller talks to a real in-process proxy)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deploy import worker_launch
from deploy.controller import Controller, ControllerError, InstanceRecord, registration
from deploy.instance_actor import InstancePlan, InstanceSupervisor, build_worker_spec
from deploy.topology import Topology, TopologyError, validate_topology
from deploy.worker_launch import advertised_kv_events, kv_events_config
from proxy.config import ProxyConfig
from proxy.instances import KvEventsEndpoint
from proxy.server import ProxyServer


def test_pools_publish_by_default_on_reserved_ranges() -> None:
    topology = Topology()
    assert topology.prefill.kv_events.enabled and topology.decode.kv_events.enabled
    assert topology.kv_events_ports("prefill") == (range(16100, 16108), range(17100, 17108))
    assert topology.kv_events_ports("decode") == (range(16200, 16208), range(17200, 17208))
    off = validate_topology({"decode": {"port": 8200, "kv_events": {"enabled": False}}})
    assert off.kv_events_ports("decode") == (range(0), range(0))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"decode": {"port": 8200, "kv_events": {"port": 16104}}},
            "decode.kv_events.port: port 16104 overlaps prefill.kv_events.port",
        ),
        (
            {"prefill": {"port": 8100, "kv_port": 15100, "kv_events": {"replay_port": 8105}}},
            "prefill.kv_events.replay_port: port 8105 overlaps prefill.port",
        ),
        (
            {"decode": {"port": 8200, "kv_events": {"port": 65530}}},
            "decode.kv_events.port: port range 65530+8 runs past 65535",
        ),
        ({"decode": {"port": 8200, "kv_events": {"topic": "x"}}}, "kv_events.topic: unknown key"),
        ({"decode": {"port": 8200, "kv_events": {"port": 0}}}, "kv_events.port"),
    ],
)
def test_topology_refuses_clashing_or_bad_event_ports(data: dict[str, Any], message: str) -> None:
    with pytest.raises(TopologyError, match=re.escape(message)):
        validate_topology(data)


def test_a_disabled_pool_reserves_no_event_ports() -> None:
    # The same clash as above is fine once the decode pool publishes nothing.
    validate_topology({"decode": {"port": 8200, "kv_events": {"enabled": False, "port": 16104}}})


def _controller(tmp_path: Path, topology: dict[str, Any]) -> Controller:
    return Controller(validate_topology(topology).model_dump(mode="json"), str(tmp_path))


def test_plan_carries_the_pool_settings_to_the_worker_spec(tmp_path: Path) -> None:
    controller = _controller(
        tmp_path,
        {
            "worker_host": "0.0.0.0",
            "prefill": {"port": 8100, "kv_port": 15100, "kv_events": {"port": 30000}},
            "decode": {"port": 8200, "kv_events": {"enabled": False}},
        },
    )
    plan = controller._plan("prefill")
    assert (plan.kv_events, plan.kv_events_port, plan.kv_events_replay_port) == (
        True,
        30000,
        17100,
    )
    spec = build_worker_spec(plan, "10.0.0.5", None)
    assert (spec.resolved_kv_events_port, spec.resolved_kv_events_replay_port) == (30000, 17100)
    config = kv_events_config(spec)
    assert config is not None and config["endpoint"] == "tcp://*:30000"
    assert advertised_kv_events(spec) == KvEventsEndpoint(
        endpoint="tcp://10.0.0.5:30000", replay_endpoint="tcp://10.0.0.5:17100"
    )
    decode = controller._plan("decode")
    assert not decode.kv_events and decode.kv_events_port is None
    assert kv_events_config(build_worker_spec(decode, "10.0.0.5", None)) is None


def test_second_instance_gets_the_next_ports(tmp_path: Path) -> None:
    controller = _controller(tmp_path, {})
    first = controller._plan("decode")
    controller._records[first.name] = InstanceRecord(plan=first, actor=None, group="g")
    second = controller._plan("decode")
    assert (first.kv_events_port, second.kv_events_port) == (16200, 16201)
    assert (first.kv_events_replay_port, second.kv_events_replay_port) == (17200, 17201)


def _plan(role: str, api_port: int) -> InstancePlan:
    return InstancePlan(
        name=f"{role}-0", role=role, index=0, model="/m", host="127.0.0.1", api_port=api_port,
        kv_port=None, cpu_core=None, kv_cache_gib=1, accelerator="cpu", run_dir="/tmp",
        engine_id=f"{role}-0",
    )  # fmt: skip


def _record(role: str, url: str, kv_events: dict[str, Any] | None) -> InstanceRecord:
    plan = _plan(role, int(url.rsplit(":", 1)[1]))
    info = {"url": url, "kv_events": kv_events}
    return InstanceRecord(
        plan=plan, actor=None, group="g", state="running", ever_ready=True, url=url, info=info
    )


def test_registration_body_names_the_events_only_when_there_are_some() -> None:
    events = {"endpoint": "tcp://127.0.0.1:16100", "replay_endpoint": "tcp://127.0.0.1:17100"}
    with_events = _record("prefill", "http://127.0.0.1:8100", events)
    assert registration(with_events) == {
        "url": "http://127.0.0.1:8100",
        "role": "prefill",
        "kv_events": events,
    }
    assert "kv_events" not in registration(_record("decode", "http://127.0.0.1:8200", None))


@pytest.fixture
async def proxy() -> AsyncIterator[ProxyServer]:
    config = {"port": 0, "admin": {"port": 0}, "health": {"interval_s": 60.0}}
    server = ProxyServer(ProxyConfig.model_validate(config))
    await server.start()
    yield server
    await server.stop()


async def test_controller_registers_the_endpoints_with_the_proxy(
    tmp_path: Path, proxy: ProxyServer
) -> None:
    controller = Controller(
        validate_topology({"proxy": {"admin": {"port": proxy.admin_port}}}).model_dump(mode="json"),
        str(tmp_path),
    )
    controller._sync_lock = asyncio.Lock()  # start_proxy() makes it (with a Ray actor)
    events = {"endpoint": "tcp://127.0.0.1:16100", "replay_endpoint": "tcp://127.0.0.1:17100"}
    controller._records["prefill-0"] = _record("prefill", "http://127.0.0.1:8100", events)
    controller._records["decode-0"] = _record("decode", "http://127.0.0.1:8200", None)
    try:
        await controller._sync_proxy()
        prefill = proxy.registry.require("http://127.0.0.1:8100")
        assert prefill.kv_events == KvEventsEndpoint(**events)
        assert proxy.registry.require("http://127.0.0.1:8200").kv_events is None
        # The proxy holds the controller to the same rule as anyone: the URL's own host.
        elsewhere = {"endpoint": "tcp://10.0.0.9:16101", "replay_endpoint": None}
        controller._records["prefill-1"] = _record("prefill", "http://127.0.0.1:8101", elsewhere)
        with pytest.raises(ControllerError, match=r"-> 400: .*kv_events"):
            await controller._sync_proxy()
        assert proxy.registry.get("http://127.0.0.1:8101") is None
    finally:
        if controller._http is not None:
            await controller._http.close()


def test_the_actor_reports_the_endpoints_beside_its_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def start_worker(spec: Any, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        return subprocess.Popen(sleeper, start_new_session=True)

    monkeypatch.setattr(worker_launch, "start_worker", start_worker)
    plan = _plan("decode", 8200)
    plan.run_dir, plan.kv_events_port = str(tmp_path), 16250
    supervisor = InstanceSupervisor(plan)
    try:
        info = supervisor.info()
        assert info["url"] == "http://127.0.0.1:8200"
        assert info["kv_events"] == {
            "endpoint": "tcp://127.0.0.1:16250",
            "replay_endpoint": "tcp://127.0.0.1:17200",
        }
        plan.kv_events = False
        assert supervisor.info()["kv_events"] is None
    finally:
        supervisor.stop()
