"""The cache-aware PD decision (``prefill_bypass``) and the hit check, through a real proxy.

Fake workers serve the requests and report a prefix-cache hit as vLLM does; the proxy's KV
index is fed the blocks an instance holds the way its KV events would feed it. Prompts are
token ids, so the proxy computes their block keys without a tokenizer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import COMPLETIONS, MODEL, assert_no_load_left, metric_value, wait_for

from benchmarks.fake_worker import FakeWorker
from proxy.block_hashes import HashSettings, block_keys, resolve_none_hash_seed
from proxy.kv_index import BlockStored, EventBatch
from proxy.server import ProxyServer

BLOCK = 16
SETTINGS = HashSettings(BLOCK, "sha256", resolve_none_hash_seed("sha256", None))
PROMPT = list(range(100, 100 + 10 * BLOCK + 5))  # 10 full blocks and 5 tokens


def kv_cache_config(**extra: Any) -> dict[str, Any]:
    return {
        "decode_policy": {"name": "kv_cache"},
        "prefill_policy": {"name": "kv_cache"},
        "prefill_bypass": {"max_uncached_tokens": 2 * BLOCK},
        **extra,
    }


async def started(server: ProxyServer, *workers: FakeWorker) -> ProxyServer:
    """Once the proxy knows every worker's hash settings (read from its /metrics)."""
    probe = server.hash_settings
    assert probe is not None
    await wait_for(lambda: all(probe.settings_for(w.url) == SETTINGS for w in workers), 5.0)
    return server


def index_holds(server: ProxyServer, worker: FakeWorker, prompt: list[int], blocks: int) -> None:
    """The index learns that ``worker`` stored the first ``blocks`` blocks of ``prompt``, as
    from one KV event batch."""
    assert server.kv_index is not None
    keys = tuple(block_keys(prompt, SETTINGS)[:blocks])
    seq = server.kv_index.stats().instances.get(worker.url)
    batch = EventBatch(time.time(), (BlockStored(keys, BLOCK),))
    result = server.kv_index.apply(worker.url, seq.next_seq if seq else 0, batch)
    assert result.status == "applied"


async def complete(
    http: aiohttp.ClientSession, server: ProxyServer, prompt: list[int], stream: bool = False
) -> bytes:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": stream}
    async with http.post(server.url + COMPLETIONS, json=body) as response:
        data = await response.read()
        assert response.status == 200, data
        return data


def metric(server: ProxyServer, name: str, **labels: str) -> float:
    return metric_value(server.metrics.render().decode(), name, **labels)


def on_path(server: ProxyServer, path: str) -> float:
    labels = {"endpoint": "completions", "model": MODEL, "status": "200", "path": path}
    return metric(server, "pdserve_requests_total", **labels)


@pytest.fixture
async def pd(
    make_worker: WorkerFactory, make_proxy: ProxyFactory
) -> tuple[ProxyServer, FakeWorker, FakeWorker, FakeWorker]:
    prefill = await make_worker("prefill", block_size=BLOCK)
    warm = await make_worker("decode", tokens=3, block_size=BLOCK)
    cold = await make_worker("decode", tokens=3, block_size=BLOCK)
    server = await make_proxy([prefill], [warm, cold], **kv_cache_config())
    return await started(server, prefill, warm, cold), prefill, warm, cold


async def test_a_decode_caching_the_prompt_serves_it_whole_without_a_prefill_leg(
    pd: tuple[ProxyServer, FakeWorker, FakeWorker, FakeWorker], http: aiohttp.ClientSession
) -> None:
    server, prefill, warm, cold = pd
    index_holds(server, warm, PROMPT, 9)  # 165 tokens, 144 cached: a 21-token tail
    for stream in (False, True):
        await complete(http, server, PROMPT, stream)
    assert len(warm.generate_requests()) == 2
    assert not prefill.generate_requests() and not cold.generate_requests()
    for recorded in warm.generate_requests():
        assert "kv_transfer_params" not in recorded.body  # served whole, as aggregated
    assert on_path(server, "cache_bypass") == 2
    assert on_path(server, "disaggregated") == 0
    await assert_no_load_left(server)


