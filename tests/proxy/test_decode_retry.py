"""A decode leg that fails before the client has a byte moves to another decode instance,
with a fresh prefill leg; the first prefill's KV is released at once (``retries`` config)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import (
    MODEL,
    assert_no_load_left,
    kv_params_at,
    kv_releases,
    metric_value,
    sse_events,
    wait_for,
    was_released,
)

from benchmarks.fake_worker import FakeWorker
from deploy.worker_launch import free_port
from kv_transfer.block_server import BlockServer
from kv_transfer.leases import LeaseTable
from proxy.server import ProxyServer

COMPLETIONS = "/v1/completions"
BODY = {"model": MODEL, "prompt": "a prompt of some length", "max_tokens": 4}
TEXT = " tok0 tok1 tok2 tok3"
KVServer = tuple[BlockServer, LeaseTable]


@pytest.fixture
async def kv_prefill(make_worker: WorkerFactory, kv_server: KVServer) -> FakeWorker:
    """A prefill whose kv_transfer_params point at the real block server of ``kv_server``."""
    return await make_worker("prefill", kv_params_override=kv_params_at(kv_server[0].port))


def dead_url() -> str:
    """An instance URL nothing listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def metric(server: ProxyServer, name: str, **labels: str) -> float:
    return metric_value(server.metrics.render().decode(), name, **labels)


def migrations(server: ProxyServer, outcome: str) -> float:
    return metric(server, "pdserve_migrations_total", stage="before_first_byte", outcome=outcome)


async def post(
    http: aiohttp.ClientSession, server: ProxyServer, stream: bool = False, **extra: Any
) -> tuple[int, bytes]:
    async with http.post(
        server.url + COMPLETIONS, json={**BODY, "stream": stream, **extra}
    ) as response:
        return response.status, await response.read()


def answer_text(payload: bytes, stream: bool) -> str:
    if not stream:
        return str(orjson.loads(payload)["choices"][0]["text"])
    events = sse_events(payload)
    assert events[-1] == b"[DONE]"
    return "".join(orjson.loads(e)["choices"][0]["text"] for e in events[:-1])


async def test_connect_refused_moves_to_another_decode_with_a_fresh_prefill(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    kv_prefill: FakeWorker,
    kv_server: KVServer,
    http: aiohttp.ClientSession,
) -> None:
    alive = await make_worker("decode")
    dead = dead_url()
    server = await make_proxy([kv_prefill], [dead, alive])  # round robin tries dead first
    status, payload = await post(http, server)
    assert status == 200 and answer_text(payload, False) == TEXT
    first, second = kv_prefill.kv_issued
    assert first["remote_request_id"] != second["remote_request_id"]
    [leg] = alive.generate_requests()
    assert leg.body["kv_transfer_params"] == second
    await wait_for(lambda: kv_releases(server, "not_held") == 1)
    assert was_released(kv_server[1], first) and not was_released(kv_server[1], second)
    # Only one instance failed, and only its connection failure counts against its health.
    assert server.registry.require(dead).consecutive_failures >= 1
    assert server.registry.require(alive.url).consecutive_failures == 0
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    assert migrations(server, "succeeded") == 1 and migrations(server, "failed") == 0
    assert metric(server, "pdserve_migrations_total", stage="mid_stream", outcome="failed") == 0
    labels = {"endpoint": "completions", "model": MODEL, "status": "200"}
    assert metric(server, "pdserve_requests_total", path="disaggregated", **labels) == 1
    await assert_no_load_left(server)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("stream", [False, True])
async def test_decode_5xx_answer_moves_to_another_decode(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    kv_prefill: FakeWorker,
    kv_server: KVServer,
    http: aiohttp.ClientSession,
    status: int,
    stream: bool,
) -> None:
    failing, healthy = await make_worker("decode"), await make_worker("decode")
    failing.faults.fail_requests, failing.faults.fail_status = 1, status
    server = await make_proxy([kv_prefill], [failing, healthy])
    answer, payload = await post(http, server, stream)
    assert answer == 200 and answer_text(payload, stream) == TEXT
    assert len(failing.generate_requests()) == len(healthy.generate_requests()) == 1
    first, second = kv_prefill.kv_issued
    assert failing.generate_requests()[0].body["kv_transfer_params"] == first
    assert healthy.generate_requests()[0].body["kv_transfer_params"] == second
    await wait_for(lambda: kv_releases(server, "not_held") == 1)
    assert was_released(kv_server[1], first) and not was_released(kv_server[1], second)
    # An error answer is no connection failure: health checks judge the instance.
    assert server.registry.require(failing.url).consecutive_failures == 0
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    assert migrations(server, "succeeded") == 1
    await assert_no_load_left(server)


