"""No decode instance routable, a prefill instance is: the prefill instance (a full vLLM
engine) serves the request whole, without kv_transfer_params (path ``prefill_fallback``),
instead of every request getting a 503 until a decode instance is back."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import (
    CHAT,
    COMPLETIONS,
    MODEL,
    assert_no_load_left,
    metric_value,
    openai_body,
    sse_events,
    wait_for,
)

from benchmarks.fake_worker import FakeWorker
from deploy.worker_launch import free_port
from proxy.instances import Role
from proxy.server import ProxyServer

ENDPOINTS = {COMPLETIONS: "completions", CHAT: "chat_completions"}
FALLING_BACK = "no decode instance is routable"
BACK = "decode instances are routable again"


def body_for(path: str, stream: bool, **extra: Any) -> dict[str, Any]:
    return openai_body(path, stream, "tell me about the sea", **{"max_tokens": 4, **extra})


async def post(
    http: aiohttp.ClientSession, server: ProxyServer, body: dict[str, Any], path: str = COMPLETIONS
) -> tuple[int, bytes]:
    async with http.post(server.url + path, json=body) as response:
        return response.status, await response.read()


def text_of(payload: bytes, stream: bool) -> str:
    if not stream:
        choice = orjson.loads(payload)["choices"][0]
        return str(choice["message"]["content"] if "message" in choice else choice["text"])
    events = sse_events(payload)
    assert events.count(b"[DONE]") == 1 and events[-1] == b"[DONE]"
    parts = []
    for event in events[:-1]:
        chunk = orjson.loads(event)
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            delta = choice.get("delta")
            parts.append((delta.get("content") or "") if delta else choice["text"])
    return "".join(parts)


def metric(server: ProxyServer, name: str, **labels: str) -> float:
    return metric_value(server.metrics.render().decode(), name, **labels)


def requests_on(server: ProxyServer, path: str, endpoint: str = "completions") -> float:
    labels = {"endpoint": endpoint, "model": MODEL, "status": "200", "path": path}
    return metric(server, "pdserve_requests_total", **labels)


def set_healthy(server: ProxyServer, worker: FakeWorker | str, healthy: bool) -> None:
    url = worker if isinstance(worker, str) else worker.url
    server.registry.set_healthy(server.registry.require(url), healthy)


def dead_url() -> str:
    """An instance URL nothing listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def flow_logs(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxy.pd_flow" and text in r.getMessage()]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("stream", [False, True])
async def test_ejected_decode_pool_is_served_whole_by_a_prefill_instance(
    proxy: ProxyServer,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    path: str,
    stream: bool,
) -> None:
    set_healthy(proxy, decode, False)
    body = body_for(path, stream)
    status, payload = await post(http, proxy, body, path)
    assert status == 200
    assert text_of(payload, stream) == " tok0"  # a fake prefill worker answers one token
    assert decode.generate_requests() == []
    # The client's request as it came, no kv_transfer_params; a stream asks for token ids
    # so that it can continue elsewhere if it breaks.
    [leg] = prefill.generate_requests()
    assert leg.path == path
    assert leg.body == ({**body, "return_token_ids": True} if stream else body)
    assert prefill.kv_issued == []
    assert requests_on(proxy, "prefill_fallback", ENDPOINTS[path]) == 1
    assert metric(proxy, "pdserve_requests_total", path="disaggregated") == 0
    if stream:
        ttft = {"endpoint": ENDPOINTS[path], "model": MODEL, "path": "prefill_fallback"}
        assert metric(proxy, "pdserve_ttft_seconds_count", **ttft) == 1
    decisions = {"role": "prefill", "policy": "round_robin", "instance": prefill.url}
    assert metric(proxy, "pdserve_routing_decisions_total", **decisions) == 1
    await assert_no_load_left(proxy)


@pytest.mark.parametrize("how", ["no decode registered", "decode draining"])
@pytest.mark.parametrize("stream", [False, True])
async def test_any_unroutable_decode_pool_falls_back_to_prefill(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    how: str,
    stream: bool,
) -> None:
    if how == "no decode registered":
        server = await make_proxy([prefill], [])
    else:
        server = await make_proxy([prefill], [decode])
        server.registry.drain(decode.url)
    status, payload = await post(http, server, body_for(COMPLETIONS, stream))
    assert status == 200 and text_of(payload, stream) == " tok0"
    assert decode.generate_requests() == []
    assert "kv_transfer_params" not in prefill.generate_requests()[0].body
    assert requests_on(server, "prefill_fallback") == 1


async def test_the_clients_kv_transfer_params_never_reach_the_prefill_instance(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    set_healthy(proxy, decode, False)
    body = body_for(COMPLETIONS, False, kv_transfer_params={"do_remote_decode": True})
    status, _ = await post(http, proxy, body)
    assert status == 200
    [leg] = prefill.generate_requests()
    assert "kv_transfer_params" not in leg.body and prefill.kv_issued == []


@pytest.mark.parametrize("why", ["short prompt", "n > 1"])
async def test_requests_that_would_go_aggregated_go_to_a_prefill_instance_too(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    why: str,
) -> None:
    server = await make_proxy([prefill], [decode], disagg_min_prompt_tokens=1000)
    body = body_for(COMPLETIONS, False, **({"n": 2} if why == "n > 1" else {}))
    status, _ = await post(http, server, body)
    assert status == 200 and requests_on(server, "aggregated") == 1
    assert len(decode.generate_requests()) == 1 and prefill.generate_requests() == []

    set_healthy(server, decode, False)
    status, payload = await post(http, server, body)
    assert status == 200
    assert len(orjson.loads(payload)["choices"]) == (2 if why == "n > 1" else 1)
    [leg] = prefill.generate_requests()
    assert leg.body == body
    assert len(decode.generate_requests()) == 1
    assert requests_on(server, "prefill_fallback") == 1
    assert requests_on(server, "aggregated") == 1


async def test_logged_once_per_change_and_disaggregated_again_when_decode_is_back(
    proxy: ProxyServer,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.pd_flow")
    set_healthy(proxy, decode, False)
    answers = await asyncio.gather(
        *(post(http, proxy, body_for(COMPLETIONS, i % 2 == 0)) for i in range(8))
    )
    assert [status for status, _ in answers] == [200] * 8
    answers = [await post(http, proxy, body_for(COMPLETIONS, False)) for _ in range(4)]
    assert [status for status, _ in answers] == [200] * 4
    [warning] = flow_logs(caplog, FALLING_BACK)
    assert warning.levelname == "WARNING" and "prefill_fallback" in warning.getMessage()
    assert flow_logs(caplog, BACK) == []
    assert requests_on(proxy, "prefill_fallback") == 12
    assert prefill.kv_issued == [] and decode.generate_requests() == []

    # The decode instance is back: requests take the disaggregated path again.
    set_healthy(proxy, decode, True)
    for stream in (False, True, False):
        status, payload = await post(http, proxy, body_for(COMPLETIONS, stream))
        assert status == 200 and text_of(payload, stream) == " tok0 tok1 tok2 tok3"
    assert len(prefill.kv_issued) == 3
    legs = decode.generate_requests()
    assert [leg.body["kv_transfer_params"] for leg in legs] == prefill.kv_issued
    assert requests_on(proxy, "disaggregated") == 3
    assert requests_on(proxy, "prefill_fallback") == 12
    [info] = flow_logs(caplog, BACK)
    assert info.levelname == "INFO"
    assert len(flow_logs(caplog, FALLING_BACK)) == 1
    # Not one line per request.
    assert not [r for r in caplog.records if r.name == "proxy.pd_flow" and r not in (warning, info)]

    # A second outage is a second change: logged again, once.
    set_healthy(proxy, decode, False)
    for _ in range(3):
        assert (await post(http, proxy, body_for(COMPLETIONS, False)))[0] == 200
    assert len(flow_logs(caplog, FALLING_BACK)) == 2
    await assert_no_load_left(proxy)


@pytest.mark.parametrize("stream", [False, True])
async def test_neither_pool_routable_is_a_503_as_before(
    proxy: ProxyServer,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    stream: bool,
) -> None:
    set_healthy(proxy, decode, False)
    set_healthy(proxy, prefill, False)
    status, payload = await post(http, proxy, body_for(COMPLETIONS, stream))
    assert status == 503
    error = orjson.loads(payload)["error"]
    assert error["message"] == "no healthy decode instance" and error["code"] == 503
    assert prefill.generate_requests() == [] and decode.generate_requests() == []
    assert metric(proxy, "pdserve_requests_total", path="prefill_fallback") == 0


async def test_no_instance_at_all_is_a_503(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_proxy([], [])
    status, payload = await post(http, server, body_for(COMPLETIONS, False))
    assert status == 503
    assert orjson.loads(payload)["error"]["message"] == "no healthy decode instance"


@pytest.mark.parametrize("failure", ["503", "refused"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_prefill_instance_moves_the_request_to_another_one(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    failure: str,
    stream: bool,
) -> None:
    failing: FakeWorker | None = None
    if failure == "refused":
        first = dead_url()
    else:
        failing = await make_worker("prefill")
        failing.faults.fail_requests, failing.faults.fail_status = 5, 503
        first = failing.url
    healthy = await make_worker("prefill")
    server = await make_proxy([first, healthy], [])  # round robin tries `first` first
    status, payload = await post(http, server, body_for(COMPLETIONS, stream))
    assert status == 200 and text_of(payload, stream) == " tok0"
    if failing is not None:
        assert len(failing.generate_requests()) == 1
    else:
        assert server.registry.require(first).consecutive_failures >= 1
    assert len(healthy.generate_requests()) == 1
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    moved = {"stage": "before_first_byte", "outcome": "succeeded"}
    assert metric(server, "pdserve_migrations_total", **moved) == 1
    assert requests_on(server, "prefill_fallback") == 1
    await assert_no_load_left(server)


async def test_failing_prefill_instances_are_each_tried_once(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    prefills = [await make_worker("prefill") for _ in range(2)]
    for worker in prefills:
        worker.faults.fail_requests, worker.faults.fail_status = 5, 503
    server = await make_proxy(prefills, [], retries={"decode_attempts": 5})
    status, payload = await post(http, server, body_for(COMPLETIONS, False))
    assert status == 503  # the last attempt's answer, relayed as it came
    assert orjson.loads(payload)["error"]["message"] == "injected failure 503"
    assert [len(worker.generate_requests()) for worker in prefills] == [1, 1]
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    await assert_no_load_left(server)


async def test_prefill_attempts_are_bounded_by_decode_attempts(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    prefills = [await make_worker("prefill") for _ in range(4)]
    for worker in prefills:
        worker.faults.fail_requests, worker.faults.fail_status = 5, 502
    server = await make_proxy(prefills, [], retries={"decode_attempts": 3})
    status, _ = await post(http, server, body_for(COMPLETIONS, True))
    assert status == 502
    assert sorted(len(worker.generate_requests()) for worker in prefills) == [0, 1, 1, 1]
    await assert_no_load_left(server)


async def test_a_broken_stream_continues_on_another_prefill_instance(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    # Decode-role fakes stand in for prefill instances: a real prefill instance is a full
    # engine that generates a whole answer to a request without kv_transfer_params.
    body = body_for(COMPLETIONS, True, max_tokens=6)
    reference = await make_worker("decode")
    expected = text_of((await post(http, await make_proxy([], [reference]), body))[1], True)
    assert expected == " tok0 tok1 tok2 tok3 tok4 tok5"

    dropping, other = await make_worker("decode"), await make_worker("decode")
    dropping.faults.drop_after_chunks = 3
    server = await make_proxy([dropping, other], [])
    status, payload = await post(http, server, body)
    assert status == 200 and text_of(payload, True) == expected
    assert len(dropping.generate_requests()) == 1  # never asked again
    [continuation] = other.generate_requests()
    assert continuation.path == COMPLETIONS and continuation.body["max_tokens"] == 3
    assert isinstance(continuation.body["prompt"], list)
    assert "kv_transfer_params" not in continuation.body
    moved = {"stage": "mid_stream", "outcome": "succeeded"}
    assert metric(server, "pdserve_migrations_total", **moved) == 1
    assert requests_on(server, "prefill_fallback") == 1
    await assert_no_load_left(server)


async def test_a_broken_stream_continues_on_a_decode_instance_that_came_back(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    decode: FakeWorker,
) -> None:
    serving = await make_worker("decode", token_delay_s=0.05)  # stands in for a prefill
    serving.faults.drop_after_chunks = 3
    real_prefill = await make_worker("prefill")
    server = await make_proxy([serving, real_prefill], [decode])
    set_healthy(server, decode, False)
    body = body_for(COMPLETIONS, True, max_tokens=6)
    async with http.post(server.url + COMPLETIONS, json=body) as response:
        assert response.status == 200
        first = await response.content.readany()  # the stream is under way on `serving`
        set_healthy(server, decode, True)
        payload = first + await response.read()
    assert text_of(payload, True) == " tok0 tok1 tok2 tok3 tok4 tok5"
    assert len(serving.generate_requests()) == 1
    # The continuation went the disaggregated way: a prefill leg on the other prefill
    # instance (never the one that failed), then the decode instance.
    [p_leg] = real_prefill.generate_requests()
    assert p_leg.body["kv_transfer_params"] == {"do_remote_decode": True}
    [d_leg] = decode.generate_requests()
    assert d_leg.body["kv_transfer_params"] == real_prefill.kv_issued[0]
    assert d_leg.body["max_tokens"] == 3
    # Counted as the path the client's stream started on.
    assert requests_on(server, "prefill_fallback") == 1
    await assert_no_load_left(server)


async def test_a_continuation_never_prefills_on_the_instance_that_broke_the_stream(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    decode: FakeWorker,
) -> None:
    serving = await make_worker("decode", token_delay_s=0.05)  # stands in for a prefill
    serving.faults.drop_after_chunks = 3
    server = await make_proxy([serving], [decode])
    set_healthy(server, decode, False)
    body = body_for(COMPLETIONS, True, max_tokens=6)
    async with http.post(server.url + COMPLETIONS, json=body) as response:
        assert response.status == 200
        first = await response.content.readany()
        set_healthy(server, decode, True)
        payload = first + await response.read()
    assert text_of(payload, True) == " tok0 tok1 tok2 tok3 tok4 tok5"
    # The only prefill instance is the one that failed: no prefill leg there, the decode
    # instance continues the stream on its own.
    assert len(serving.generate_requests()) == 1
    [d_leg] = decode.generate_requests()
    assert "kv_transfer_params" not in d_leg.body and d_leg.body["max_tokens"] == 3
    await assert_no_load_left(server)


async def test_prefill_fallback_uses_the_prefill_policy_and_its_load_accounting(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    busy, idle = await make_worker("prefill"), await make_worker("prefill")
    busy.faults.delay_s = 1.0
    server = await make_proxy([busy, idle], [], prefill_policy={"name": "prefill_cost"})
    busy_instance = server.registry.require(busy.url)
    long_body = body_for(COMPLETIONS, False, prompt="word " * 400)
    first = asyncio.create_task(post(http, server, long_body))  # prefill_cost: `busy` first
    await wait_for(lambda: len(busy.generate_requests()) == 1)
    assert busy_instance.in_flight_requests == 1
    assert busy_instance.queued_prompt_tokens > 0  # held until its first byte
    assert busy_instance.in_flight_tokens == busy_instance.queued_prompt_tokens + 4
    for _ in range(2):
        # Whatever the rotation says, the prompt queued on `busy` sends these to `idle`.
        assert (await post(http, server, body_for(COMPLETIONS, False)))[0] == 200
    assert len(idle.generate_requests()) == 2 and len(busy.generate_requests()) == 1
    assert (await first)[0] == 200
    await assert_no_load_left(server)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_no_routable_decode_accepts_is_served_whole_by_a_prefill_instance(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    stream: bool,
) -> None:
    # Decode nodes just died: their instances refuse connections but the health checks have
    # not ejected them yet. The request does not wait for them: it goes whole to a prefill.
    prefill = await make_worker("prefill")
    dead = [dead_url(), dead_url()]
    server = await make_proxy([prefill], dead, retries={"decode_attempts": 5})
    status, payload = await post(http, server, body_for(COMPLETIONS, stream))
    assert status == 200 and text_of(payload, stream) == " tok0"
    legs = prefill.generate_requests()
    assert [("kv_transfer_params" in leg.body) for leg in legs] == [True, True, False]
    assert requests_on(server, "prefill_fallback") == 1
    assert metric(server, "pdserve_retries_total", stage="decode") == 2
    await assert_no_load_left(server)


async def test_a_decode_that_answers_with_an_error_is_not_bypassed_through_a_prefill(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    # A decode that answers is busy or failing on this request, not gone: the prefill pool
    # is not made to decode for it, and the client gets the answer (as with no prefill).
    prefill = await make_worker("prefill")
    decode = await make_worker("decode")
    decode.faults.fail_requests, decode.faults.fail_status = 5, 503
    server = await make_proxy([prefill], [decode, dead_url()], retries={"decode_attempts": 5})
    status, payload = await post(http, server, body_for(COMPLETIONS, False))
    assert status in (502, 503), payload  # the last attempt's answer
    assert len(decode.generate_requests()) == 1
    assert all("kv_transfer_params" in leg.body for leg in prefill.generate_requests())
    assert requests_on(server, "prefill_fallback") == 0
    assert server.registry.routable(Role.DECODE)
    await assert_no_load_left(server)
