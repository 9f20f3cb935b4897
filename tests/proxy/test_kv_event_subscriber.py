"""proxy.kv_events: the subscriber keeping the block index in sync with instances' KV events.

The publisher is vLLM's own ``ZmqEventPublisher`` (its PUB and replay ROUTER sockets, its
publisher thread, its msgspec encoding) on 127.0.0.1 ports; a live message is "lost" by
wrapping its PUB socket so that chosen seqs are not sent while they still enter the
replay buffer. Skipped without vLLM.

ZMQ's slow joiner drops what a PUB sends before a SUB's subscription arrives, so each test
first publishes empty batches until the subscription sees a live one, and compares
counters from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.block_hashes import to_block_key
from proxy.config import KVEventsSubscribeConfig, ProxyConfig
from proxy.instances import KvEventsEndpoint, Role
from proxy.kv_events import KVEventSubscriber
from proxy.kv_index import KVIndex
from proxy.registry import InstanceRegistry
from proxy.server import ProxyServer

kv_events: ModuleType = pytest.importorskip("vllm.distributed.kv_events")

URL = "http://127.0.0.1:8100"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _DroppingPub:
    """vLLM's PUB socket, minus the seqs in ``drop`` (they still enter the replay buffer)."""

    def __init__(self, real: Any, drop: set[int]) -> None:
        self._real = real
        self._drop = drop

    def send_multipart(self, frames: tuple[bytes, bytes, bytes]) -> None:
        if int.from_bytes(frames[1], "big") not in self._drop:
            self._real.send_multipart(frames)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Publisher:
    """A vLLM ZmqEventPublisher and the seq its next batch gets."""

    def __init__(self, pub_port: int, replay_port: int, buffer_steps: int = 10_000) -> None:
        self.pub_port, self.replay_port = pub_port, replay_port
        # vLLM binds a PUB endpoint only when it has a wildcard (else it connects).
        self.zmq = kv_events.ZmqEventPublisher(
            0,
            endpoint=f"tcp://*:{pub_port}",
            replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
            buffer_steps=buffer_steps,
        )
        self.drop: set[int] = set()
        self.zmq._pub = _DroppingPub(self.zmq._pub, self.drop)
        self.next_seq = 0

    def kv_events(self, replay: bool = True) -> KvEventsEndpoint:
        return KvEventsEndpoint(
            f"tcp://127.0.0.1:{self.pub_port}",
            f"tcp://127.0.0.1:{self.replay_port}" if replay else None,
        )

    def publish(self, events: list[Any], *, lost: bool = False) -> int:
        seq = self.next_seq
        self.next_seq += 1
        if lost:
            self.drop.add(seq)
        self.zmq.publish(kv_events.KVEventBatch(ts=1.0, events=events))
        return seq

    def store(self, *hashes: int, lost: bool = False) -> int:
        event = kv_events.BlockStored(
            block_hashes=list(hashes),
            parent_block_hash=None,
            token_ids=[1] * (16 * len(hashes)),
            block_size=16,
            lora_id=None,
            medium=kv_events.MEDIUM_GPU,
            lora_name=None,
        )
        return self.publish([event], lost=lost)

    def remove(self, *hashes: int) -> int:
        return self.publish(
            [kv_events.BlockRemoved(block_hashes=list(hashes), medium=kv_events.MEDIUM_GPU)]
        )

    async def close(self) -> None:
        await asyncio.to_thread(self.zmq.shutdown)


async def rebind(old: Publisher) -> Publisher:
    """A new publisher on ``old``'s ports: ZMQ releases them shortly after the close."""
    for _ in range(100):
        try:
            return Publisher(old.pub_port, old.replay_port)
        except Exception as exc:  # zmq.ZMQError: address in use, for a moment
            error = exc
            await asyncio.sleep(0.02)
    raise AssertionError(f"ports of the old publisher stay in use: {error}")


def keys(*hashes: int) -> list[int]:
    return [to_block_key(h) for h in hashes]


def fast_config(**overrides: Any) -> KVEventsSubscribeConfig:
    settings: dict[str, Any] = {
        "sync_interval_s": 0.05,
        # A replay that answers must never time out on a loaded machine (that would count as
        # replay_timeout); the test of the timeout itself dials an endpoint nobody serves.
        "replay_timeout_s": 10.0,
        "max_batches_per_turn": 16,
    }
    return KVEventsSubscribeConfig(**(settings | overrides))


