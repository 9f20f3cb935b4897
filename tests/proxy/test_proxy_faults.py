"""Failures: retries, per-stage timeouts, dropped streams, disconnects, ejection.

Moving a request to another decode instance is covered in depth by test_decode_retry.py."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import (
    MODEL,
    kv_params_at,
    kv_releases,
    metric_value,
    sse_events,
    wait_for,
    was_released,
)

from benchmarks.fake_worker import FakeWorker
from kv_transfer.block_server import BlockServer
from kv_transfer.leases import LeaseTable
from proxy.server import ProxyServer

COMPLETIONS = "/v1/completions"
BODY = {"model": MODEL, "prompt": "a prompt of some length", "max_tokens": 4}
STREAM_BODY = {**BODY, "stream": True}


async def metrics_text(server: ProxyServer, http: aiohttp.ClientSession) -> str:
    async with http.get(server.url + "/metrics") as response:
        return await response.text()


# -- prefill retry ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_failed_prefill_is_retried_once_on_another_instance(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    status: int,
) -> None:
    first, second = await make_worker("prefill"), await make_worker("prefill")
    server = await make_proxy([first, second], [decode])
    first.faults.fail_requests, first.faults.fail_status = 1, status
    async with http.post(server.url + COMPLETIONS, json=BODY) as response:
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
    assert len(first.generate_requests()) == 1
    assert len(second.generate_requests()) == 1
    assert second.generate_requests()[0].headers["X-Request-Id"] == request_id
    # Only the successful prefill's parameters reach the decode instance.
    assert first.kv_issued == []
    assert decode.generate_requests()[0].body["kv_transfer_params"] == second.kv_issued[0]
    assert (
        metric_value(await metrics_text(server, http), "pdserve_retries_total", stage="prefill")
        == 1
    )


async def test_prefill_without_kv_transfer_params_counts_as_failed(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    first, second = await make_worker("prefill"), await make_worker("prefill")
    first.faults.omit_kv_transfer_params = True
    server = await make_proxy([first, second], [decode])
    async with http.post(server.url + COMPLETIONS, json=BODY) as response:
        assert response.status == 200
    assert decode.generate_requests()[0].body["kv_transfer_params"] == second.kv_issued[0]


async def test_prefill_failing_twice_is_a_502_and_decode_is_never_called(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    first, second = await make_worker("prefill"), await make_worker("prefill")
    for worker in (first, second):
        worker.faults.fail_requests = 5
    server = await make_proxy([first, second], [decode])
    async with http.post(server.url + COMPLETIONS, json=STREAM_BODY) as response:
        assert response.status == 502
        error = (await response.json())["error"]
    assert error["code"] == 502 and error["type"] == "BadGatewayError"
    assert "prefill instance" in error["message"]
    assert len(first.generate_requests()) + len(second.generate_requests()) == 2
    assert decode.generate_requests() == []


async def test_prefill_client_error_is_relayed_without_retry(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    first, second = await make_worker("prefill"), await make_worker("prefill")
    first.faults.fail_requests, first.faults.fail_status = 1, 400
    server = await make_proxy([first, second], [decode])
    async with http.post(server.url + COMPLETIONS, json=BODY) as response:
        assert response.status == 400
        assert (await response.json())["error"]["message"] == "injected failure 400"
    assert second.generate_requests() == []
    assert decode.generate_requests() == []


async def test_dead_prefill_instance_is_skipped_by_retry(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    dead, alive = await make_worker("prefill"), await make_worker("prefill")
    server = await make_proxy([dead, alive], [decode])
    await dead.stop()  # connection refused from now on
    async with http.post(server.url + COMPLETIONS, json=BODY) as response:
        assert response.status == 200
    assert len(alive.generate_requests()) == 1


# -- a failed decode leg moves to another decode instance with a fresh prefill leg ----


async def test_kv_transfer_params_never_go_to_a_second_decode_instance(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    kv_server: tuple[BlockServer, LeaseTable],
    http: aiohttp.ClientSession,
) -> None:
    block_server, leases = kv_server
    prefill = await make_worker("prefill", kv_params_override=kv_params_at(block_server.port))
    first, second = await make_worker("decode"), await make_worker("decode")
    server = await make_proxy([prefill], [first, second])
    await first.stop()  # connection refused from now on
    async with http.post(server.url + COMPLETIONS, json=BODY) as response:
        assert response.status == 200
    # The second decode got the params of a second, fresh prefill leg, not the first's.
    assert len(prefill.generate_requests()) == 2
    issued_first, issued_second = prefill.kv_issued
    assert issued_first["remote_request_id"] != issued_second["remote_request_id"]
    [leg] = second.generate_requests()
    assert leg.body["kv_transfer_params"] == issued_second
    # The first leg's blocks were released at once; the second leg's are the decode's.
    await wait_for(lambda: kv_releases(server, "not_held") == 1)
    assert kv_releases(server, "released") == kv_releases(server, "failed") == 0
    assert was_released(leases, issued_first)
    assert not was_released(leases, issued_second)


# -- timeouts --------------------------------------------------------------------------


async def test_prefill_timeout_is_a_504(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    prefill.faults.hang = True
    server = await make_proxy([prefill], [decode], timeouts={"prefill_s": 0.2})
    async with http.post(server.url + COMPLETIONS, json=BODY) as response:
        assert response.status == 504
        error = (await response.json())["error"]
    assert error["type"] == "GatewayTimeoutError" and "0.2s" in error["message"]
    assert decode.generate_requests() == []
    await wait_for(lambda: prefill.disconnects == 1)  # the hung leg was cancelled
    assert (
        metric_value(await metrics_text(server, http), "pdserve_timeouts_total", stage="prefill")
        == 1
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_first_byte_timeout_is_a_504(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    stream: bool,
) -> None:
    if stream:
        decode.faults.first_chunk_delay_s = 5.0  # headers come at once, tokens do not
    else:
        decode.faults.delay_s = 5.0
    server = await make_proxy([prefill], [decode], timeouts={"first_byte_s": 0.2})
    async with http.post(server.url + COMPLETIONS, json={**BODY, "stream": stream}) as response:
        assert response.status == 504
        assert response.content_type == "application/json"
        assert "sent nothing within 0.2s" in (await response.json())["error"]["message"]
    await wait_for(lambda: decode.disconnects == 1)
    text = await metrics_text(server, http)
    assert metric_value(text, "pdserve_timeouts_total", stage="first_byte") == 1
    # No other decode instance to move to: the one attempt's error is the answer.
    assert metric_value(text, "pdserve_retries_total", stage="decode") == 0
    assert len(prefill.generate_requests()) == 1


async def test_stall_mid_stream_ends_with_an_sse_error_then_done(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    decode.faults.stall_after_chunks = 2
    server = await make_proxy([prefill], [decode], timeouts={"stall_s": 0.5})
    async with http.post(server.url + COMPLETIONS, json=STREAM_BODY) as response:
        assert response.status == 200  # the stream had started
        events = sse_events(await response.read())
    assert len(events) == 4
    assert [orjson.loads(e)["choices"][0]["text"] for e in events[:2]] == [" tok0", " tok1"]
    error = orjson.loads(events[2])["error"]
    assert error["code"] == 504 and "stalled" in error["message"]
    assert events[3] == b"[DONE]"
    await wait_for(lambda: decode.disconnects == 1)
    assert (
        metric_value(await metrics_text(server, http), "pdserve_timeouts_total", stage="stall") == 1
    )


async def test_connect_timeout_is_a_504(
    make_proxy: ProxyFactory, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    # A listener whose accept queue is full drops further SYNs: connects hang.
    import socket

    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        server = await make_proxy([], [f"http://127.0.0.1:{port}"], timeouts={"connect_s": 0.2})
        async with http.post(server.url + COMPLETIONS, json=BODY) as response:
            assert response.status == 504
            assert "timed out" in (await response.json())["error"]["message"]
        text = await metrics_text(server, http)
        assert metric_value(text, "pdserve_timeouts_total", stage="connect") == 1
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


async def test_dropped_stream_ends_with_an_sse_error_then_done(
    proxy: ProxyServer, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    decode.faults.drop_after_chunks = 2
    async with http.post(proxy.url + COMPLETIONS, json=STREAM_BODY) as response:
        assert response.status == 200
        events = sse_events(await response.read())
    assert len(events) == 4
    error = orjson.loads(events[2])["error"]
    assert error["code"] == 502 and "decode instance" in error["message"]
    assert events[3] == b"[DONE]"


# -- client disconnects ----------------------------------------------------------------


async def test_client_disconnect_mid_stream_cancels_the_decode_leg(
    make_proxy: ProxyFactory, prefill: FakeWorker, make_worker: WorkerFactory
) -> None:
    slow = await make_worker("decode", tokens=200, token_delay_s=0.02)
    server = await make_proxy([prefill], [slow])
    instance = server.registry.require(slow.url)
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            server.url + COMPLETIONS, json={**STREAM_BODY, "max_tokens": 200}
        )
        await response.content.readany()
        assert instance.in_flight_requests == 1
        response.close()  # drop the connection mid-stream
    await wait_for(lambda: slow.disconnects == 1)
    await wait_for(lambda: instance.in_flight_requests == 0)
    assert instance.in_flight_tokens == 0


async def test_client_disconnect_during_prefill_cancels_it_and_skips_decode(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker
) -> None:
    prefill.faults.hang = True
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(proxy.url + COMPLETIONS, json=BODY))
        await wait_for(lambda: len(prefill.generate_requests()) == 1)
        request.cancel()  # the client gives up: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_for(lambda: prefill.disconnects == 1)
    instance = proxy.registry.require(prefill.url)
    await wait_for(lambda: instance.queued_prompt_tokens == 0)
    assert decode.generate_requests() == []


async def test_client_disconnect_while_decode_computes_cancels_it(
    proxy: ProxyServer, decode: FakeWorker
) -> None:
    decode.faults.delay_s = 30.0
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(proxy.url + COMPLETIONS, json=BODY))
        await wait_for(lambda: len(decode.generate_requests()) == 1)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_for(lambda: decode.disconnects == 1)


# -- health: ejection and re-admission -------------------------------------------------


async def test_unhealthy_instance_is_ejected_then_readmitted(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    steady, flaky = await make_worker("decode"), await make_worker("decode")
    server = await make_proxy(
        [prefill],
        [steady, flaky],
        health={"interval_s": 0.05, "failures_to_eject": 2, "successes_to_readmit": 2},
    )
    instance = server.registry.require(flaky.url)
    flaky.faults.unhealthy = True
    await wait_for(lambda: not instance.healthy)
    assert instance.consecutive_failures >= 2
    text = await metrics_text(server, http)
    assert metric_value(text, "pdserve_ejections_total", role="decode", instance=flaky.url) == 1
    assert metric_value(text, "pdserve_instance_healthy", role="decode", instance=flaky.url) == 0
    before = len(flaky.generate_requests())
    for _ in range(4):
        async with http.post(server.url + COMPLETIONS, json=BODY) as response:
            assert response.status == 200
    assert len(flaky.generate_requests()) == before  # routing never picks it
    flaky.faults.unhealthy = False
    await wait_for(lambda: instance.healthy)
    for _ in range(4):
        async with http.post(server.url + COMPLETIONS, json=BODY) as response:
            assert response.status == 200
    assert len(flaky.generate_requests()) == before + 2


async def test_connection_failures_on_requests_eject_without_waiting_for_checks(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    steady, dead = await make_worker("decode"), await make_worker("decode")
    server = await make_proxy([prefill], [dead, steady], health={"failures_to_eject": 2})
    await dead.stop()
    statuses = []
    for _ in range(6):
        async with http.post(server.url + COMPLETIONS, json=BODY) as response:
            statuses.append(response.status)
    assert not server.registry.require(dead.url).healthy
    # Requests routed to the dead instance moved to the steady one; after the second
    # failure in a row (the start-up health round may count one too) it is out and
    # requests no longer go there first.
    assert statuses == [200] * 6
    moved = metric_value(await metrics_text(server, http), "pdserve_retries_total", stage="decode")
    assert 1 <= moved <= 2
    assert len(steady.generate_requests()) == 6
