"""Where an instance publishes KV events travels with its URL: admin API, static config,
`GET /admin/instances`; only tcp:// endpoints on the URL's own host are accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ProxyFactory

from proxy.config import InstanceEntry, ProxyConfig, load_proxy_config
from proxy.instances import KvEventsEndpoint
from proxy.registry import InstanceRegistry, KvEventsError, parse_kv_events
from proxy.server import ProxyServer

URL = "http://10.0.0.5:8100"
EVENTS = {"endpoint": "tcp://10.0.0.5:16100", "replay_endpoint": "tcp://10.0.0.5:17100"}


def test_parse_normalises_and_keeps_vllm_field_names() -> None:
    parsed = parse_kv_events({"endpoint": "TCP://10.0.0.5:16100/"}, "10.0.0.5:8100")
    assert parsed == KvEventsEndpoint(endpoint="tcp://10.0.0.5:16100", replay_endpoint=None)
    assert parse_kv_events(EVENTS, URL).to_json() == EVENTS
    ipv6 = parse_kv_events({"endpoint": "tcp://[0:0::1]:5"}, "http://[::1]:8100")
    assert ipv6.endpoint == "tcp://[::1]:5"
    named = parse_kv_events({"endpoint": "tcp://WORKER-1:5"}, "http://worker-1:8100")
    assert named.endpoint == "tcp://worker-1:5"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"endpoint": "tcp://10.0.0.6:16100"}, "own host 10.0.0.5"),  # another address
        ({"endpoint": "tcp://127.0.0.1:16100"}, "own host"),  # the proxy's own loopback
        ({"endpoint": "tcp://*:16100"}, "not a host name"),
        ({**EVENTS, "replay_endpoint": "tcp://evil.example:17100"}, "own host"),
        ({"endpoint": "ipc:///tmp/events"}, "must be tcp://host:port"),
        ({"endpoint": "http://10.0.0.5:16100"}, "must be tcp://host:port"),
        ({"endpoint": "tcp://10.0.0.5"}, "has no port"),
        ({"endpoint": "tcp://10.0.0.5:70000"}, "1..65535"),
        ({"endpoint": "tcp://user@10.0.0.5:1"}, "not a host name"),
        ({"endpoint": "tcp://10.0.0.5:1", "replay_endpoint": "tcp://10.0.0.5:1"}, "different"),
        ({"replay_endpoint": "tcp://10.0.0.5:1"}, "endpoint is required"),
        ({**EVENTS, "topic": "x"}, "unknown keys ['topic']"),
        ("tcp://10.0.0.5:16100", "must be an object"),
    ],
)
def test_parse_refuses(value: object, reason: str) -> None:
    with pytest.raises(KvEventsError) as caught:
        parse_kv_events(value, URL)
    assert reason in str(caught.value)


def test_registry_keeps_the_endpoints_with_the_instance() -> None:
    registry = InstanceRegistry()
    instance = registry.add(URL, "prefill", EVENTS)
    assert instance.kv_events == KvEventsEndpoint(**EVENTS)
    assert registry.add("http://10.0.0.5:8101", "prefill").kv_events is None
    # An embedder passing the dataclass is held to the same rule.
    with pytest.raises(KvEventsError):
        registry.add("http://10.0.0.7:8100", "decode", KvEventsEndpoint(**EVENTS))
    assert registry.get("http://10.0.0.7:8100") is None


async def test_admin_registers_lists_and_refuses_foreign_hosts(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_proxy([], [])
    admin = f"{server.admin_url}/admin/instances"
    async with http.post(admin, json={"url": URL, "role": "prefill", "kv_events": EVENTS}) as r:
        assert r.status == 201
        assert (await r.json())["kv_events"] == EVENTS
    plain = {"url": "http://10.0.0.5:8200", "role": "decode", "kv_events": None}
    async with http.post(admin, json=plain) as r:
        assert r.status == 201
    foreign = {"endpoint": "tcp://10.9.9.9:16100", "replay_endpoint": "tcp://10.9.9.9:17100"}
    body = {"url": "http://10.0.0.6:8100", "role": "prefill", "kv_events": foreign}
    async with http.post(admin, json=body) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["param"] == "kv_events" and error["code"] == 400
    assert error["type"] == "BadRequestError" and "own host 10.0.0.6" in error["message"]
    assert server.registry.get("http://10.0.0.6:8100") is None  # nothing half-registered
    async with http.get(admin) as r:
        listed = {entry["url"]: entry["kv_events"] for entry in (await r.json())["instances"]}
    assert listed == {URL: EVENTS, "http://10.0.0.5:8200": None}


async def test_static_entries_show_in_admin_instances(http: aiohttp.ClientSession) -> None:
    entry: dict[str, Any] = {"url": URL, "kv_events": EVENTS}
    config = {
        "port": 0,
        "admin": {"port": 0},
        "health": {"interval_s": 60.0},
        "prefill": [entry, "http://10.0.0.5:8101"],
        "decode": ["http://10.0.0.5:8200"],
    }
    server = ProxyServer(ProxyConfig.model_validate(config))
    await server.start()
    try:
        async with http.get(f"{server.admin_url}/admin/instances") as r:
            listed = {e["url"]: e["kv_events"] for e in (await r.json())["instances"]}
    finally:
        await server.stop()
    assert listed == {URL: EVENTS, "http://10.0.0.5:8101": None, "http://10.0.0.5:8200": None}


def test_config_file_takes_urls_and_entries(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "prefill:\n"
        "  - 10.0.0.5:8101\n"
        "  - url: http://10.0.0.5:8100/\n"
        "    kv_events: {endpoint: 'tcp://10.0.0.5:16100', replay_endpoint: 'tcp://10.0.0.5:17100'}\n"
        "decode: [http://10.0.0.5:8200]\n"
    )
    config = load_proxy_config(path)
    assert config.prefill == ["http://10.0.0.5:8101", InstanceEntry(url=URL, kv_events=EVENTS)]
    assert config.decode == ["http://10.0.0.5:8200"]
    path.write_text(
        "prefill:\n  - url: http://10.0.0.5:8100\n    kv_events: {endpoint: 'tcp://10.0.0.9:1'}\n"
    )
    with pytest.raises(ValueError, match=r"prefill\.0\.entry: kv_events\.endpoint .* own host"):
        load_proxy_config(path)
    path.write_text("prefill:\n  - url: http://10.0.0.5:8100\n    kv_event: {}\n")
    with pytest.raises(ValueError, match=r"prefill\.0\.entry\.kv_event: unknown key"):
        load_proxy_config(path)