@pytest.mark.parametrize(
    ("blocks", "why"),
    [(0, "nothing cached"), (8, "a 37-token tail is over the 32-token threshold")],
)
async def test_otherwise_the_prefill_leg_runs_and_the_decode_chosen_first_gets_the_kv(
    pd: tuple[ProxyServer, FakeWorker, FakeWorker, FakeWorker],
    http: aiohttp.ClientSession,
    blocks: int,
    why: str,
) -> None:
    server, prefill, warm, cold = pd
    if blocks:
        index_holds(server, warm, PROMPT, blocks)
    await complete(http, server, PROMPT)
    assert len(prefill.generate_requests()) == 1, why
    decodes = warm.generate_requests() + cold.generate_requests()
    assert len(decodes) == 1
    assert "kv_transfer_params" in decodes[0].body
    if blocks:
        # Chosen before the prefill leg, for its cache: it pulls only the tail's blocks.
        assert warm.generate_requests() == decodes
    assert on_path(server, "disaggregated") == 1
    assert on_path(server, "cache_bypass") == 0
    await assert_no_load_left(server)


async def test_a_short_uncached_prompt_is_not_a_bypass(
    pd: tuple[ProxyServer, FakeWorker, FakeWorker, FakeWorker], http: aiohttp.ClientSession
) -> None:
    """A prompt under the threshold but with nothing cached: disagg_min_prompt_tokens, not
    the cache, decides whether it skips the prefill leg."""
    server, prefill, _, _ = pd
    await complete(http, server, PROMPT[:20])
    assert len(prefill.generate_requests()) == 1
    assert on_path(server, "cache_bypass") == 0


async def test_a_failed_bypass_is_decided_again_among_the_other_decodes(
    pd: tuple[ProxyServer, FakeWorker, FakeWorker, FakeWorker], http: aiohttp.ClientSession
) -> None:
    server, prefill, warm, cold = pd
    index_holds(server, warm, PROMPT, 10)
    warm.faults.fail_requests = 1
    await complete(http, server, PROMPT)
    # The cold decode caches nothing: the request went through a prefill leg there.
    assert len(prefill.generate_requests()) == 1
    assert len(cold.generate_requests()) == 1
    assert "kv_transfer_params" in cold.generate_requests()[0].body
    assert on_path(server, "disaggregated") == 1
    await assert_no_load_left(server)


async def test_the_decode_chosen_first_is_replaced_when_it_leaves_during_the_prefill(
    pd: tuple[ProxyServer, FakeWorker, FakeWorker, FakeWorker], http: aiohttp.ClientSession
) -> None:
    server, prefill, warm, cold = pd
    index_holds(server, warm, PROMPT, 6)  # 69 uncached: prefill, then the warm decode
    gate = prefill.faults.gate = asyncio.Event()
    task = asyncio.create_task(complete(http, server, PROMPT))
    await wait_for(lambda: len(prefill.generate_requests()) == 1)
    chosen = server.registry.require(warm.url)
    assert chosen.in_flight_requests == 1  # counted from the decision on
    server.drain_instance(warm.url)
    gate.set()
    await task
    assert not warm.generate_requests()
    assert len(cold.generate_requests()) == 1
    await assert_no_load_left(server)


async def test_predictions_agree_with_the_engine_and_are_published(
    pd: tuple[ProxyServer, FakeWorker, FakeWorker, FakeWorker], http: aiohttp.ClientSession
) -> None:
    server, prefill, warm, _ = pd
    index_holds(server, warm, PROMPT, 10)
    warm.cached_tokens = 10 * BLOCK
    await complete(http, server, PROMPT)  # bypass: the warm decode serves it whole
    labels = {"role": "decode", "instance": warm.url}
    assert metric(server, "pdserve_routing_predicted_hit_tokens_total", **labels) == 160
    assert metric(server, "pdserve_routing_observed_hit_tokens_total", **labels) == 160
    assert metric(server, "pdserve_routing_hit_checks_total", **labels) == 1
    assert metric(server, "pdserve_routing_cache_trusted", **labels) == 1
    # A prefill leg is checked too: the prefill engine's answer always reports usage.
    prefill.cached_tokens = 0
    other = [7, *PROMPT[1:]]
    index_holds(server, prefill, PROMPT, 2)  # its events reached the index: it is synced
    await complete(http, server, other)
    labels = {"role": "prefill", "instance": prefill.url}
    assert metric(server, "pdserve_routing_hit_checks_total", **labels) == 1


