"""The proxy's routing tokenizer: the ids vLLM 0.32 computes, off the event loop, opt-in only."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ProxyFactory
from proxy_helpers import CHAT, COMPLETIONS, openai_body, wait_for

from benchmarks.fake_worker import FakeWorker
from proxy.block_hashes import HashSettings, block_keys
from proxy.request import Endpoint, parse_client_request
from proxy.server import ProxyServer
from proxy.tokenizer import RoutingTokenizer

SETTINGS = HashSettings(4, "sha256", "vllm-none-hash")
TEXTS = ["hello world", "Prefill and decode are two phases of serving.", "  odd   spacing é ü"]
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "tell me a story"},
    ],
]


@pytest.fixture(scope="module")
def routing_tokenizer(tiny_model: Path) -> RoutingTokenizer:
    tokenizer = RoutingTokenizer(tiny_model, workers=2)
    tokenizer.load_now()
    return tokenizer


def test_ids_match_vllms_own_tokenization(
    tiny_model: Path, routing_tokenizer: RoutingTokenizer
) -> None:
    """vLLM's tokenizer loader, request models and chat renderer, called without an engine."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.renderers.hf import safe_apply_chat_template
    from vllm.tokenizers import get_tokenizer

    vllm_tokenizer = get_tokenizer(str(tiny_model))
    model_config: Any = SimpleNamespace(
        max_model_len=2048,
        tokenizer_revision=None,
        code_revision=None,
        tokenizer=str(tiny_model),
        model=str(tiny_model),
        trust_remote_code=False,
    )
    for text in TEXTS:
        for extra in ({}, {"add_special_tokens": False}):
            completion = CompletionRequest(model="m", prompt=text, **extra)
            # What vLLM's renderer does for a text prompt (renderers/base.py _tokenize_prompt).
            kwargs = completion.build_tok_params(model_config).get_encode_kwargs()
            expected = vllm_tokenizer(text, **kwargs)["input_ids"]
            req = parse_client_request(
                Endpoint.COMPLETIONS, orjson.dumps({"prompt": text, **extra})
            )
            assert routing_tokenizer.prompt_ids(req) == expected
    for messages in CONVERSATIONS:
        for extra in ({}, {"add_generation_prompt": False}):
            chat = ChatCompletionRequest(model="m", messages=messages, **extra)
            params = chat.build_chat_params(None, "auto")
            expected = safe_apply_chat_template(
                model_config,
                vllm_tokenizer,
                messages,
                **params.get_apply_chat_template_kwargs(),
            )
            req = parse_client_request(Endpoint.CHAT, orjson.dumps({"messages": messages, **extra}))
            assert routing_tokenizer.prompt_ids(req) == expected
    # continue_final_message (add_generation_prompt off, as vLLM requires).
    messages = [*CONVERSATIONS[0], {"role": "assistant", "content": "It is"}]
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    chat = ChatCompletionRequest(model="m", messages=messages, **extra)
    expected = safe_apply_chat_template(
        model_config,
        vllm_tokenizer,
        messages,
        **chat.build_chat_params(None, "auto").get_apply_chat_template_kwargs(),
    )
    req = parse_client_request(Endpoint.CHAT, orjson.dumps({"messages": messages, **extra}))
    assert routing_tokenizer.prompt_ids(req) == expected


def test_token_ids_are_used_as_given_and_text_parts_join(
    routing_tokenizer: RoutingTokenizer,
) -> None:
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    req = parse_client_request(Endpoint.COMPLETIONS, orjson.dumps({"prompt": ids}))
    keys = routing_tokenizer.keys_sync(req, SETTINGS)
    assert keys.prompt_tokens == 9 and keys.block_keys == block_keys(ids, SETTINGS)
    parts = [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]
    as_parts = parse_client_request(
        Endpoint.CHAT, orjson.dumps({"messages": [{"role": "user", "content": parts}]})
    )
    as_text = parse_client_request(
        Endpoint.CHAT, orjson.dumps({"messages": [{"role": "user", "content": "a b\nc"}]})
    )
    assert routing_tokenizer.prompt_ids(as_parts) == routing_tokenizer.prompt_ids(as_text)


