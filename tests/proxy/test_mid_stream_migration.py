"""A decode instance that dies or stalls after the client's stream started: the answer
continues on another decode instance and the client sees one uninterrupted stream
(``retries.mid_stream``, issue 11 item 2)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import MODEL, assert_no_load_left, metric_value, sse_events, wait_for

from benchmarks.fake_worker import GENERATED_BASE
from deploy.worker_launch import free_port
from proxy.server import ProxyServer

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
TOKENS = 6
# Content events before the cut: after the first, in the middle, one before the last.
# Chat streams open with vLLM's role chunk, which counts as an event of its own.
CUTS = [1, 3, TOKENS - 1]


def body_for(path: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": TOKENS, "stream": True}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "tell me about the sea"}]
    else:
        body["prompt"] = "tell me about the sea"
    return {**body, **extra}


async def stream(
    http: aiohttp.ClientSession, server: ProxyServer, path: str, body: dict[str, Any]
) -> tuple[int, list[bytes], str]:
    async with http.post(server.url + path, json=body) as response:
        return response.status, sse_events(await response.read()), response.headers["X-Request-Id"]


def chunks(events: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in events if e != b"[DONE]"]


def text_of(events: list[bytes]) -> str:
    parts = []
    for chunk in chunks(events):
        for choice in chunk.get("choices", []):
            delta = choice.get("delta")
            parts.append(delta.get("content") or "" if delta else choice["text"])
    return "".join(parts)


def ids_of(events: list[bytes]) -> list[int]:
    ids: list[int] = []
    for chunk in chunks(events):
        for choice in chunk.get("choices", []):
            ids += choice.get("token_ids") or []
    return ids


def prompt_ids(upstream_stream: bytes) -> list[int]:
    """The prompt's token ids, from the first chunk a decode instance sent."""
    first = orjson.loads(sse_events(upstream_stream)[0])
    ids = first.get("prompt_token_ids") or first["choices"][0]["prompt_token_ids"]
    assert isinstance(ids, list) and ids
    return ids


def metric(server: ProxyServer, name: str, **labels: str) -> float:
    return metric_value(server.metrics.render().decode(), name, **labels)


def mid_stream_moves(server: ProxyServer, outcome: str) -> float:
    return metric(server, "pdserve_migrations_total", stage="mid_stream", outcome=outcome)


async def reference(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    **worker_options: Any,
) -> list[bytes]:
    """The same request answered by a decode instance that does not fail."""
    decode = await make_worker("decode", **worker_options)
    server = await make_proxy([await make_worker("prefill")], [decode])
    status, events, _ = await stream(http, server, path, body)
    assert status == 200
    return events