class Harness:
    def __init__(self) -> None:
        self.registry = InstanceRegistry()
        self.publishers: list[Publisher] = []
        self.subscribers: list[tuple[KVEventSubscriber, CollectorRegistry]] = []

    def publisher(self, buffer_steps: int = 10_000) -> Publisher:
        pub = Publisher(free_port(), free_port(), buffer_steps)
        self.publishers.append(pub)
        return pub

    async def subscriber(
        self, index: KVIndex | None = None, **config: Any
    ) -> tuple[KVEventSubscriber, CollectorRegistry]:
        metrics = CollectorRegistry()
        sub = KVEventSubscriber(
            self.registry, index or KVIndex(100_000, 16), fast_config(**config), metrics
        )
        await sub.start()
        self.subscribers.append((sub, metrics))
        return sub, metrics

    async def close(self) -> None:
        for sub, _ in self.subscribers:
            await sub.stop()
        for pub in self.publishers:
            await pub.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.close()


async def until(
    condition: Callable[[], bool], *, nudge: Publisher | None = None, within_s: float = 60.0
) -> None:
    """Wait for ``condition``; ``nudge`` publishes an empty batch each try (see the docstring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        if nudge is not None:
            nudge.publish([])
        await asyncio.sleep(0.05)


async def live(sub: KVEventSubscriber, pub: Publisher, url: str = URL) -> None:
    """Until the subscription has had a live batch and applied everything published."""

    def had_live() -> bool:
        stats = sub.subscribed().get(url)
        return stats is not None and stats.live_batches > 0

    await until(had_live, nudge=pub)
    await caught_up(sub, pub, url)


async def caught_up(sub: KVEventSubscriber, pub: Publisher, url: str = URL) -> None:
    def done() -> bool:
        stats = sub.index.stats().instances.get(url)
        return stats is not None and stats.synced and stats.next_seq == pub.next_seq

    await until(done)


def sample(metrics: CollectorRegistry, name: str, **labels: str) -> float:
    return metrics.get_sample_value(name, {"instance": URL} | labels) or 0.0


def counts(metrics: CollectorRegistry) -> dict[str, float]:
    out = {
        f"replays:{o}": sample(metrics, "pdserve_kv_event_replays_total", outcome=o)
        for o in ("filled", "short", "timeout")
    }
    out |= {
        f"resyncs:{r}": sample(metrics, "pdserve_kv_event_resyncs_total", reason=r)
        for r in ("replay_short", "replay_timeout", "no_replay", "malformed")
    }
    out["gaps"] = sample(metrics, "pdserve_kv_event_gaps_total")
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


async def test_events_are_applied_in_order(harness: Harness) -> None:
    pub = harness.publisher()
    harness.registry.add(URL, Role.DECODE, pub.kv_events())
    sub, metrics = await harness.subscriber()
    await live(sub, pub)
    applied = sample(metrics, "pdserve_kv_event_batches_applied_total")
    pub.store(1, 2)
    pub.store(3)
    pub.remove(1)
    await caught_up(sub, pub)
    assert sub.index.cached_keys(URL) == keys(2, 3)
    assert sample(metrics, "pdserve_kv_event_batches_applied_total") == applied + 3
    assert sample(metrics, "pdserve_kv_index_blocks") == 2
    assert sample(metrics, "pdserve_kv_index_synced") == 1


async def test_a_removed_instance_is_dropped_and_its_socket_closed(harness: Harness) -> None:
    pub = harness.publisher()
    harness.registry.add(URL, Role.DECODE, pub.kv_events())
    sub, metrics = await harness.subscriber()
    await live(sub, pub)
    pub.store(7)
    await caught_up(sub, pub)
    assert sub.open_sockets == 1

    harness.registry.remove(URL)
    # At once, not at the next reconcile: no entries, no series.
    assert URL not in sub.index.stats().instances
    assert URL not in sub.subscribed()
    assert sample(metrics, "pdserve_kv_event_batches_applied_total") == 0
    assert metrics.get_sample_value("pdserve_kv_index_blocks", {"instance": URL}) is None
    await until(lambda: sub.open_sockets == 0)
    pub.store(8)
    await asyncio.sleep(0.2)
    assert URL not in sub.index.stats().instances


async def test_a_gap_is_filled_from_the_replay_endpoint(harness: Harness) -> None:
    pub = harness.publisher()
    harness.registry.add(URL, Role.DECODE, pub.kv_events())
    sub, metrics = await harness.subscriber()
    await live(sub, pub)
    before = counts(metrics)
    pub.store(1)
    pub.store(2, lost=True)
    pub.store(3)
    await caught_up(sub, pub)
    assert sub.index.cached_keys(URL) == keys(1, 2, 3)
    assert delta(before, counts(metrics)) == {"gaps": 1, "replays:filled": 1}


async def test_a_replay_that_cannot_fill_the_gap_ends_in_a_resync(harness: Harness) -> None:
    pub = harness.publisher(buffer_steps=2)
    harness.registry.add(URL, Role.DECODE, pub.kv_events())
    sub, metrics = await harness.subscriber()
    await live(sub, pub)
    before = counts(metrics)
    pub.store(1)
    for lost in (2, 3, 4):
        pub.store(lost, lost=True)
    pub.store(5)
    await caught_up(sub, pub)
    # The buffer held the last two batches only: what was indexed before is forgotten.
    assert sub.index.cached_keys(URL) == keys(4, 5)
    assert delta(before, counts(metrics)) == {
        "gaps": 1,
        "replays:short": 1,
        "resyncs:replay_short": 1,
    }


async def test_without_a_replay_endpoint_a_gap_is_resynced(harness: Harness) -> None:
    pub = harness.publisher()
    harness.registry.add(URL, Role.DECODE, pub.kv_events(replay=False))
    sub, metrics = await harness.subscriber()
    await live(sub, pub)
    before = counts(metrics)
    pub.store(1)
    pub.store(2, lost=True)
    pub.store(3)
    await caught_up(sub, pub)
    assert sub.index.cached_keys(URL) == keys(3)
    assert delta(before, counts(metrics)) == {"gaps": 1, "resyncs:no_replay": 1}


async def test_a_replay_endpoint_that_does_not_answer_times_out(harness: Harness) -> None:
    pub = harness.publisher()
    silent = KvEventsEndpoint(pub.kv_events().endpoint, f"tcp://127.0.0.1:{free_port()}")
    harness.registry.add(URL, Role.DECODE, silent)
    sub, metrics = await harness.subscriber(replay_timeout_s=0.2, replay_backoff_s=0)
    await live(sub, pub)
    before = counts(metrics)
    pub.store(1)
    pub.store(2, lost=True)
    pub.store(3)
    await caught_up(sub, pub)
    assert sub.index.cached_keys(URL) == keys(3)
    assert delta(before, counts(metrics)) == {
        "gaps": 1,
        "replays:timeout": 1,
        "resyncs:replay_timeout": 1,
    }


async def test_a_restarted_publisher_resets_the_instance(harness: Harness) -> None:
    pub = harness.publisher()
    harness.registry.add(URL, Role.DECODE, pub.kv_events())
    sub, metrics = await harness.subscriber()
    await live(sub, pub)
    pub.store(1)
    # Far enough ahead that the new publisher's seqs cannot overtake the old ones while
    # the SUB socket reconnects (a restart the seqs cannot show: see the readmission test).
    for _ in range(50):
        pub.publish([])
    await caught_up(sub, pub)

    await pub.close()
    harness.publishers.remove(pub)
    restarted = await rebind(pub)
    harness.publishers.append(restarted)
    await until(
        lambda: sample(metrics, "pdserve_kv_event_resets_total", reason="seq_restart") == 1,
        nudge=restarted,
    )
    restarted.store(2)
    await caught_up(sub, restarted)
    assert sub.index.cached_keys(URL) == keys(2)


async def test_a_readmitted_instance_is_reset(harness: Harness) -> None:
    pub = harness.publisher()
    instance = harness.registry.add(URL, Role.DECODE, pub.kv_events())
    sub, metrics = await harness.subscriber(sync_interval_s=3600)
    await live(sub, pub)
    pub.store(1)
    await caught_up(sub, pub)
    harness.registry.set_healthy(instance, False)
    sub.reconcile()
    assert sub.index.cached_keys(URL) == keys(1)  # ejected alone changes nothing
    harness.registry.set_healthy(instance, True)
    sub.reconcile()
    assert sub.index.cached_keys(URL) == []
    assert sample(metrics, "pdserve_kv_event_resets_total", reason="readmitted") == 1
    # The engine did not restart after all: its next batch is a gap from 0, replayed.
    pub.store(2)
    await caught_up(sub, pub)
    assert sub.index.cached_keys(URL) == keys(1, 2)


async def test_a_flood_does_not_starve_the_loop_and_memory_stays_bounded(
    harness: Harness,
) -> None:
    per_turn, total, bound = 32, 20_000, 5_000
    pub = harness.publisher(buffer_steps=total + 100)
    harness.registry.add(URL, Role.DECODE, pub.kv_events())
    sub, metrics = await harness.subscriber(
        KVIndex(bound, 4), max_batches_per_turn=per_turn, receive_queue_batches=total + 100
    )
    await live(sub, pub)
    stats = sub.subscribed()[URL]

    def handled() -> int:
        return stats.live_batches + stats.replayed_batches

    # A callback scheduled every loop iteration: how many batches ran between two of its
    # runs is how long the subscriber held the loop.
    seen: list[int] = []
    loop = asyncio.get_running_loop()

    def tick() -> None:
        seen.append(handled())
        if not done.is_set():
            loop.call_soon(tick)

    done = asyncio.Event()
    loop.call_soon(tick)
    start, yields = handled(), stats.yields
    for hash_ in range(1_000, 1_000 + total):
        pub.store(hash_)
    await caught_up(sub, pub)
    done.set()
    assert handled() - start >= total
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(steps) <= per_turn
    assert stats.yields - yields >= total // per_turn // 2
    # The index kept its bound: the newest blocks, the rest counted as evicted.
    index_stats = sub.index.stats().instances[URL]
    assert index_stats.blocks == bound
    assert index_stats.evicted_for_bound == total - bound
    assert sub.index.cached_keys(URL)[-1] == to_block_key(1_000 + total - 1)
    assert sample(metrics, "pdserve_kv_index_blocks") == bound


async def test_start_and_stop_leave_no_tasks_or_sockets(harness: Harness) -> None:
    before = asyncio.all_tasks()
    pubs = [harness.publisher(), harness.publisher()]
    for port, pub in zip((8100, 8101), pubs, strict=True):
        harness.registry.add(f"http://127.0.0.1:{port}", Role.DECODE, pub.kv_events())
    harness.registry.add("http://127.0.0.1:8102", Role.PREFILL)  # no kv_events: not subscribed
    sub = KVEventSubscriber(harness.registry, KVIndex(100, 4), fast_config(), CollectorRegistry())
    await sub.start()
    for port, pub in zip((8100, 8101), pubs, strict=True):
        await live(sub, pub, f"http://127.0.0.1:{port}")
    assert set(sub.subscribed()) == {"http://127.0.0.1:8100", "http://127.0.0.1:8101"}
    harness.registry.remove("http://127.0.0.1:8101")  # a dropped subscription, not awaited yet
    context = sub.zmq_context
    assert context is not None
    await sub.stop()
    assert sub.open_sockets == 0
    assert context.closed
    assert sub.zmq_context is None and not sub.running
    assert asyncio.all_tasks() == before
    await sub.stop()  # idempotent


async def test_two_subscribers_fed_by_one_publisher_agree(harness: Harness) -> None:
    pub = harness.publisher()
    harness.registry.add(URL, Role.DECODE, pub.kv_events())
    first, _ = await harness.subscriber()
    second, _ = await harness.subscriber()
    await live(first, pub)
    await live(second, pub)
    rng = random.Random(7)
    held: list[int] = []
    for step in range(300):
        if held and rng.random() < 0.4:
            victims = rng.sample(held, k=min(len(held), rng.randint(1, 3)))
            for victim in victims:
                held.remove(victim)
            pub.remove(*victims)
        else:
            new = [10_000 + step * 4 + i for i in range(rng.randint(1, 4))]
            held.extend(new)
            pub.store(*new, lost=rng.random() < 0.05)
    await caught_up(first, pub)
    await caught_up(second, pub)
    assert first.index.cached_keys(URL) == second.index.cached_keys(URL)
    assert sorted(first.index.cached_keys(URL)) == sorted(keys(*held))


def _subscribed_urls(server: ProxyServer) -> Iterable[str]:
    assert server.kv_events is not None
    return server.kv_events.subscribed()


async def test_the_proxy_server_owns_the_subscriber() -> None:
    pub = Publisher(free_port(), free_port())
    try:
        config = ProxyConfig(
            port=0,
            admin={"port": None},
            decode=[{"url": URL, "kv_events": pub.kv_events().to_json()}],
        )
        async with ProxyServer(config) as server:
            assert server.kv_events is not None and server.kv_events.running
            assert list(_subscribed_urls(server)) == [URL]
            await live(server.kv_events, pub)
        assert server.kv_events.open_sockets == 0 and not server.kv_events.running
        off = ProxyServer(ProxyConfig(port=0, kv_events={"subscribe": False}))
        assert off.kv_index is None and off.kv_events is None
    finally:
        await pub.close()