@pytest.mark.parametrize("stream", [False, True])
async def test_first_byte_timeout_moves_to_another_decode(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    kv_prefill: FakeWorker,
    kv_server: KVServer,
    http: aiohttp.ClientSession,
    stream: bool,
) -> None:
    slow, fast = await make_worker("decode"), await make_worker("decode")
    if stream:
        slow.faults.first_chunk_delay_s = 5.0  # headers at once, no token
    else:
        slow.faults.delay_s = 5.0
    server = await make_proxy([kv_prefill], [slow, fast], timeouts={"first_byte_s": 0.2})
    status, payload = await post(http, server, stream)
    assert status == 200 and answer_text(payload, stream) == TEXT
    await wait_for(lambda: slow.disconnects == 1)  # the slow leg was abandoned, not left running
    first, second = kv_prefill.kv_issued
    assert fast.generate_requests()[0].body["kv_transfer_params"] == second
    await wait_for(lambda: kv_releases(server, "not_held") == 1)
    assert was_released(kv_server[1], first)
    assert metric(server, "pdserve_timeouts_total", stage="first_byte") == 1
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    assert migrations(server, "succeeded") == 1
    await assert_no_load_left(server)


async def test_stream_reset_before_its_first_chunk_moves_to_another_decode(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    cut, whole = await make_worker("decode"), await make_worker("decode")
    cut.faults.drop_after_chunks = 0  # headers, then the connection is cut
    server = await make_proxy([prefill], [cut, whole])
    status, payload = await post(http, server, stream=True)
    assert status == 200 and answer_text(payload, True) == TEXT
    assert len(prefill.generate_requests()) == 2
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    await assert_no_load_left(server)


async def test_aggregated_request_moves_to_another_decode_with_the_clients_bytes(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    failing, healthy = await make_worker("decode"), await make_worker("decode")
    failing.faults.fail_requests, failing.faults.fail_status = 1, 503
    server = await make_proxy([], [failing, healthy])
    status, payload = await post(http, server)
    assert status == 200 and answer_text(payload, False) == TEXT
    [leg] = healthy.generate_requests()
    assert leg.body == {**BODY, "stream": False}  # no kv_transfer_params: nothing prefilled
    labels = {"endpoint": "completions", "model": MODEL, "status": "200", "path": "aggregated"}
    assert metric(server, "pdserve_requests_total", **labels) == 1
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    assert all(kv_releases(server, o) == 0 for o in ("released", "not_held", "failed"))
    await assert_no_load_left(server)


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_client_error_is_relayed_without_moving(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
    stream: bool,
) -> None:
    refusing, other = await make_worker("decode"), await make_worker("decode")
    refusing.faults.fail_requests, refusing.faults.fail_status = 1, 400
    server = await make_proxy([prefill], [refusing, other])
    status, payload = await post(http, server, stream)
    assert status == 400
    assert orjson.loads(payload)["error"]["message"] == "injected failure 400"
    assert other.generate_requests() == []
    assert len(prefill.generate_requests()) == 1
    assert metric(server, "pdserve_retries_total", stage="decode") == 0
    assert migrations(server, "succeeded") == migrations(server, "failed") == 0
    await assert_no_load_left(server)


async def test_moves_are_bounded_and_never_revisit_an_instance(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    kv_prefill: FakeWorker,
    kv_server: KVServer,
    http: aiohttp.ClientSession,
) -> None:
    decodes = [await make_worker("decode") for _ in range(4)]
    for worker in decodes:
        worker.faults.fail_requests, worker.faults.fail_status = 5, 503
    server = await make_proxy([kv_prefill], decodes, retries={"decode_attempts": 3})
    status, payload = await post(http, server)
    assert status == 503  # the last attempt's answer, relayed as it came
    assert orjson.loads(payload)["error"]["message"] == "injected failure 503"
    legs = [len(worker.generate_requests()) for worker in decodes]
    assert sorted(legs) == [0, 1, 1, 1]
    # One fresh prefill leg per decode attempt, each released as soon as its decode failed.
    assert len(kv_prefill.kv_issued) == 3
    await wait_for(lambda: kv_releases(server, "not_held") == 3)
    assert all(was_released(kv_server[1], params) for params in kv_prefill.kv_issued)
    assert metric(server, "pdserve_retries_total", stage="decode") == 2
    assert migrations(server, "failed") == 2 and migrations(server, "succeeded") == 0
    await assert_no_load_left(server)


async def test_no_untried_decode_left_ends_with_the_last_error(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    failing = await make_worker("decode")
    failing.faults.fail_requests, failing.faults.fail_status = 5, 503
    dead = dead_url()
    server = await make_proxy([prefill], [dead, failing], retries={"decode_attempts": 5})
    status, payload = await post(http, server)
    # Refused, then 503: two instances, two attempts, and the client gets the 503.
    assert status == 503
    assert orjson.loads(payload)["error"]["message"] == "injected failure 503"
    assert len(failing.generate_requests()) == 1
    # No third prefill leg: nothing untried was left to decode it.
    assert len(prefill.generate_requests()) == 2
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    assert migrations(server, "failed") == 1
    await assert_no_load_left(server)


async def test_one_decode_attempt_means_no_move(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    alive = await make_worker("decode")
    server = await make_proxy([prefill], [dead_url(), alive], retries={"decode_attempts": 1})
    status, payload = await post(http, server)
    assert status == 502 and "cannot connect to decode instance" in payload.decode()
    assert alive.generate_requests() == []
    assert metric(server, "pdserve_retries_total", stage="decode") == 0
    await assert_no_load_left(server)


async def test_no_move_once_the_backoff_would_pass_the_deadline(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    alive = await make_worker("decode")
    retries = {"backoff_s": 5.0, "backoff_max_s": 5.0, "deadline_s": 2.0}
    server = await make_proxy([prefill], [dead_url(), alive], retries=retries)
    status, payload = await post(http, server)
    assert status == 502 and "cannot connect to decode instance" in payload.decode()
    assert alive.generate_requests() == []
    assert len(prefill.generate_requests()) == 1
    assert metric(server, "pdserve_retries_total", stage="decode") == 0
    await assert_no_load_left(server)


@pytest.mark.parametrize("stream", [False, True])
async def test_deadline_cuts_the_first_byte_wait_and_stops_further_attempts(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
    stream: bool,
) -> None:
    hung, idle = await make_worker("decode"), await make_worker("decode")
    hung.faults.hang = True
    server = await make_proxy(
        [prefill],
        [hung, idle],
        timeouts={"first_byte_s": 30.0},
        retries={"deadline_s": 0.5},
    )
    status, payload = await post(http, server, stream)
    assert status == 504
    message = orjson.loads(payload)["error"]["message"]
    assert "sent nothing within" in message and "request's 0.5s" in message
    assert idle.generate_requests() == []
    assert len(prefill.generate_requests()) == 1
    await wait_for(lambda: hung.disconnects == 1)
    assert metric(server, "pdserve_retries_total", stage="decode") == 0
    await assert_no_load_left(server)


async def test_mid_stream_drop_is_not_moved_with_mid_stream_off(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    # With it on, test_mid_stream_migration.py: the answer continues elsewhere.
    dropping, other = await make_worker("decode"), await make_worker("decode")
    dropping.faults.drop_after_chunks = 2
    server = await make_proxy([prefill], [dropping, other], retries={"mid_stream": False})
    status, payload = await post(http, server, stream=True)
    assert status == 200  # the stream had started
    events = sse_events(payload)
    assert [orjson.loads(e)["choices"][0]["text"] for e in events[:2]] == [" tok0", " tok1"]
    error = orjson.loads(events[2])["error"]
    assert error["code"] == 502 and "decode instance" in error["message"]
    assert events[3:] == [b"[DONE]"]
    assert other.generate_requests() == []
    assert len(prefill.generate_requests()) == 1
    assert metric(server, "pdserve_retries_total", stage="decode") == 0
    assert migrations(server, "succeeded") == migrations(server, "failed") == 0
    await assert_no_load_left(server)


async def test_a_move_is_logged_once_with_request_instance_and_reason(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing, healthy = await make_worker("decode"), await make_worker("decode")
    failing.faults.fail_requests, failing.faults.fail_status = 1, 503
    server = await make_proxy([prefill], [failing, healthy])
    with caplog.at_level("WARNING", logger="proxy.pd_flow"):
        async with http.post(server.url + COMPLETIONS, json=BODY) as response:
            assert response.status == 200
            request_id = response.headers["X-Request-Id"]
    [record] = [r for r in caplog.records if r.name == "proxy.pd_flow"]
    assert record.levelname == "WARNING" and record.exc_info is None
    text = record.getMessage()
    assert request_id in text and failing.url in text and "HTTP 503" in text
