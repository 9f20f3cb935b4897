"""Bad client input: always an OpenAI-shaped 4xx, never a 500 or a hang."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import ProxyFactory
from proxy_helpers import MODEL

from benchmarks.fake_worker import FakeWorker
from proxy.server import ProxyServer

GOOD_COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(payload: dict[str, object], status: int, param: str | None) -> None:
    error = payload["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", b'{"model": "fake-model"}', 400, "prompt"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": 5}', 400, "prompt"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": []}', 400, "prompt"),
        ("/v1/completions", b'{"model": 7, "prompt": "x"}', 400, "model"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "n": true}', 400, "n"),
        ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404, "model"),
        ("/v1/chat/completions", b'{"model": "fake-model"}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": ["hi"]}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "model": "x"}', 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(
    proxy: ProxyServer,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    path: str,
    body: bytes,
    status: int,
    param: str | None,
) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(proxy.url + path, data=body, headers=headers) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert response.headers["X-Request-Id"]
        assert_openai_error(await response.json(), status, param)
    # Nothing reached the workers.
    assert prefill.generate_requests() == decode.generate_requests() == []


async def test_oversized_body_is_a_413(
    make_proxy: ProxyFactory, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    server = await make_proxy([], [decode], max_body_bytes=1024)
    big = {"model": MODEL, "prompt": "x" * 2048}
    async with http.post(server.url + "/v1/completions", json=big) as response:
        assert response.status == 413
        assert_openai_error(await response.json(), 413, None)

    async def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(4):
            yield b"x" * 512

    async with http.post(server.url + "/v1/completions", data=chunks()) as response:
        assert response.status == 413
        assert_openai_error(await response.json(), 413, None)
    # A body under the limit still works.
    async with http.post(server.url + "/v1/completions", json=GOOD_COMPLETION) as response:
        assert response.status == 200


async def test_unknown_routes_and_methods(proxy: ProxyServer, http: aiohttp.ClientSession) -> None:
    async with http.get(proxy.url + "/v1/completions") as response:
        assert response.status == 405
        assert_openai_error(await response.json(), 405, None)
    async with http.post(proxy.url + "/v1/embeddings", json={}) as response:
        assert response.status == 404
        assert_openai_error(await response.json(), 404, None)


async def test_model_may_be_omitted_like_vllm_allows(
    proxy: ProxyServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        proxy.url + "/v1/chat/completions", json={**GOOD_CHAT, "model": None}
    ) as r:
        assert r.status == 200


@pytest.mark.parametrize(
    "prompt",
    ["text", ["one text"], [1, 2, 3], [[1, 2, 3]]],
)
async def test_every_prompt_form_is_accepted(
    proxy: ProxyServer, prefill: FakeWorker, http: aiohttp.ClientSession, prompt: object
) -> None:
    async with http.post(
        proxy.url + "/v1/completions", json={**GOOD_COMPLETION, "prompt": prompt}
    ) as r:
        assert r.status == 200
    assert prefill.generate_requests()[0].body["prompt"] == prompt


async def test_a_proxy_bug_is_an_openai_500_not_a_traceback(
    proxy: ProxyServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.pd_flow import PDFlow

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(PDFlow, "_serve", broken)
    async with http.post(proxy.url + "/v1/completions", json=GOOD_COMPLETION) as response:
        assert response.status == 500
        payload = await response.json()
    assert_openai_error(payload, 500, None)
    assert "Traceback" not in payload["error"]["message"]
