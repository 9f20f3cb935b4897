"""Cache-aware routing on real vLLM engines: the proxy routes on what the engines' KV events
say they cache, skips the prefill leg when a decode instance caches the prompt, checks its
predictions against the engines' own hit counts, and never changes an answer.

One prefill and two decode engines of the session (float32, block size 32), all publishing
their KV events; the proxy runs in this process, with ``kv_cache`` on both pools. Prompts are
token ids, unique per test, so nothing else in the session shares their blocks; answers are
compared with the session's aggregated engine (greedy). Waits are on the index's contents or
the proxy's counters, never on time alone.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.block_hashes import block_keys
from proxy.config import ProxyConfig
from proxy.server import ProxyServer
from tests.engine_support import KV_SECRET, MODEL_NAME, RunningServer
from tests.integration.pd_support import until
from tests.proxy.proxy_helpers import metric_value

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WAIT_S = 90.0
BLOCK = 32  # the session engines' block size (checked against what the proxy reads)
TAIL = 32  # prefill_bypass.max_uncached_tokens


@dataclass
class CacheRouting:
    proxy: ProxyServer
    prefill: RunningServer
    decodes: tuple[RunningServer, RunningServer]
    aggregated: RunningServer
    http: aiohttp.ClientSession

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.proxy.metrics.render().decode(), name, **labels)

    def decisions(self, engine: RunningServer, role: str = "decode") -> float:
        labels = {"role": role, "policy": "kv_cache", "instance": engine.url}
        return self.metric("pdserve_routing_decisions_total", **labels)

    def requests_on(self, path: str) -> float:
        labels = {"endpoint": "completions", "model": MODEL_NAME, "status": "200", "path": path}
        return self.metric("pdserve_requests_total", **labels)

    def holds(self, engine: RunningServer, prompt: list[int]) -> int:
        """Leading blocks of ``prompt`` the proxy's index lists for ``engine``."""
        assert self.proxy.kv_index is not None and self.proxy.hash_settings is not None
        settings = self.proxy.hash_settings.reference
        assert settings is not None
        return self.proxy.kv_index.cached_prefix_blocks(engine.url, block_keys(prompt, settings))


def _entry(engine: RunningServer) -> dict[str, Any]:
    assert engine.kv_events_ports is not None, f"{engine.name} publishes no KV events"
    events, replay = engine.kv_events_ports
    return {
        "url": engine.url,
        "kv_events": {
            "endpoint": f"tcp://127.0.0.1:{events}",
            "replay_endpoint": f"tcp://127.0.0.1:{replay}",
        },
    }


def _prompt(seed: int, tokens: int) -> list[int]:
    rng = random.Random(seed)
    # Ids inside the tiny model's vocabulary (585), away from its special tokens.
    return [rng.randrange(100, 500) for _ in range(tokens)]


async def _until(predicate: Callable[[], bool], what: str) -> None:
    await until(predicate, what, WAIT_S)


async def _complete(
    http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int = 6
) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    async with http.post(url + "/v1/completions", json=body) as response:
        answer: dict[str, Any] = await response.json()
        assert response.status == 200, answer
        return answer


async def _started(
    prefill: list[RunningServer], decodes: list[RunningServer], **overrides: Any
) -> ProxyServer:
    config = ProxyConfig.model_validate(
        {
            "port": 0,
            "admin": {"port": None},
            "prefill": [_entry(e) for e in prefill],
            "decode": [_entry(e) for e in decodes],
            "prefill_policy": {"name": "kv_cache"},
            "decode_policy": {"name": "kv_cache"},
            "kv_events": {"sync_interval_s": 0.1},
            "health": {"interval_s": 1.0},
            **overrides,
        }
    )
    proxy = ProxyServer(config)
    await proxy.start()
    try:
        probe, events = proxy.hash_settings, proxy.kv_events
        assert probe is not None and events is not None
        engines = [*prefill, *decodes]
        await _until(
            lambda: all(probe.settings_for(e.url) is not None for e in engines),
            "the engines' hash settings read from their /metrics",
        )
        assert probe.reference is not None and probe.reference.block_size == BLOCK
        await _until(
            lambda: all(e.url in events.subscribed() for e in engines), "subscribed to all"
        )
    except BaseException:
        await proxy.stop()
        raise
    return proxy