def assert_one_stream(events: list[bytes], expected: list[bytes], path: str) -> None:
    """``events`` are the uninterrupted stream's: same text, ids and usage, one id."""
    assert events.count(b"[DONE]") == 1 and events[-1] == b"[DONE]"
    got, want = chunks(events), chunks(expected)
    assert all("error" not in chunk for chunk in got)
    assert len({chunk["id"] for chunk in got}) == 1
    assert {(c["object"], c["created"], c["model"]) for c in got} == {
        (got[0]["object"], got[0]["created"], MODEL)
    }
    assert got[0]["object"] == ("chat.completion.chunk" if path == CHAT else "text_completion")
    assert text_of(events) == text_of(expected)
    assert ids_of(events) == ids_of(expected)
    assert [c.get("usage") for c in got] == [c.get("usage") for c in want]
    # Chunk for chunk the same layout: the same keys, in the same order, as vLLM writes.
    assert [list(c) for c in got] == [list(c) for c in want]
    assert [[list(ch) for ch in c["choices"]] for c in got] == [
        [list(ch) for ch in c["choices"]] for c in want
    ]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"stream_options": {"include_usage": True}},
        {"return_token_ids": True, "stream_options": {"include_usage": True}},
        {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    ],
    ids=["plain", "usage", "ids-asked", "continuous-usage"],
)
async def test_a_cut_stream_continues_on_another_decode(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    path: str,
    cut: int,
    extra: dict[str, Any],
) -> None:
    body = body_for(path, seed=7, temperature=0.5, min_tokens=4, **extra)
    expected = await reference(make_proxy, make_worker, http, path, body)
    prefill = await make_worker("prefill")
    dropping, other = await make_worker("decode"), await make_worker("decode")
    dropping.faults.drop_after_chunks = cut
    server = await make_proxy([prefill], [dropping, other])
    status, events, _ = await stream(http, server, path, body)
    assert status == 200
    assert_one_stream(events, expected, path)
    if not body.get("return_token_ids"):
        assert all(b'token_ids":[' not in e for e in events)

    # The continuation: a token-id completions request from where the client's stream was.
    [first] = dropping.generate_requests()
    assert first.body["return_token_ids"] is True
    [leg] = other.generate_requests()
    generated = cut - 1 if path == CHAT else cut  # the role chunk carries no token
    assert leg.path == COMPLETIONS
    continuation = leg.body
    output = [GENERATED_BASE + i for i in range(generated)]
    assert continuation["prompt"] == prompt_ids(dropping.streams[0]) + output
    assert continuation["max_tokens"] == TOKENS - generated
    assert continuation["min_tokens"] == max(0, 4 - generated)
    assert (continuation["seed"], continuation["temperature"]) == (7, 0.5)
    assert continuation["stream"] is True and continuation["return_token_ids"] is True
    assert "messages" not in continuation
    # It went through a fresh prefill leg of its own, on the completions endpoint.
    _, p_second = prefill.generate_requests()
    assert p_second.path == COMPLETIONS and p_second.body["prompt"] == continuation["prompt"]
    assert continuation["kv_transfer_params"] == prefill.kv_issued[1]

    assert mid_stream_moves(server, "succeeded") == 1 and mid_stream_moves(server, "failed") == 0
    assert metric(server, "pdserve_retries_total", stage="decode") == 1
    endpoint = "chat_completions" if path == CHAT else "completions"
    labels = {"endpoint": endpoint, "model": MODEL, "status": "200", "path": "disaggregated"}
    assert metric(server, "pdserve_requests_total", **labels) == 1
    assert metric(server, "pdserve_ttft_seconds_count", endpoint=endpoint, model=MODEL) == 1
    await assert_no_load_left(server)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_a_cut_inside_an_event_never_shows_the_client_half_of_it(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    path: str,
) -> None:
    body = body_for(path)
    expected = await reference(make_proxy, make_worker, http, path, body)
    dropping, other = await make_worker("decode"), await make_worker("decode")
    dropping.faults.drop_after_chunks, dropping.faults.drop_inside_event = 3, True
    server = await make_proxy([], [dropping, other])  # aggregated: straight to decode
    status, events, _ = await stream(http, server, path, body)
    assert status == 200
    assert_one_stream(events, expected, path)
    # The half-sent token is generated again by the continuation.
    generated = 2 if path == CHAT else 3
    assert other.generate_requests()[0].body["max_tokens"] == TOKENS - generated
    assert mid_stream_moves(server, "succeeded") == 1
    await assert_no_load_left(server)


