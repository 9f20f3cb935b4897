"""Only the proxy sets kv_transfer_params, and it says what the decode did with the KV."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import MODEL, kv_params_at, metric_value

from benchmarks.fake_worker import FakeWorker
from deploy.worker_launch import free_port
from kv_transfer.block_server import BlockServer
from kv_transfer.leases import LeaseTable
from proxy.server import ProxyServer

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
def held_lease(kv_server: tuple[BlockServer, LeaseTable]) -> tuple[BlockServer, LeaseTable]:
    """A real KV block server whose lease table holds request ``held-1`` for a minute."""
    server, leases = kv_server
    leases.add("held-1", [1, 2], time.time() + 60)
    return server, leases


async def _until(condition: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    """Waits on a condition, never on a guess of how long it takes; the bound only ends a
    failing test."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {within_s} s"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("failure", ["decode-500", "decode-unreachable", "no-decode-left"])
async def test_failed_decode_leg_releases_the_prefill_blocks_at_once(
    make_worker: WorkerFactory,
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    held_lease: tuple[BlockServer, LeaseTable],
    failure: str,
) -> None:
    server, leases = held_lease
    prefill = await make_worker("prefill", kv_params_override=_params_naming(server))
    decode = await make_worker("decode", tokens=4)
    decode_urls: list[FakeWorker | str] = [decode]
    if failure == "decode-500":
        decode.faults.fail_requests = 1
    elif failure == "decode-unreachable":
        decode_urls = [f"http://127.0.0.1:{free_port()}"]
    proxy = await make_proxy([prefill], decode_urls)
    if failure == "no-decode-left":
        prefill.faults.gate = asyncio.Event()

    async def post() -> int:
        async with http.post(proxy.url + "/v1/completions", json=_body()) as response:
            return response.status

    answer = asyncio.create_task(post())
    if failure == "no-decode-left":
        # The decode pool empties while the prefill leg is inside the prefill worker.
        await _until(lambda: bool(prefill.generate_requests()), "the prefill leg arrived")
        proxy.registry.drain(decode.url)
        prefill.faults.gate.set()
    status = await answer
    if failure == "decode-unreachable":
        # No decode accepts a connection: the prefill instance serves it whole.
        assert status == 200
    else:
        assert status >= 500
    # The release runs in the background; the bound only matters when it never comes.
    await _until(lambda: not len(leases), "the prefill released the blocks of the failed leg")
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
    return {**kv_params_at(server.port), "remote_request_id": "held-1"}