async def test_an_instance_whose_hits_disagree_is_routed_on_load_until_they_agree(
    make_worker: WorkerFactory,
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An engine that reports hits the proxy never predicts (its hashes are not the
    proxy's): after a window of such requests the proxy says why, sets the gauge the alert
    reads, stops trusting the index for it, and trusts it again once it agrees."""
    caplog.set_level(logging.INFO, "proxy.hit_check")
    decode = await make_worker("decode", tokens=3, block_size=BLOCK, cached_tokens=64)
    config = {
        "decode_policy": {"name": "kv_cache"},
        "cache_check": {"window": 4, "min_agreement": 0.5},
    }
    server = await started(await make_proxy([], [decode], **config), decode)
    assert server.hit_check is not None
    labels = {"role": "decode", "instance": decode.url}
    prompt = PROMPT[: 4 * BLOCK + 1]  # a 64-token hit at most, as the engine reports
    # Its events reach the index, under keys that never match the proxy's.
    index_holds(server, decode, [5, *PROMPT], 3)
    for _ in range(3):
        await complete(http, server, prompt)
    assert metric(server, "pdserve_routing_hit_checks_total", **labels) == 3
    assert metric(server, "pdserve_routing_cache_trusted", **labels) == 1
    await complete(http, server, prompt)  # the window is full: 0 predicted, 256 observed
    assert metric(server, "pdserve_routing_cache_trusted", **labels) == 0
    assert metric(server, "pdserve_routing_cache_distrusted_total", **labels) == 1
    assert metric(server, "pdserve_routing_predicted_hit_tokens_total", **labels) == 0
    assert metric(server, "pdserve_routing_observed_hit_tokens_total", **labels) == 256
    warnings = [r for r in caplog.records if "disagree with the engine" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "block hashes are not the engine's" in warnings[0].getMessage()
    assert server.hit_check.settings_for(decode.url) is None  # routed on load alone
    # The index catches up (its events arrive): predictions agree again.
    index_holds(server, decode, prompt, 4)
    await complete(http, server, prompt)
    # 3 of the 4 samples in the window still disagree: agreement 25 %.
    assert server.hit_check.settings_for(decode.url) is None
    await complete(http, server, prompt)  # 50 %: enough
    assert metric(server, "pdserve_routing_cache_trusted", **labels) == 1
    assert server.hit_check.settings_for(decode.url) == SETTINGS
    assert [r for r in caplog.records if "agree with the engine again" in r.getMessage()]
    assert len([r for r in caplog.records if "disagree" in r.getMessage()]) == 1
    # An instance that leaves takes its series along.
    assert metric(server, "pdserve_routing_cache_distrusted_total", **labels) == 1
    server.remove_instance(decode.url)
    routing_series = [
        line
        for line in server.metrics.render().decode().splitlines()
        if line.startswith(("pdserve_routing_hit", "pdserve_routing_cache", "pdserve_routing_pre"))
        or line.startswith("pdserve_routing_observed")
    ]
    assert not [line for line in routing_series if decode.url in line]


async def test_streamed_answers_and_answers_without_usage_details_are_not_checked(
    pd: tuple[ProxyServer, FakeWorker, FakeWorker, FakeWorker], http: aiohttp.ClientSession
) -> None:
    server, _, warm, _ = pd
    index_holds(server, warm, PROMPT, 10)
    await complete(http, server, PROMPT)  # no cached_tokens in the answer
    warm.cached_tokens = 160
    await complete(http, server, PROMPT, stream=True)
    labels = {"role": "decode", "instance": warm.url}
    assert metric(server, "pdserve_routing_hit_checks_total", **labels) == 0
    assert on_path(server, "cache_bypass") == 2


def test_bypass_needs_a_cache_aware_decode_policy() -> None:
    from proxy.config import ProxyConfig

    config = ProxyConfig.model_validate(
        {"decode_policy": {"name": "least_load"}, "prefill_bypass": {"max_uncached_tokens": 8}}
    )
    with pytest.raises(ValueError, match="needs a cache-aware decode_policy"):
        ProxyServer(config)


def test_the_answer_parser_reads_vllms_usage_details() -> None:
    from proxy.hit_check import observed_cached_tokens

    answer = orjson.dumps(
        {
            "choices": [{"text": "cached_tokens"}],
            "usage": {
                "prompt_tokens": 70,
                "total_tokens": 73,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": 64},
            },
        }
    )
    assert observed_cached_tokens(answer) == 64
    assert observed_cached_tokens(b'{"usage":{"prompt_tokens":3}}') is None
    assert observed_cached_tokens(b'{"prompt_tokens_details":{"cached_tokens":null}}') is None