async def test_several_tokens_per_chunk_and_a_second_break(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    body = body_for(COMPLETIONS, max_tokens=12, stream_options={"include_usage": True})
    expected = await reference(make_proxy, make_worker, http, COMPLETIONS, body, tokens_per_chunk=3)
    decodes = [await make_worker("decode", tokens_per_chunk=3) for _ in range(3)]
    decodes[0].faults.drop_after_chunks = 1  # 3 tokens in
    # Whichever comes next sends 6 more; the last its 3 and the usage chunk, and is cut
    # before its data: [DONE], which the proxy then writes itself.
    decodes[1].faults.drop_after_chunks = decodes[2].faults.drop_after_chunks = 2
    server = await make_proxy([await make_worker("prefill")], decodes)
    status, events, _ = await stream(http, server, COMPLETIONS, body)
    assert status == 200
    assert_one_stream(events, expected, COMPLETIONS)
    assert chunks(events)[-1]["usage"]["completion_tokens"] == 12
    legs = [leg.body for worker in decodes for leg in worker.generate_requests()]
    assert sorted(leg["max_tokens"] for leg in legs) == [3, 9, 12]
    assert mid_stream_moves(server, "succeeded") == 2
    await assert_no_load_left(server)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_a_stall_mid_stream_moves_the_stream(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    path: str,
) -> None:
    body = body_for(path, stream_options={"include_usage": True})
    expected = await reference(make_proxy, make_worker, http, path, body)
    stalling, other = await make_worker("decode"), await make_worker("decode")
    stalling.faults.stall_after_chunks = 2
    server = await make_proxy(
        [await make_worker("prefill")], [stalling, other], timeouts={"stall_s": 0.3}
    )
    status, events, _ = await stream(http, server, path, body)
    assert status == 200
    assert_one_stream(events, expected, path)
    await wait_for(lambda: stalling.disconnects == 1)  # the stalled leg was dropped
    assert metric(server, "pdserve_timeouts_total", stage="stall") == 1
    assert mid_stream_moves(server, "succeeded") == 1
    await assert_no_load_left(server)


@pytest.mark.parametrize(
    ("usage", "sent"),
    [(False, TOKENS), (True, TOKENS), (True, TOKENS + 1)],
    ids=["before-done", "before-usage", "after-usage"],
)
async def test_a_cut_after_the_last_token_is_ended_by_the_proxy(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    usage: bool,
    sent: int,
) -> None:
    options = {"stream_options": {"include_usage": True}} if usage else {}
    body = body_for(CHAT, **options)
    expected = await reference(make_proxy, make_worker, http, CHAT, body)
    dropping, other = await make_worker("decode"), await make_worker("decode")
    dropping.faults.drop_after_chunks = 1 + sent  # the role chunk, then `sent` more
    server = await make_proxy([], [dropping, other])
    status, events, _ = await stream(http, server, CHAT, body)
    assert status == 200
    assert_one_stream(events, expected, CHAT)
    assert not dropping.streams[0].endswith(b"data: [DONE]\n\n")  # it was cut
    assert other.generate_requests() == []  # nothing left to generate
    assert mid_stream_moves(server, "succeeded") == mid_stream_moves(server, "failed") == 0
    await assert_no_load_left(server)


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        (COMPLETIONS, {"stop": ["\n"]}),
        (CHAT, {"stop": "x"}),
        (COMPLETIONS, {"n": 2}),
        (COMPLETIONS, {"echo": True}),
        (COMPLETIONS, {"logprobs": 1}),
        (CHAT, {"logprobs": True, "top_logprobs": 1}),
        (COMPLETIONS, {"frequency_penalty": 0.3}),
    ],
)
async def test_a_stream_that_cannot_continue_exactly_ends_with_an_sse_error(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    path: str,
    extra: dict[str, Any],
) -> None:
    prefill = await make_worker("prefill")
    dropping, other = await make_worker("decode"), await make_worker("decode")
    dropping.faults.drop_after_chunks = 2
    server = await make_proxy([prefill], [dropping, other])
    status, events, _ = await stream(http, server, path, body_for(path, **extra))
    assert status == 200
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == 502 and dropping.url in error["message"]
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    assert "return_token_ids" not in dropping.generate_requests()[0].body
    assert other.generate_requests() == []
    assert metric(server, "pdserve_retries_total", stage="decode") == 0
    assert mid_stream_moves(server, "succeeded") == mid_stream_moves(server, "failed") == 0
    await assert_no_load_left(server)


async def test_no_decode_left_ends_with_an_sse_error(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
) -> None:
    dropping = await make_worker("decode")
    dropping.faults.drop_after_chunks = 2
    server = await make_proxy([await make_worker("prefill")], [dropping])
    status, events, _ = await stream(http, server, COMPLETIONS, body_for(COMPLETIONS))
    assert status == 200
    assert [c["choices"][0]["text"] for c in chunks(events[:2])] == [" tok0", " tok1"]
    error = orjson.loads(events[2])["error"]
    assert error["code"] == 502 and "decode instance" in error["message"]
    assert events[3:] == [b"[DONE]"]
    assert mid_stream_moves(server, "succeeded") == mid_stream_moves(server, "failed") == 0
    labels = {"endpoint": "completions", "model": MODEL, "status": "502"}
    assert metric(server, "pdserve_requests_total", path="disaggregated", **labels) == 1
    await assert_no_load_left(server)