async def test_unsupported_and_failing_prompts_route_on_load(
    routing_tokenizer: RoutingTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    req = parse_client_request(
        Endpoint.CHAT, orjson.dumps({"messages": [{"role": "user", "content": [image]}]})
    )
    assert await routing_tokenizer.prompt_keys(req, SETTINGS) is None
    broken = RoutingTokenizer(None, workers=1)
    broken._tokenizer = SimpleNamespace()  # no __call__: every text prompt fails
    text = parse_client_request(Endpoint.COMPLETIONS, orjson.dumps({"prompt": "hi"}))
    try:
        assert await broken.prompt_keys(text, SETTINGS) is None
        assert await broken.prompt_keys(text, SETTINGS) is None
    finally:
        broken.close()
    assert sum("tokenizing a prompt failed" in r.getMessage() for r in caplog.records) == 1


async def test_a_long_prompt_tokenizes_in_the_pool_while_the_loop_runs(
    routing_tokenizer: RoutingTokenizer,
) -> None:
    """The tokenizer call waits for a callback scheduled on the event loop: it can only
    complete (with the flag set) if the loop kept running during tokenization."""
    text = "The quick brown fox jumps over the lazy dog. " * 3000  # tens of thousands of ids
    loop_ran = threading.Event()
    seen: dict[str, object] = {}
    real = routing_tokenizer._tokenizer

    class Watching:
        def __call__(self, prompt: str, **kwargs: Any) -> Any:
            seen["thread"] = threading.current_thread().name
            result = real(prompt, **kwargs)
            seen["loop_ran_during"] = loop_ran.wait(timeout=10)
            return result

    tokenizer = RoutingTokenizer(None, workers=1)
    tokenizer._tokenizer = Watching()
    req = parse_client_request(Endpoint.COMPLETIONS, orjson.dumps({"prompt": text}))
    try:
        task = asyncio.ensure_future(tokenizer.prompt_keys(req, SETTINGS))
        await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(loop_ran.set)
        keys = await task
    finally:
        tokenizer.close()
    assert keys is not None and keys.prompt_tokens > 20_000
    assert seen["loop_ran_during"] is True
    assert str(seen["thread"]).startswith("pdserve-tokenize")


# -- the request path -------------------------------------------------------------------------


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    original = RoutingTokenizer.keys_sync

    def counting(self: RoutingTokenizer, req: Any, settings: HashSettings) -> Any:
        calls.append(req)
        return original(self, req, settings)

    monkeypatch.setattr(RoutingTokenizer, "keys_sync", counting)
    return calls


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_default_policies_never_tokenize(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    calls = _count_calls(monkeypatch)
    proxy = await make_proxy(
        [prefill],
        [decode],
        prefill_policy={"name": "prefill_cost"},
        decode_policy={"name": "least_load"},
        routing_tokenizer={"model_dir": str(tiny_model)},
    )
    assert proxy.routing_tokenizer is None and proxy.hash_settings is None
    for _ in range(3):
        async with http.post(proxy.url + path, json=openai_body(path, False, "hi")) as response:
            assert response.status == 200
    assert calls == []
    assert b"pdserve_routing_tokenize_seconds" not in proxy.metrics.render()


async def kv_cache_proxy(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    tokenizer: dict[str, object],
) -> ProxyServer:
    """A proxy routing both pools with kv_cache, once it has read the workers' hash settings
    from their /metrics (until then it would route on load and tokenize nothing)."""
    proxy = await make_proxy(
        [prefill],
        [decode],
        prefill_policy={"name": "kv_cache"},
        decode_policy={"name": "kv_cache", "options": {"epsilon": 0.5}},
        routing_tokenizer=tokenizer,
    )
    probe = proxy.hash_settings
    assert probe is not None
    await wait_for(lambda: all(probe.settings_for(w.url) for w in (prefill, decode)), 5.0)
    return proxy


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_kv_cache_tokenizes_once_per_request(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    calls = _count_calls(monkeypatch)
    proxy = await kv_cache_proxy(
        make_proxy, prefill, decode, {"model_dir": str(tiny_model), "workers": 1}
    )
    assert proxy.routing_tokenizer is not None and proxy.routing_tokenizer.loaded
    for _ in range(3):
        body = openai_body(path, False, "tell me a story about a cat")
        async with http.post(proxy.url + path, json=body) as response:
            assert response.status == 200
    assert len(calls) == 3
    text = proxy.metrics.render().decode()
    assert "pdserve_routing_tokenize_seconds_count 3.0" in text
    # The legs are unchanged: still the client's prompt, not token ids.
    [*_, d_leg] = decode.generate_requests()
    field = "prompt" if path == COMPLETIONS else "messages"
    assert d_leg.body[field] == body[field] and "prompt_token_ids" not in d_leg.body


@pytest.mark.parametrize(
    ("path", "extra", "carried"),
    [
        (COMPLETIONS, {}, True),
        (COMPLETIONS, {"echo": True}, False),  # the engine would echo the ids' text
        (CHAT, {}, False),  # vLLM's chat API takes no token ids
    ],
)
async def test_send_token_ids_puts_the_proxys_ids_on_both_legs(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    tiny_model: Path,
    routing_tokenizer: RoutingTokenizer,
    path: str,
    extra: dict[str, object],
    carried: bool,
) -> None:
    proxy = await kv_cache_proxy(
        make_proxy, prefill, decode, {"model_dir": str(tiny_model), "send_token_ids": True}
    )
    text = "tell me a story about a cat"
    body = openai_body(path, False, text, **extra)
    async with http.post(proxy.url + path, json=body) as response:
        assert response.status == 200
    legs = [*prefill.generate_requests(), *decode.generate_requests()]
    assert len(legs) == 2
    field = "prompt" if path == COMPLETIONS else "messages"
    for leg in legs:
        if carried:
            assert leg.body["prompt"] == routing_tokenizer.encode_completion(text)
        else:
            assert leg.body[field] == body[field]
        assert leg.body.get("echo") == extra.get("echo")
