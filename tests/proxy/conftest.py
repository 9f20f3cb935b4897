"""Fixtures for the proxy's fast tests: in-process fake vLLM workers and a real
ProxyServer listening on ephemeral ports, driven over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from proxy_helpers import KV_SECRET

from benchmarks.fake_worker import FakeWorker
from proxy.config import ProxyConfig
from proxy.server import ProxyServer

if TYPE_CHECKING:
    from kv_transfer.block_server import BlockServer
    from kv_transfer.leases import LeaseTable

WorkerFactory = Callable[..., Awaitable[FakeWorker]]
ProxyFactory = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
async def make_worker() -> AsyncIterator[WorkerFactory]:
    started: list[FakeWorker] = []

    async def make(role: str = "decode", **kwargs: Any) -> FakeWorker:
        worker = FakeWorker(role, **kwargs)
        await worker.start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        await worker.stop()


@pytest.fixture
async def prefill(make_worker: WorkerFactory) -> FakeWorker:
    return await make_worker("prefill")


@pytest.fixture
async def decode(make_worker: WorkerFactory) -> FakeWorker:
    return await make_worker("decode", tokens=4)


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    started: list[ProxyServer] = []

    async def make(
        prefill: list[FakeWorker | str] | None = None,
        decode: list[FakeWorker | str] | None = None,
        **overrides: Any,
    ) -> ProxyServer:
        settings: dict[str, Any] = {
            "port": 0,
            "prefill": [w if isinstance(w, str) else w.url for w in prefill or []],
            "decode": [w if isinstance(w, str) else w.url for w in decode or []],
            "prefill_policy": {"name": "round_robin"},
            "decode_policy": {"name": "round_robin"},
            "admin": {"port": 0},
            # Long by default so checks do not interfere; health tests shorten it.
            "health": {"interval_s": 60.0},
        }
        settings.update(overrides)
        server = ProxyServer(ProxyConfig.model_validate(settings))
        await server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, prefill: FakeWorker, decode: FakeWorker) -> ProxyServer:
    """One prefill and one decode instance, disaggregating every prompt."""
    return await make_proxy([prefill], [decode])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def kv_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[BlockServer, LeaseTable]]:
    """A real KV block server (and its lease table) that shares the secret proxies started
    afterwards read from the environment, so their releases reach it. Point a fake prefill's
    ``kv_transfer_params`` at it with ``kv_params_at(server.port)``."""
    # Imported here: torch is slow to import and most proxy tests never need it.
    import torch

    from kv_transfer import wire
    from kv_transfer.block_server import BlockServer, ServerSettings
    from kv_transfer.device import KVCacheAccess
    from kv_transfer.leases import LeaseTable

    monkeypatch.setenv("PDSERVE_KV_SECRET", KV_SECRET.decode())
    layers = [torch.zeros(8, 1, 32, 64, dtype=torch.float16)]
    leases = LeaseTable()
    fingerprint = wire.KVFingerprint("fake-model", "torch.float16", 32, "LBHNC", 1, (1, 32, 64))
    server = BlockServer(
        ServerSettings("127.0.0.1", 0, KV_SECRET), fingerprint, KVCacheAccess(layers), leases
    )
    server.start()
    try:
        yield server, leases
    finally:
        server.stop()