async def test_a_continuation_that_fails_too_ends_with_its_error(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
) -> None:
    dropping = await make_worker("decode")
    dropping.faults.drop_after_chunks = 2
    dead = f"http://127.0.0.1:{free_port()}"  # connections refused
    server = await make_proxy([], [dropping, dead])
    status, events, _ = await stream(http, server, COMPLETIONS, body_for(COMPLETIONS))
    assert status == 200
    assert text_of(events[:2]) == " tok0 tok1"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == 502 and f"cannot connect to decode instance {dead}" in error["message"]
    assert events.count(b"[DONE]") == 1
    assert mid_stream_moves(server, "failed") == 1 and mid_stream_moves(server, "succeeded") == 0
    await assert_no_load_left(server)


async def test_a_continuation_refused_with_a_client_error_ends_the_stream(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
) -> None:
    dropping = await make_worker("decode")
    dropping.faults.drop_after_chunks = 2
    refusing = [await make_worker("decode") for _ in range(2)]
    for worker in refusing:
        worker.faults.fail_requests, worker.faults.fail_status = 1, 400
    server = await make_proxy([], [dropping, *refusing])
    status, events, _ = await stream(http, server, COMPLETIONS, body_for(COMPLETIONS))
    assert status == 200
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == 502 and "HTTP 400" in error["message"]
    assert "injected failure 400" in error["message"]
    assert events.count(b"[DONE]") == 1
    # The same continuation would be refused anywhere: it is not tried again.
    assert sum(len(worker.generate_requests()) for worker in refusing) == 1
    assert mid_stream_moves(server, "failed") == 1
    await assert_no_load_left(server)


async def test_moves_mid_stream_count_against_decode_attempts(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
) -> None:
    decodes = [await make_worker("decode") for _ in range(3)]
    for worker in decodes:
        worker.faults.drop_after_chunks = 1
    server = await make_proxy([], decodes, retries={"decode_attempts": 2})
    status, events, _ = await stream(http, server, COMPLETIONS, body_for(COMPLETIONS))
    assert status == 200
    assert text_of(events[:2]) == " tok0 tok1"
    assert "error" in orjson.loads(events[-2])
    assert sorted(len(w.generate_requests()) for w in decodes) == [0, 1, 1]
    assert mid_stream_moves(server, "failed") == 1
    await assert_no_load_left(server)


async def test_with_mid_stream_off_a_cut_stream_ends_with_an_error_as_before(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
) -> None:
    dropping, other = await make_worker("decode"), await make_worker("decode")
    dropping.faults.drop_after_chunks = 2
    server = await make_proxy([], [dropping, other], retries={"mid_stream": False})
    status, events, _ = await stream(http, server, COMPLETIONS, body_for(COMPLETIONS))
    assert status == 200
    assert "return_token_ids" not in dropping.generate_requests()[0].body
    # Relayed untouched: the worker's bytes, then the proxy's error event.
    relayed = b"".join(b"data: " + e + b"\n\n" for e in events[:2])
    assert relayed == dropping.streams[0]
    assert orjson.loads(events[2])["error"]["code"] == 502
    assert events[3:] == [b"[DONE]"]
    assert other.generate_requests() == []
    await assert_no_load_left(server)


async def test_each_move_is_logged_with_request_instance_and_reason(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dropping, other = await make_worker("decode"), await make_worker("decode")
    dropping.faults.drop_after_chunks = 2
    server = await make_proxy([], [dropping, other])
    with caplog.at_level("WARNING", logger="proxy.pd_flow"):
        status, _, request_id = await stream(http, server, COMPLETIONS, body_for(COMPLETIONS))
    assert status == 200
    [record] = [r for r in caplog.records if r.name == "proxy.pd_flow"]
    assert record.levelname == "WARNING" and record.exc_info is None
    text = record.getMessage()
    assert request_id in text and dropping.url in text
    assert "mid-stream after 2 output tokens" in text and "UpstreamDisconnected" in text


async def test_a_client_that_leaves_is_no_failure_to_move(
    make_proxy: ProxyFactory, make_worker: WorkerFactory
) -> None:
    slow, other = (
        await make_worker("decode", tokens=200, token_delay_s=0.02),
        await make_worker("decode"),
    )
    server = await make_proxy([], [slow, other])
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            server.url + COMPLETIONS, json=body_for(COMPLETIONS, max_tokens=200)
        )
        await response.content.readany()
        response.close()  # drop the connection mid-stream
    await wait_for(lambda: slow.disconnects == 1)
    await assert_no_load_left(server)
    assert other.generate_requests() == []
    assert metric(server, "pdserve_retries_total", stage="decode") == 0
