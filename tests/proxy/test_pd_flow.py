"""Both legs of the PD handoff, field by field and header by header."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
import uvloop
from conftest import ProxyFactory
from proxy_helpers import (
    CHAT,
    COMPLETIONS,
    MODEL,
    metric_value,
    openai_body,
    sse_events,
    without_token_ids,
)

from benchmarks.fake_worker import FakeWorker
from proxy.server import ProxyServer


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """These tests run on uvloop, the loop `pdserve proxy` runs on."""
    return uvloop.EventLoopPolicy()


def client_body(path: str, stream: bool, **extra: object) -> dict[str, object]:
    return openai_body(path, stream, "tell me a story about a cat", **{"max_tokens": 3, **extra})


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("stream", [False, True])
async def test_both_legs_carry_the_protocol_fields(
    proxy: ProxyServer,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    path: str,
    stream: bool,
) -> None:
    body = client_body(
        path,
        stream,
        min_tokens=2,
        top_k=7,
        my_vendor_field={"nested": [1, 2]},
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    async with http.post(proxy.url + path, json=body) as response:
        assert response.status == 200
        returned_id = response.headers["X-Request-Id"]
        payload = await response.read()

    [p_leg] = prefill.generate_requests()
    [d_leg] = decode.generate_requests()
    assert p_leg.path == path and d_leg.path == path

    # Prefill leg: the client's request made a one-token, non-streamed prefill.
    dropped = ("min_tokens", "stream_options")
    expected_prefill = {k: v for k, v in body.items() if k not in dropped}
    expected_prefill.update(
        stream=False, max_tokens=1, kv_transfer_params={"do_remote_decode": True}
    )
    if path == CHAT:
        expected_prefill["max_completion_tokens"] = 1
    assert p_leg.body == expected_prefill

    # Decode leg: the original request plus exactly what the prefill returned (and, for a
    # stream that can continue elsewhere after a break, a request for token ids).
    [issued] = prefill.kv_issued
    asked = {"return_token_ids": True} if stream else {}
    assert d_leg.body == {**body, **asked, "kv_transfer_params": issued}
    assert issued["remote_engine_id"] == f"fake-engine-{prefill.port}"

    # One request id on both legs and back to the client.
    assert p_leg.headers["X-Request-Id"] == d_leg.headers["X-Request-Id"] == returned_id
    assert len(returned_id) == 32
    assert p_leg.headers["Content-Type"] == d_leg.headers["Content-Type"] == "application/json"

    if stream:
        # The decode stream reaches the client byte for byte, usage chunk and [DONE]
        # included, as vLLM writes it when nobody asks for token ids.
        assert b'token_ids":[' in decode.streams[0]
        assert payload == without_token_ids(decode.streams[0])
        events = sse_events(payload)
        assert events[-1] == b"[DONE]"
        usage_chunk = orjson.loads(events[-2])
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == 3
    else:
        answer = orjson.loads(payload)
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["usage"]["prompt_tokens"] == 7  # the decode leg's own usage
        assert len(answer["choices"]) == 1


async def test_client_request_id_and_authorization_reach_both_legs(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    headers = {"X-Request-Id": "client-chosen-id-42", "Authorization": "Bearer sk-test"}
    async with http.post(
        proxy.url + COMPLETIONS, json=client_body(COMPLETIONS, False), headers=headers
    ) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == "client-chosen-id-42"
    for leg in (prefill.generate_requests()[0], decode.generate_requests()[0]):
        assert leg.headers["X-Request-Id"] == "client-chosen-id-42"
        assert leg.headers["Authorization"] == "Bearer sk-test"


async def test_each_request_gets_its_own_generated_id(
    proxy: ProxyServer, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    ids = set()
    for _ in range(3):
        async with http.post(proxy.url + CHAT, json=client_body(CHAT, True)) as response:
            ids.add(response.headers["X-Request-Id"])
            await response.read()
    assert len(ids) == 3
    assert {r.headers["X-Request-Id"] for r in decode.generate_requests()} == ids


async def test_stream_without_include_usage_has_no_usage_chunk(
    proxy: ProxyServer, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    async with http.post(proxy.url + COMPLETIONS, json=client_body(COMPLETIONS, True)) as response:
        events = sse_events(await response.read())
    assert events[-1] == b"[DONE]"
    assert all("usage" not in orjson.loads(e) for e in events[:-1])
    assert [orjson.loads(e)["choices"][0]["text"] for e in events[:-1]] == [
        " tok0",
        " tok1",
        " tok2",
    ]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_n_greater_than_one_goes_aggregated(
    proxy: ProxyServer,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    path: str,
) -> None:
    body = client_body(path, False, n=2)
    async with http.post(proxy.url + path, json=body) as response:
        assert response.status == 200
        answer = await response.json()
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert prefill.generate_requests() == []
    [d_leg] = decode.generate_requests()
    assert d_leg.body == body  # no kv_transfer_params: the decode instance prefills itself
    metrics = await (await aiohttp.ClientSession().get(proxy.url + "/metrics")).text()
    endpoint = "completions" if path == COMPLETIONS else "chat_completions"
    labels = {"endpoint": endpoint, "model": MODEL, "status": "200", "path": "aggregated"}
    assert metric_value(metrics, "pdserve_requests_total", **labels) == 1


async def test_batched_prompts_go_aggregated(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    body = client_body(COMPLETIONS, False, prompt=["one prompt", "another prompt"])
    async with http.post(proxy.url + COMPLETIONS, json=body) as response:
        assert response.status == 200
    assert prefill.generate_requests() == []
    assert decode.generate_requests()[0].body == body


async def test_short_prompts_skip_the_prefill_leg(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    # "tell me a story about a cat" is 27 bytes, estimated 6 tokens.
    server = await make_proxy([prefill], [decode], disagg_min_prompt_tokens=7)
    async with http.post(server.url + COMPLETIONS, json=client_body(COMPLETIONS, False)) as r:
        assert r.status == 200
    assert prefill.generate_requests() == []
    assert "kv_transfer_params" not in decode.generate_requests()[0].body
    long_prompt = client_body(COMPLETIONS, False, prompt="word " * 40)
    async with http.post(server.url + COMPLETIONS, json=long_prompt) as r:
        assert r.status == 200
    assert len(prefill.generate_requests()) == 1
    assert "kv_transfer_params" in decode.generate_requests()[1].body


async def test_no_healthy_prefill_falls_back_to_aggregated(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    proxy.registry.set_healthy(proxy.registry.require(prefill.url), False)
    body = client_body(CHAT, True)
    async with http.post(proxy.url + CHAT, json=body) as response:
        assert response.status == 200
        events = sse_events(await response.read())
    assert events[-1] == b"[DONE]"
    assert prefill.generate_requests() == []
    assert decode.generate_requests()[0].body == {**body, "return_token_ids": True}
    async with http.get(proxy.url + "/metrics") as response:
        metrics = await response.text()
    labels = {"endpoint": "chat_completions", "model": MODEL, "status": "200", "path": "fallback"}
    assert metric_value(metrics, "pdserve_requests_total", **labels) == 1


async def test_client_kv_transfer_params_are_replaced_not_duplicated(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    body = client_body(COMPLETIONS, False, kv_transfer_params={"stale": True})
    async with http.post(proxy.url + COMPLETIONS, json=body) as response:
        assert response.status == 200
    assert decode.generate_requests()[0].body["kv_transfer_params"] == prefill.kv_issued[0]


async def test_worker_error_answers_are_relayed_verbatim(
    proxy: ProxyServer, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    decode.faults.fail_requests, decode.faults.fail_status = 1, 400
    async with http.post(proxy.url + COMPLETIONS, json=client_body(COMPLETIONS, True)) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["error"]["message"] == "injected failure 400"
    assert answer["error"]["code"] == 400


async def test_load_counters_are_held_until_the_stream_ends(
    make_proxy: ProxyFactory, make_worker: object, prefill: FakeWorker, http: aiohttp.ClientSession
) -> None:
    slow = FakeWorker("decode", tokens=6, token_delay_s=0.05)
    await slow.start()
    try:
        server = await make_proxy([prefill], [slow])
        instance = server.registry.require(slow.url)
        async with http.post(
            server.url + COMPLETIONS, json=client_body(COMPLETIONS, True, max_tokens=6)
        ) as r:
            assert r.status == 200
            await r.content.readany()  # headers and the first chunk are here ...
            assert instance.in_flight_requests == 1  # ... and the request still counts
            assert instance.in_flight_tokens == 6 + 6
            await r.read()
        assert instance.in_flight_requests == 0
        assert instance.in_flight_tokens == 0
        assert server.registry.require(prefill.url).queued_prompt_tokens == 0
    finally:
        await slow.stop()


async def test_models_come_from_the_decode_pool(
    proxy: ProxyServer, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    async with http.get(proxy.url + "/v1/models") as response:
        assert response.status == 200
        models = await response.json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    async with http.get(proxy.url + "/v1/models") as response:
        assert response.status == 200
    # Cached: the second listing did not ask the worker again.
    assert sum(r.path == "/v1/models" for r in decode.requests) == 1


async def test_health_reflects_the_decode_pool(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    async with http.get(proxy.url + "/health") as response:
        assert response.status == 200
        assert (await response.json())["decode_healthy"] == 1
    proxy.registry.set_healthy(proxy.registry.require(decode.url), False)
    async with http.get(proxy.url + "/health") as response:
        assert response.status == 503
    # With a healthy prefill instance the request would be served whole there
    # (test_prefill_fallback.py); with neither pool routable it fails.
    proxy.registry.set_healthy(proxy.registry.require(prefill.url), False)
    async with http.post(proxy.url + CHAT, json=client_body(CHAT, False)) as response:
        assert response.status == 503
        error = (await response.json())["error"]
    assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"


async def test_openai_client_streams_through_the_proxy(
    proxy: ProxyServer, decode: FakeWorker
) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="EMPTY", max_retries=0)
    try:
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi there"}],
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == " tok0 tok1 tok2"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        completion = await client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
        assert completion.choices[0].text == " tok0 tok1"
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    finally:
        await client.close()