@pytest.fixture
async def routing(
    monkeypatch: pytest.MonkeyPatch,
    real_prefill: RunningServer,
    real_decode: RunningServer,
    real_decode_queued: RunningServer,
    real_aggregated: RunningServer,
) -> AsyncIterator[CacheRouting]:
    # The KV secret of the session's engines: the proxy releases blocks no decode will read.
    monkeypatch.setenv("PDSERVE_KV_SECRET", KV_SECRET)
    proxy = await _started(
        [real_prefill],
        [real_decode, real_decode_queued],
        prefill_bypass={"max_uncached_tokens": TAIL},
        cache_check={"window": 4},
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            yield CacheRouting(
                proxy, real_prefill, (real_decode, real_decode_queued), real_aggregated, http
            )
    finally:
        await proxy.stop()


async def _same_as_aggregated(routing: CacheRouting, prompt: list[int]) -> dict[str, Any]:
    answer = await _complete(routing.http, routing.proxy.url, prompt)
    reference = await _complete(routing.http, routing.aggregated.url, prompt)
    assert answer["choices"][0]["text"] == reference["choices"][0]["text"]
    assert answer["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"] == len(prompt)
    return answer


async def test_a_warm_prefix_is_routed_to_its_decode_which_skips_the_prefill_when_it_can(
    routing: CacheRouting,
) -> None:
    """A long prompt goes through P and some decode D (nothing cached anywhere); D now holds
    its blocks (pulled, then cached). A prompt extending it by a short tail goes to D and is
    served there whole; one sharing only half of it goes to D through a prefill leg (D pulls
    only what it lacks). Every answer is the aggregated engine's."""
    first = _prompt(seed=11, tokens=6 * BLOCK + 7)
    before = {e.url: routing.decisions(e) for e in routing.decodes}
    prefill_before = routing.decisions(routing.prefill, "prefill")
    disaggregated = routing.requests_on("disaggregated")
    await _same_as_aggregated(routing, first)
    assert routing.requests_on("disaggregated") == disaggregated + 1
    chosen = [e for e in routing.decodes if routing.decisions(e) == before[e.url] + 1]
    assert len(chosen) == 1, "one decode decision"
    warm = chosen[0]
    cold = next(e for e in routing.decodes if e is not warm)
    # The pulled blocks enter the decode's prefix cache and its KV events.
    await _until(lambda: routing.holds(warm, first) == 6, "the warm decode's blocks indexed")
    assert routing.holds(cold, first) == 0

    # 6 cached blocks and a 10-token tail (under TAIL): no prefill leg.
    extended = first[: 6 * BLOCK] + _prompt(seed=12, tokens=10)
    bypassed = routing.requests_on("cache_bypass")
    answer = await _same_as_aggregated(routing, extended)
    assert routing.requests_on("cache_bypass") == bypassed + 1
    assert routing.decisions(warm) == before[warm.url] + 2
    assert routing.decisions(routing.prefill, "prefill") == prefill_before + 1
    # The engine's own count agrees with the proxy's prediction: 192 tokens.
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 6 * BLOCK
    labels = {"role": "decode", "instance": warm.url}
    assert routing.metric("pdserve_routing_predicted_hit_tokens_total", **labels) == 6 * BLOCK
    assert routing.metric("pdserve_routing_observed_hit_tokens_total", **labels) == 6 * BLOCK
    assert routing.metric("pdserve_routing_cache_trusted", **labels) == 1

    # Half of it cached: a 104-token tail is over TAIL, so P computes and D pulls the rest.
    half = first[: 3 * BLOCK] + _prompt(seed=13, tokens=3 * BLOCK + 8)
    await _same_as_aggregated(routing, half)
    assert routing.requests_on("cache_bypass") == bypassed + 1
    assert routing.requests_on("disaggregated") == disaggregated + 2
    assert routing.decisions(warm) == before[warm.url] + 3
    assert routing.decisions(routing.prefill, "prefill") == prefill_before + 2


async def test_a_lost_stretch_of_events_is_replayed_and_routed_on(routing: CacheRouting) -> None:
    """The proxy's subscriptions go away while a decode engine caches a prompt (a request
    sent to it directly): the proxy never saw those events. Subscribed again, it asks the
    engine's replay endpoint for what it missed, and routes on it: a prompt extending that
    one skips the prefill leg on that engine."""
    events = routing.proxy.kv_events
    assert events is not None
    target = routing.decodes[1]
    prompt = _prompt(seed=21, tokens=5 * BLOCK + 3)
    await events.stop()
    await _complete(routing.http, target.url, prompt)  # cached while nobody listened
    assert routing.holds(target, prompt) == 0
    await events.start()
    await _until(lambda: routing.holds(target, prompt) == 5, "the missed batches replayed")
    bypassed = routing.requests_on("cache_bypass")
    extended = prompt[: 5 * BLOCK] + _prompt(seed=22, tokens=12)
    await _same_as_aggregated(routing, extended)
    assert routing.requests_on("cache_bypass") == bypassed + 1


async def test_a_proxy_hashing_with_the_wrong_seed_sees_it_and_routes_on_load(
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: Path,
    real_decode: RunningServer,
    real_decode_queued: RunningServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The engines hash with vLLM's default seed; this proxy is told another one. Its index
    fills with the engines' blocks, but its own keys for a prompt never match them, while the
    engines report hits: after a window of such requests each instance is distrusted (gauge,
    log line naming the seed) and routed on load alone. Answers are unaffected."""
    caplog.set_level(logging.WARNING, "proxy.hit_check")
    monkeypatch.setenv("PDSERVE_KV_SECRET", KV_SECRET)
    decodes = [real_decode, real_decode_queued]
    proxy = await _started(
        [],
        decodes,
        routing_tokenizer={"model_dir": str(tiny_model), "engine_pythonhashseed": "not-it"},
        cache_check={"window": 4},
    )
    try:
        prompt = _prompt(seed=31, tokens=4 * BLOCK + 5)
        async with aiohttp.ClientSession() as http:
            texts = set()
            # Served whole. The policy keeps the prompt where it went first (its routed
            # prefix) until that instance is distrusted, then the other one: 5 requests each
            # (the first a miss) distrust both; ties between them may add a few.
            for _ in range(16):
                answer = await _complete(http, proxy.url, prompt)
                texts.add(answer["choices"][0]["text"])
        assert len(texts) == 1
        render = proxy.metrics.render().decode()
        hit_check = proxy.hit_check
        assert hit_check is not None
        for engine in decodes:
            labels = {"role": "decode", "instance": engine.url}
            assert metric_value(render, "pdserve_routing_predicted_hit_tokens_total", **labels) == 0
            observed = metric_value(render, "pdserve_routing_observed_hit_tokens_total", **labels)
            assert observed >= 4 * 4 * BLOCK
            assert metric_value(render, "pdserve_routing_cache_trusted", **labels) == 0
            assert hit_check.settings_for(engine.url) is None
        warnings = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
        assert len(warnings) == 2, warnings
        assert all("engine_pythonhashseed" in w for w in warnings)
    finally:
        await proxy.stop()


async def test_token_ids_on_the_legs_give_the_aggregated_engines_answers(
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: Path,
    real_prefill: RunningServer,
    real_decode: RunningServer,
    real_aggregated: RunningServer,
) -> None:
    """routing_tokenizer.send_token_ids: the proxy tokenizes a text completion once and both
    legs carry the ids. The answer is the one the aggregated engine gives the text, streamed
    or not, prompt token count included."""
    monkeypatch.setenv("PDSERVE_KV_SECRET", KV_SECRET)
    proxy = await _started(
        [real_prefill],
        [real_decode],
        routing_tokenizer={"model_dir": str(tiny_model), "send_token_ids": True},
    )
    words = " ".join(f"{w} river stone" for w in ("amber", "cobalt", "silver", "umber") * 12)
    try:
        async with aiohttp.ClientSession() as http:
            for stream in (False, True):
                body = {
                    "model": MODEL_NAME,
                    "prompt": words,
                    "max_tokens": 8,
                    "temperature": 0,
                    "stream": stream,
                }
                answers = []
                for url in (proxy.url, real_aggregated.url):
                    async with http.post(url + "/v1/completions", json=body) as response:
                        assert response.status == 200
                        answers.append(await response.read())
                if stream:
                    texts = [_streamed_text(a) for a in answers]
                else:
                    texts = [json.loads(a)["choices"][0]["text"] for a in answers]
                    usages = [json.loads(a)["usage"]["prompt_tokens"] for a in answers]
                    assert usages[0] == usages[1] > 3 * BLOCK
                assert texts[0] == texts[1], texts
        render = proxy.metrics.render().decode()
        assert metric_value(render, "pdserve_routing_tokenize_seconds_count") == 2
        labels = {"endpoint": "completions", "model": MODEL_NAME, "status": "200"}
        assert metric_value(render, "pdserve_requests_total", path="disaggregated", **labels) == 2
    finally:
        await proxy.stop()


def _streamed_text(body: bytes) -> str:
    parts = []
    for block in body.split(b"\n\n"):
        block = block.strip()
        if not block.startswith(b"data: ") or block == b"data: [DONE]":
            continue
        chunk = json.loads(block[len(b"data: ") :])
        assert "error" not in chunk, chunk
        parts += [choice["text"] for choice in chunk["choices"]]
    return "".join(parts)
