"""TCP_NODELAY on both sides of the proxy, and pooled keep-alive upstream connections."""

from __future__ import annotations

import asyncio
import os
import socket

import aiohttp
import pytest
import uvloop
from conftest import ProxyFactory
from proxy_helpers import MODEL

from benchmarks.fake_worker import FakeWorker
from proxy.server import ProxyServer


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """These tests run on uvloop, the loop `pdserve proxy` runs on."""
    return uvloop.EventLoopPolicy()


BODY = {"model": MODEL, "prompt": "hello there", "max_tokens": 2, "stream": True}


def tcp_sockets() -> list[tuple[tuple[str, int], tuple[str, int], int]]:
    """(local address, peer address, TCP_NODELAY) of every connected TCP socket we hold."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET:
                continue
            local, peer = sock.getsockname(), sock.getpeername()
            nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            found.append((local, peer, nodelay))
        except OSError:
            pass  # listening or unconnected
        finally:
            sock.close()
    return found


async def test_tcp_nodelay_on_client_and_upstream_sockets(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker
) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(proxy.url + "/v1/completions", json=BODY) as response:
            assert response.status == 200
            await response.read()
        sockets = tcp_sockets()
        # The proxy's accepted client connection: local port is the proxy's.
        accepted = [s for s in sockets if s[0][1] == proxy.port]
        # The proxy's upstream connections: the peer is a worker.
        upstream = [s for s in sockets if s[1][1] in (prefill.port, decode.port)]
        assert accepted, sockets
        assert {s[1][1] for s in upstream} == {prefill.port, decode.port}, sockets
        for local, peer, nodelay in accepted + upstream:
            assert nodelay, f"TCP_NODELAY off on {local} -> {peer}"


async def test_upstream_connections_are_reused(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    for _ in range(5):
        async with http.post(proxy.url + "/v1/completions", json=BODY) as response:
            await response.read()
        async with http.post(proxy.url + "/v1/completions", json={**BODY, "stream": False}) as r:
            await r.read()
    for worker in (prefill, decode):
        peers = {r.peer for r in worker.generate_requests()}
        assert len(peers) == 1, f"{worker.role} saw {len(peers)} connections for 10 requests"


async def test_idle_upstream_connections_close_before_the_workers_keepalive(
    make_proxy: ProxyFactory, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    server = await make_proxy([], [decode], upstream_keepalive_s=0.2)
    async with http.post(server.url + "/v1/completions", json=BODY) as response:
        await response.read()
    local = decode.generate_requests()[0].peer
    assert local in [s[0] for s in tcp_sockets() if s[1][1] == decode.port]
    await asyncio.sleep(0.5)
    assert not [s for s in tcp_sockets() if s[1][1] == decode.port], "idle connection kept"
    async with http.post(server.url + "/v1/completions", json=BODY) as response:
        assert response.status == 200
    peers = [r.peer for r in decode.generate_requests()]
    assert peers[0] != peers[1]
    assert peers[0] == local
