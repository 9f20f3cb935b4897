"""Draining a decode instance loses no request (issue 11 item 4): nothing new is routed
there, the streams on it finish normally, and a stream still on it when its worker is
stopped (`pdserve scale` down after the drain timeout removes it first, `pdserve restart`
keeps it registered and drained) continues on another decode instance."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import MODEL, assert_no_load_left, metric_value, sse_events, wait_http

from deploy.worker_launch import free_port
from proxy.server import ProxyServer

COMPLETIONS = "/v1/completions"
TOKENS = 10
BODY: dict[str, Any] = {
    "model": MODEL,
    "prompt": "tell me about the sea",
    "max_tokens": TOKENS,
    "stream": True,
    "stream_options": {"include_usage": True},
}
FAKE_DECODE = [sys.executable, "-m", "benchmarks.fake_worker", "--role", "decode"]
# What the fake decode worker streams for BODY: " tok0" ... " tok9".
TEXT = "".join(f" tok{i}" for i in range(TOKENS))


def chunks(events: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in events if e != b"[DONE]"]


def assert_complete(events: list[bytes]) -> None:
    """One whole stream: every token once, usage for all of them, one [DONE], no error."""
    got = chunks(events)
    assert all("error" not in chunk for chunk in got), got
    assert events.count(b"[DONE]") == 1 and events[-1] == b"[DONE]"
    assert "".join(c["choices"][0]["text"] for c in got if c["choices"]) == TEXT
    assert got[-1]["usage"]["completion_tokens"] == TOKENS
    assert len({chunk["id"] for chunk in got}) == 1


def mid_stream_moves(server: ProxyServer, outcome: str) -> float:
    text = server.metrics.render().decode()
    return metric_value(text, "pdserve_migrations_total", stage="mid_stream", outcome=outcome)


async def admin(
    http: aiohttp.ClientSession, server: ProxyServer, method: str, path: str, **kw: Any
) -> tuple[int, Any]:
    assert server.admin_url is not None
    async with http.request(method, server.admin_url + path, **kw) as response:
        return response.status, await response.json()


async def read_events(response: aiohttp.ClientResponse, count: int) -> bytes:
    """Read until ``count`` whole SSE events have arrived; the bytes read so far."""
    data = b""
    while data.count(b"\n\n") < count:
        more = await response.content.readany()
        assert more, f"stream ended after {data!r}"
        data += more
    return data


async def test_draining_decode_finishes_its_stream_and_gets_nothing_new(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    draining = await make_worker("decode", token_delay_s=0.05)
    other = await make_worker("decode")
    server = await make_proxy([await make_worker("prefill")], [draining, other])
    async with http.post(server.url + COMPLETIONS, json=BODY) as streaming:
        head = await read_events(streaming, 2)  # round robin: the first goes to `draining`
        assert len(draining.generate_requests()) == 1

        status, view = await admin(
            http, server, "POST", "/admin/instances/drain", json={"url": draining.url}
        )
        assert status == 200 and view["draining"] is True
        assert view["in_flight_requests"] == 1  # the stream is still on it
        for _ in range(3):
            async with http.post(server.url + COMPLETIONS, json=BODY) as response:
                assert response.status == 200
                assert_complete(sse_events(await response.read()))
        assert len(draining.generate_requests()) == 1  # nothing new was routed there
        assert len(other.generate_requests()) == 3

        events = sse_events(head + await streaming.read())
    assert_complete(events)
    assert draining.disconnects == 0  # it ended the stream itself, not moved
    assert mid_stream_moves(server, "succeeded") == mid_stream_moves(server, "failed") == 0
    status, view = await admin(http, server, "GET", "/admin/instances")
    [entry] = [i for i in view["instances"] if i["url"] == draining.url]
    assert entry["draining"] is True and entry["in_flight_requests"] == 0
    await assert_no_load_left(server)


@pytest.fixture
def killable_decode() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A fake decode worker in a process of its own, so that it can be killed as a stopped
    vLLM worker is: its connections reset, nothing ends them politely."""
    port = free_port()
    proc = subprocess.Popen(
        [*FAKE_DECODE, "--port", str(port), "--token-delay-ms", "50"],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health")
        yield url, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("how", ["scale-down", "restart"])
async def test_stream_on_a_drained_decode_whose_worker_stops_moves_to_another(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    killable_decode: tuple[str, subprocess.Popen[bytes]],
    how: str,
) -> None:
    """What happens after the drain timeout: `scale` removes the instance from the proxy
    and stops it; `restart` stops its worker while it stays registered and drained."""
    url, proc = killable_decode
    other = await make_worker("decode")
    server = await make_proxy([await make_worker("prefill")], [url, other])
    async with http.post(server.url + COMPLETIONS, json=BODY) as streaming:
        head = await read_events(streaming, 3)  # round robin: the first goes to `url`
        assert other.generate_requests() == []
        status, _ = await admin(http, server, "POST", "/admin/instances/drain", json={"url": url})
        assert status == 200
        if how == "scale-down":
            status, view = await admin(
                http, server, "DELETE", "/admin/instances", params={"url": url}
            )
            assert status == 200 and view["in_flight_requests"] == 1
        proc.send_signal(signal.SIGKILL)
        events = sse_events(head + await streaming.read())
    assert_complete(events)
    # The rest came from the other decode instance, continued from the tokens sent.
    [continuation] = other.generate_requests()
    assert continuation.body["max_tokens"] < TOKENS
    assert mid_stream_moves(server, "succeeded") == 1
    assert (server.registry.get(url) is None) == (how == "scale-down")
    await assert_no_load_left(server)
    # Drained, a stopped instance gets nothing new; the other serves.
    async with http.post(server.url + COMPLETIONS, json=BODY) as response:
        assert response.status == 200
        assert_complete(sse_events(await response.read()))
    assert len(other.generate_requests()) == 2


async def test_undrained_decode_is_routed_again(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    """After a planned restart the controller puts the instance back in rotation."""
    restarted, other = await make_worker("decode"), await make_worker("decode")
    server = await make_proxy([], [restarted, other])
    await admin(http, server, "POST", "/admin/instances/drain", json={"url": restarted.url})
    for _ in range(2):
        async with http.post(server.url + COMPLETIONS, json=BODY) as response:
            await response.read()
    assert restarted.generate_requests() == []
    status, view = await admin(
        http, server, "POST", "/admin/instances/undrain", json={"url": restarted.url}
    )
    assert status == 200 and view["draining"] is False and view["healthy"] is True
    for _ in range(4):
        async with http.post(server.url + COMPLETIONS, json=BODY) as response:
            assert_complete(sse_events(await response.read()))
    assert len(restarted.generate_requests()) == 2
    assert len(other.generate_requests()) == 4
