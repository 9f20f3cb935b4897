"""Only the proxy sets kv_transfer_params, and it says what the decode did with the KV."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest
import torch
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import MODEL, metric_value

from benchmarks.fake_worker import FakeWorker
from deploy.worker_launch import free_port
from kv_transfer import params as kvp
from kv_transfer import wire
from kv_transfer.block_server import BlockServer, ServerSettings
from kv_transfer.device import KVCacheAccess
from kv_transfer.leases import LeaseTable
from proxy.server import ProxyServer

SECRET = b"proxy-test-secret"

FORGED = {
    "do_remote_prefill": True,
    "remote_host": "198.51.100.7",
    "remote_port": 6666,
    "remote_request_id": "victim",
    "remote_block_ids": [1, 2, 3],
}
LONG_PROMPT = "tell me a story about a cat " * 8


def _body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 3, **extra}


@pytest.mark.parametrize(
    "case",
    ["disaggregated", "n>1", "short-prompt", "no-prefill"],
)
async def test_client_kv_transfer_params_never_reach_a_worker(
    make_worker: WorkerFactory,
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    case: str,
) -> None:
    prefill = await make_worker("prefill")
    decode = await make_worker("decode", tokens=4)
    overrides: dict[str, object] = {}
    extra: dict[str, object] = {}
    if case == "n>1":
        extra["n"] = 2
    elif case == "short-prompt":
        overrides["disagg_min_prompt_tokens"] = 10_000
    proxy = await make_proxy([] if case == "no-prefill" else [prefill], [decode], **overrides)
    body = _body(kv_transfer_params=FORGED, ec_transfer_params={"x": 1}, **extra)
    async with http.post(proxy.url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
    legs = prefill.generate_requests() + decode.generate_requests()
    assert legs
    for leg in legs:
        assert "ec_transfer_params" not in leg.body
        params = leg.body.get("kv_transfer_params")
        assert params != FORGED
        if params is not None:  # only what the proxy itself put there
            assert params in ({"do_remote_decode": True}, *prefill.kv_issued)


@pytest.mark.parametrize(
    ("reported", "outcome"),
    [("transferred", "transferred"), ("recomputed", "recomputed"), (None, "unreported")],
)
async def test_non_streamed_handoff_outcome_is_counted(
    make_worker: WorkerFactory,
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    prefill: FakeWorker,
    reported: str | None,
    outcome: str,
) -> None:
    decode = await make_worker("decode", tokens=4, kv_outcome=reported)
    proxy = await make_proxy([prefill], [decode])
    async with http.post(proxy.url + "/v1/completions", json=_body()) as response:
        assert response.status == 200
    text = proxy.metrics.render().decode()
    assert metric_value(text, "pdserve_kv_handoffs_total", outcome=outcome) == 1
    others = {"transferred", "local_cache", "recomputed", "unreported"} - {outcome}
    assert all(metric_value(text, "pdserve_kv_handoffs_total", outcome=o) == 0 for o in others)


async def test_streamed_handoff_counts_as_unreported(
    proxy: ProxyServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(proxy.url + "/v1/completions", json=_body(stream=True)) as response:
        assert response.status == 200
        await response.read()
    text = proxy.metrics.render().decode()
    assert metric_value(text, "pdserve_kv_handoffs_total", outcome="unreported") == 1


@pytest.fixture
def held_lease() -> Iterator[tuple[BlockServer, LeaseTable]]:
    """A real KV block server whose lease table holds request ``held-1`` for a minute."""
    layers = [torch.zeros(8, 1, 32, 64, dtype=torch.float16)]
    leases = LeaseTable()
    fingerprint = wire.KVFingerprint("fake-model", "torch.float16", 32, "LBHNC", 1, (1, 32, 64))
    server = BlockServer(
        ServerSettings("127.0.0.1", 0, SECRET), fingerprint, KVCacheAccess(layers), leases
    )
    server.start()
    leases.add("held-1", [1, 2], time.time() + 60)
    try:
        yield server, leases
    finally:
        server.stop()


@pytest.mark.parametrize("failure", ["decode-500", "decode-unreachable", "no-decode-left"])
async def test_failed_decode_leg_releases_the_prefill_blocks_at_once(
    make_worker: WorkerFactory,
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    held_lease: tuple[BlockServer, LeaseTable],
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    server, leases = held_lease
    monkeypatch.setenv("PDSERVE_KV_SECRET", SECRET.decode())
    prefill = await make_worker("prefill", kv_params_override=_params_naming(server))
    decode = await make_worker("decode", tokens=4)
    decode_urls: list[FakeWorker | str] = [decode]
    if failure == "decode-500":
        decode.faults.fail_requests = 1
    elif failure == "decode-unreachable":
        decode_urls = [f"http://127.0.0.1:{free_port()}"]
    proxy = await make_proxy([prefill], decode_urls)
    if failure == "no-decode-left":
        # The decode pool empties while the prefill leg runs.
        prefill.faults.delay_s = 0.3
        asyncio.get_running_loop().call_later(0.1, proxy.registry.drain, decode.url)
    async with http.post(proxy.url + "/v1/completions", json=_body()) as response:
        assert response.status >= 500
    for _ in range(100):  # the release runs in the background: allow it up to 2 s
        if not len(leases):
            break
        await asyncio.sleep(0.02)
    assert len(leases) == 0, "the prefill still holds the blocks of a failed decode leg"
    text = proxy.metrics.render().decode()
    assert metric_value(text, "pdserve_kv_releases_total", outcome="released") == 1


async def test_completed_decode_leg_sends_no_release(
    make_worker: WorkerFactory,
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    held_lease: tuple[BlockServer, LeaseTable],
) -> None:
    server, leases = held_lease
    prefill = await make_worker("prefill", kv_params_override=_params_naming(server))
    decode = await make_worker("decode", tokens=4)
    proxy = await make_proxy([prefill], [decode])
    async with http.post(proxy.url + "/v1/completions", json=_body()) as response:
        assert response.status == 200
    await asyncio.sleep(0.2)
    assert len(leases) == 1  # the decode worker releases after its pull, not the proxy
    text = proxy.metrics.render().decode()
    assert all(
        metric_value(text, "pdserve_kv_releases_total", outcome=o) == 0
        for o in ("released", "not_held", "failed")
    )


def _params_naming(server: BlockServer) -> dict[str, object]:
    """kv_transfer_params fields that point a fake prefill's answer at the held lease."""
    return {
        "transfer_mode": kvp.TRANSFER_MODE,
        "remote_host": "127.0.0.1",
        "remote_port": server.port,
        "remote_request_id": "held-1",
    }
