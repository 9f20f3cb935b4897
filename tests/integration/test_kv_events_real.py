"""The proxy's KV-event subscription on a real vLLM engine: what the engine caches, the index
knows, under the block hashes the proxy computes itself.

The engine is the session's ``decode_queued`` worker (float32, block size 32, dev mode for
``/reset_prefix_cache``); a request sent to it directly, without ``kv_transfer_params``, is
computed there and its full blocks enter its prefix cache. Prompts are token ids, unique per
test, so nothing else in the session shares their blocks. Waits are on the index's contents,
never on time alone.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from proxy.block_hashes import HashSettings, block_keys, resolve_none_hash_seed
from proxy.config import KVEventsSubscribeConfig
from proxy.instances import KvEventsEndpoint, Role
from proxy.kv_events import KVEventSubscriber
from proxy.kv_index import KVIndex
from proxy.registry import InstanceRegistry
from tests.engine_support import MODEL_NAME, RunningServer
from tests.integration.pd_support import until

pytestmark = pytest.mark.slow

WAIT_S = 60.0
PROMPT_BLOCKS = 6  # full blocks of the engine's block size, plus a partial tail


@dataclass
class Subscribed:
    engine: RunningServer
    index: KVIndex
    settings: HashSettings


def _engine_hash_settings(engine: RunningServer) -> HashSettings:
    """Block size and hash algorithm as the engine reports them (vllm:cache_config_info);
    the seed is the default one, since the session's engines run without PYTHONHASHSEED."""
    metrics = engine.get("/metrics").decode()
    info = next(line for line in metrics.splitlines() if line.startswith("vllm:cache_config_info"))
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info))
    algo = labels["prefix_caching_hash_algo"]
    return HashSettings(int(labels["block_size"]), algo, resolve_none_hash_seed(algo, None))


def _complete(engine: RunningServer, prompt: list[int]) -> None:
    body = json.dumps(
        {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    ).encode()
    request = urllib.request.Request(
        engine.url + "/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200


def _reset_prefix_cache(engine: RunningServer) -> bool:
    """vLLM refuses (success false) while blocks are still held; the caller asks again."""
    reset = urllib.request.Request(engine.url + "/reset_prefix_cache", b"", method="POST")
    with urllib.request.urlopen(reset, timeout=30) as response:
        return bool(json.load(response)["success"])


def _unique_prompt(settings: HashSettings, seed: int) -> list[int]:
    rng = random.Random(seed)
    # Ids inside the tiny model's vocabulary (585), away from its special tokens.
    return [rng.randrange(100, 500) for _ in range(settings.block_size * PROMPT_BLOCKS + 7)]


async def _until(predicate: Callable[[], bool], what: str) -> None:
    await until(predicate, what, WAIT_S)


@pytest.fixture
async def subscribed(real_decode_queued: RunningServer) -> AsyncIterator[Subscribed]:
    engine = real_decode_queued
    assert engine.kv_events_ports is not None
    events, replay = engine.kv_events_ports
    registry = InstanceRegistry()
    registry.add(
        engine.url,
        Role.DECODE,
        KvEventsEndpoint(f"tcp://127.0.0.1:{events}", f"tcp://127.0.0.1:{replay}"),
    )
    index = KVIndex(max_blocks_per_instance=100_000, max_instances=4)
    subscriber = KVEventSubscriber(
        registry, index, KVEventsSubscribeConfig(sync_interval_s=0.1), CollectorRegistry()
    )
    await subscriber.start()
    try:
        # Subscribed; an idle engine has published nothing, so the index may not list it yet.
        # Batches sent before the subscription connected come back through the replay.
        await _until(lambda: engine.url in subscriber.subscribed(), "subscription started")
        yield Subscribed(engine, index, _engine_hash_settings(engine))
    finally:
        await subscriber.stop()


async def _cached_and_indexed(subscribed: Subscribed, seed: int) -> list[int]:
    """A new prompt, computed by the engine, once the index lists every full block of it under
    the proxy's own hashes (and none before)."""
    engine, index = subscribed.engine, subscribed.index
    prompt = _unique_prompt(subscribed.settings, seed)
    keys = block_keys(prompt, subscribed.settings)
    assert len(keys) == PROMPT_BLOCKS
    assert index.cached_prefix_blocks(engine.url, keys) == 0
    await asyncio.to_thread(_complete, engine, prompt)
    await _until(
        lambda: index.cached_prefix_blocks(engine.url, keys) == PROMPT_BLOCKS,
        "every full block of the prompt indexed under the proxy's hashes",
    )
    return prompt


@pytest.mark.timeout(300)
async def test_the_index_holds_what_the_engine_cached_under_the_proxys_own_hashes(
    subscribed: Subscribed,
) -> None:
    engine, index, settings = subscribed.engine, subscribed.index, subscribed.settings
    prompt = await _cached_and_indexed(subscribed, seed=1)
    # A prompt sharing the first half: its first blocks hit, the rest do not.
    half = PROMPT_BLOCKS // 2
    other = prompt[: settings.block_size * half] + _unique_prompt(settings, seed=2)
    assert index.cached_prefix_blocks(engine.url, block_keys(other, settings)) == half
    # Hashes computed with another block size or seed match nothing: a mismatch is visible.
    wrong_size = HashSettings(settings.block_size // 2, settings.algo, settings.none_hash_seed)
    wrong_seed = HashSettings(settings.block_size, settings.algo, "not-the-engine-seed")
    for wrong in (wrong_size, wrong_seed):
        assert index.cached_prefix_blocks(engine.url, block_keys(prompt, wrong)) == 0


@pytest.mark.timeout(300)
async def test_a_prefix_cache_reset_empties_the_instance_in_the_index(
    subscribed: Subscribed,
) -> None:
    engine, index = subscribed.engine, subscribed.index
    prompt = await _cached_and_indexed(subscribed, seed=3)
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await asyncio.to_thread(_reset_prefix_cache, engine):
        assert asyncio.get_running_loop().time() < deadline, "the engine kept refusing the reset"
        await asyncio.sleep(0.2)
    # vLLM publishes the events of a step with that step: the reset's AllBlocksCleared leaves
    # with the engine's next one, so one short request (no full block of its own) follows.
    await asyncio.to_thread(_complete, engine, prompt[:5])
    await _until(
        lambda: index.stats().instances[engine.url].blocks == 0,
        "AllBlocksCleared applied: the instance holds nothing in the index",
    )
    assert index.cached_prefix_blocks(engine.url, block_keys(prompt, subscribed.settings)) == 0
