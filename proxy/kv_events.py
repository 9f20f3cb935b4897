"""Keeps a :class:`~proxy.kv_index.KVIndex` in sync with the KV cache events of every
registered instance that advertises ``kv_events`` (see :mod:`proxy.kv_index` for vLLM's
wire format and replay protocol).

One task per instance owns a ZMQ SUB socket on the instance's PUB ``endpoint`` and is the
only writer of that instance's index entries (plus :meth:`KVEventSubscriber` itself when
the instance leaves or is re-admitted). Nothing here runs inside a request handler:
routing code only reads the index.

Ordering and recovery, per instance:

* A live batch whose seq is the next expected is applied. A gap (the SUB socket dropped
  messages at its high-water mark, or the subscription joined a running engine) is
  filled from the instance's replay ROUTER: a fresh DEALER sends ``["", first missing
  seq]`` and applies the answers ``["", topic, seq, payload]`` in order until the end
  marker ``["", "", -1, ""]``; live batches meanwhile wait in the SUB socket's queue and
  are then read as usual (those the replay covered are duplicates). When the replay
  starts later than asked (the publisher's ``buffer_steps`` no longer hold the gap) the
  index is resynced at its first seq; when it times out, or the instance has no replay
  endpoint, at the live batch's seq. Every resync drops the instance's blocks (removals
  in the gap are unknown) and is counted by reason.
* On start each subscription replays from seq 0 once, so an idle engine's cache is known
  before its next event.
* Restarts: a publisher numbers its batches from 0 and one PUB stream never repeats or
  reorders a seq, so a live seq not above the previous live one means the publisher
  restarted: the instance is reset, then the batch applied (a gap from 0 is replayed).
  An instance the health checks ejected and then re-admitted is reset too, since the
  engine may have restarted unseen (its new seqs overtaking the old ones before the
  first live message came).

Flood bound: a subscription handles at most ``max_batches_per_turn`` batches (live or
replayed) before it yields to the event loop (``asyncio.sleep(0)``): pyzmq's asyncio
``recv`` completes without yielding while messages are queued, so without this a flood
would hold the loop. Each batch is decoded and applied in one step (bounded by
``max_message_bytes``).

Memory: the index's bounds (``max_blocks_per_instance`` x ``max_instances`` x about
127 bytes) plus, per instance, at most ``receive_queue_batches`` queued messages of at
most ``max_message_bytes`` each (ZMQ ``RCVHWM`` and ``MAXMSGSIZE``; a larger message
closes the connection, which ZMQ re-opens; its batches come back as a gap). A replay is
applied as it streams in, never collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.background import BackgroundTask, supervised
from proxy.config import KVEventsSubscribeConfig
from proxy.instances import Instance
from proxy.kv_index import EventBatch, KVIndex, decode_event_batch
from proxy.registry import InstanceRegistry

__all__ = ["KV_INDEX_KEY", "KVEventMetrics", "KVEventSubscriber", "SubscriptionStats"]

log = logging.getLogger(__name__)

# The public app's index of cached blocks (set only when the subscription is on).
KV_INDEX_KEY = web.AppKey("pdserve_kv_index", KVIndex)

# vLLM's ZmqEventPublisher.END_SEQ: the last frame of a replay answer.
END_SEQ = (-1).to_bytes(8, "big", signed=True)

REPLAY_OUTCOMES = ("filled", "short", "timeout")
RESYNC_REASONS = ("replay_short", "replay_timeout", "no_replay", "malformed")
RESET_REASONS = ("seq_restart", "readmitted")


class KVEventMetrics:
    """The subscriber's series, in the proxy's registry; the ``instance`` label is the
    registered instance URL (chosen by the operator, dropped when the instance leaves)."""

    def __init__(self, registry: CollectorRegistry, index: KVIndex) -> None:
        self.batches = Counter(
            "pdserve_kv_event_batches_applied",
            "KV event batches applied to the proxy's block index, live or replayed.",
            ["instance"],
            registry=registry,
        )
        self.gaps = Counter(
            "pdserve_kv_event_gaps",
            "Live KV event batches that arrived after missing ones (dropped by ZMQ, or the "
            "subscription joined a running engine).",
            ["instance"],
            registry=registry,
        )
        self.replays = Counter(
            "pdserve_kv_event_replays",
            "Replays asked of the instance's replay endpoint, by outcome: filled, short "
            "(its buffer no longer held the first missing batch), timeout.",
            ["instance", "outcome"],
            registry=registry,
        )
        self.resyncs = Counter(
            "pdserve_kv_event_resyncs",
            "Gaps accepted as lost (the instance's indexed blocks dropped), by reason: "
            "replay_short, replay_timeout, no_replay (no replay endpoint, or it recently "
            "timed out), malformed (a batch that did not decode).",
            ["instance", "reason"],
            registry=registry,
        )
        self.resets = Counter(
            "pdserve_kv_event_resets",
            "Instances whose index was reset because the engine restarted, by how it was "
            "seen: seq_restart (its seqs started again), readmitted (health checks).",
            ["instance", "reason"],
            registry=registry,
        )
        registry.register(_IndexGauges(index))

    def forget(self, instance: str) -> None:
        """Drop every series of an instance that left."""
        with contextlib.suppress(KeyError):  # older prometheus_client raise it when absent
            self.batches.remove(instance)
        with contextlib.suppress(KeyError):
            self.gaps.remove(instance)
        for counter, values in (
            (self.replays, REPLAY_OUTCOMES),
            (self.resyncs, RESYNC_REASONS),
            (self.resets, RESET_REASONS),
        ):
            for value in values:
                with contextlib.suppress(KeyError):
                    counter.remove(instance, value)


class _IndexGauges(Collector):
    """Read from the index at scrape time: only instances still indexed have a series."""

    def __init__(self, index: KVIndex) -> None:
        self._index = index

    def collect(self) -> Iterator[Metric]:
        blocks = GaugeMetricFamily(
            "pdserve_kv_index_blocks",
            "Prefix-cache blocks the proxy's index holds for the instance.",
            labels=["instance"],
        )
        synced = GaugeMetricFamily(
            "pdserve_kv_index_synced",
            "1 if the instance's index is in sync with its KV events (0 during a gap).",
            labels=["instance"],
        )
        for name, stats in self._index.stats().instances.items():
            blocks.add_metric([name], stats.blocks)
            synced.add_metric([name], 1.0 if stats.synced else 0.0)
        yield blocks
        yield synced


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription, for checks and debugging."""

    live_batches: int = 0
    replayed_batches: int = 0
    yields: int = 0


class _Subscription:
    """One instance's SUB socket and the task that reads it."""

    def __init__(
        self,
        instance: Instance,
        ctx: zmq.asyncio.Context,
        index: KVIndex,
        metrics: KVEventMetrics,
        config: KVEventsSubscribeConfig,
        sockets: _SocketCount,
    ) -> None:
        assert instance.kv_events is not None
        self.instance = instance
        self.url = instance.url
        self.endpoint = instance.kv_events.endpoint
        self.replay_endpoint = instance.kv_events.replay_endpoint
        self.stats = SubscriptionStats()
        self.was_healthy = instance.healthy
        self._ctx = ctx
        self._index = index
        self._metrics = metrics
        self._config = config
        self._sockets = sockets
        self._last_live_seq: int | None = None
        self._since_yield = 0
        # Bumped by a reset from outside the task: a replay under way stops applying.
        self._epoch = 0
        self._replay_down_until = 0.0
        self._replay_warned = False
        self._malformed_logged = False
        self._batches = metrics.batches.labels(self.url)
        self.task = asyncio.create_task(self._run(), name=f"pdserve-kv-events {self.url}")

    def reset(self, reason: str) -> None:
        """The engine may have restarted: forget its blocks and expect seq 0 again."""
        self._epoch += 1
        self._last_live_seq = None
        self._index.reset(self.url)
        self._metrics.resets.labels(self.url, reason).inc()
        log.info("KV events of %s: index reset (%s)", self.url, reason)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    # -- the task ---------------------------------------------------------------------------

    async def _run(self) -> None:
        sub = self._socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                with supervised(log, "initial KV event replay of %s", self.url):
                    self._replay_finished(await self._replay(0), 0, initial=True)
            while True:
                frames = await sub.recv_multipart()
                with supervised(log, "KV events of %s", self.url):
                    await self._on_live(frames)
                await self._maybe_yield()
        finally:
            self._close(sub)

    async def _on_live(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._malformed(f"{len(frames)} frames", None)
            return
        seq = int.from_bytes(frames[1], "big")
        self.stats.live_batches += 1
        if self._last_live_seq is not None and seq <= self._last_live_seq:
            self.reset("seq_restart")
        self._last_live_seq = seq
        batch = self._decode(frames[2], seq)
        if batch is None:
            return
        result = self._index.apply(self.url, seq, batch)
        if result.status == "applied":
            self._batches.inc()
            return
        if result.status != "gap" or result.missing is None:
            return  # a duplicate (the replay had it) or refused (the index is full)
        self._metrics.gaps.labels(self.url).inc()
        if self.replay_endpoint is None or time.monotonic() < self._replay_down_until:
            self._resync(seq, "no_replay")
            self._apply(seq, batch)
            return
        outcome = await self._replay(result.missing[0])
        # The replay normally covers this batch already (a duplicate now).
        if self._index.apply(self.url, seq, batch).status == "gap":
            if outcome == "filled":
                outcome = "short"  # the buffer ended before this batch: nothing to fill with
            self._resync(seq, "replay_" + outcome)
            self._apply(seq, batch)
        self._replay_finished(outcome, result.missing[0], initial=False)

    async def _replay(self, start: int) -> str:
        """Ask for every batch from ``start`` and apply them as they come; the outcome:
        filled, short (resynced at the first seq the buffer still had) or timeout."""
        dealer = self._socket(zmq.DEALER)
        epoch = self._epoch
        outcome = "filled"
        try:
            dealer.connect(self.replay_endpoint or "")
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            expected = start
            timeout_ms = int(self._config.replay_timeout_s * 1000)
            while True:
                if not await dealer.poll(timeout_ms):
                    outcome = "timeout"
                    break
                frames = await dealer.recv_multipart()
                if len(frames) != 4 or len(frames[2]) != 8:
                    self._malformed(f"replay answer of {len(frames)} frames", None)
                    continue
                if frames[2] == END_SEQ:
                    break
                if epoch != self._epoch:
                    continue  # reset meanwhile: read to the end, apply nothing
                seq = int.from_bytes(frames[2], "big")
                self.stats.replayed_batches += 1
                if seq > expected:
                    # The buffer no longer holds what is missing (or ZMQ dropped some).
                    outcome = "short"
                    self._resync(seq, "replay_short")
                expected = max(expected, seq + 1)
                batch = self._decode(frames[3], seq)
                if batch is not None:
                    self._apply(seq, batch)
                await self._maybe_yield()
        finally:
            self._close(dealer)
        return outcome

    def _replay_finished(self, outcome: str, start: int, *, initial: bool) -> None:
        self._metrics.replays.labels(self.url, outcome).inc()
        if outcome != "timeout":
            if self._replay_warned:
                self._replay_warned = False
                log.warning("KV event replay of %s answers again", self.url)
            return
        # Gaps resync at once for a while rather than stall this stream on each one.
        self._replay_down_until = time.monotonic() + self._config.replay_backoff_s
        if initial:
            # Usually an engine still starting: its first live batch will tell.
            log.info("KV event replay of %s did not answer (engine starting?)", self.url)
        elif not self._replay_warned:
            self._replay_warned = True
            log.warning(
                "KV event replay of %s (%s) did not answer within %.1f s from seq %d; "
                "gaps are resynced (cached blocks forgotten) until it does",
                self.url,
                self.replay_endpoint,
                self._config.replay_timeout_s,
                start,
            )

    # -- helpers ----------------------------------------------------------------------------

    def _apply(self, seq: int, batch: EventBatch) -> None:
        if self._index.apply(self.url, seq, batch).status == "applied":
            self._batches.inc()

    def _resync(self, next_seq: int, reason: str) -> None:
        self._index.resync(self.url, next_seq)
        self._metrics.resyncs.labels(self.url, reason).inc()

    def _decode(self, payload: bytes, seq: int) -> EventBatch | None:
        try:
            return decode_event_batch(payload)
        except ValueError as exc:
            self._malformed(str(exc), seq)
            return None

    def _malformed(self, what: str, seq: int | None) -> None:
        if not self._malformed_logged:
            self._malformed_logged = True
            log.warning(
                "KV events of %s: malformed message (%s); skipped (logged once)", self.url, what
            )
        if seq is not None:
            # The batch cannot be applied: accept it as lost and go on after it.
            self._resync(seq + 1, "malformed")

    async def _maybe_yield(self) -> None:
        self._since_yield += 1
        if self._since_yield >= self._config.max_batches_per_turn:
            self._since_yield = 0
            self.stats.yields += 1
            await asyncio.sleep(0)

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        self._sockets.open += 1
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._config.receive_queue_batches)
        sock.setsockopt(zmq.MAXMSGSIZE, self._config.max_message_bytes)
        return sock

    def _close(self, sock: zmq.asyncio.Socket) -> None:
        if not sock.closed:
            sock.close(linger=0)
            self._sockets.open -= 1


@dataclass(slots=True)
class _SocketCount:
    open: int = 0


class KVEventSubscriber:
    """Subscribes to every registered instance with ``kv_events``; explicit start/stop.

    Instances are picked up by a reconcile loop every ``sync_interval_s`` (which also
    notices re-admissions); a removed instance is dropped at once, through the registry's
    ``on_remove`` callback.
    """

    def __init__(
        self,
        registry: InstanceRegistry,
        index: KVIndex,
        config: KVEventsSubscribeConfig,
        metrics_registry: CollectorRegistry,
    ) -> None:
        self.index = index
        self.metrics = KVEventMetrics(metrics_registry, index)
        self._registry = registry
        self._config = config
        self._ctx: zmq.asyncio.Context | None = None
        self._subs: dict[str, _Subscription] = {}
        self._sockets = _SocketCount()
        self._loop = BackgroundTask("pdserve-kv-events-reconcile", self._run)
        # Tasks of dropped subscriptions until they have closed their sockets.
        self._retired: set[asyncio.Task[None]] = set()
        registry.on_remove(self._on_remove)

    async def start(self) -> None:
        if self._loop.running:
            return
        # A context of its own (not zmq's global instance): stop() can terminate it.
        self._ctx = zmq.asyncio.Context()
        self.reconcile()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            await sub.stop()
        for retired in list(self._retired):
            with contextlib.suppress(asyncio.CancelledError):
                await retired
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.term()

    @property
    def running(self) -> bool:
        return self._loop.running

    @property
    def zmq_context(self) -> zmq.asyncio.Context | None:
        """The subscriber's own ZMQ context while started (terminated by stop)."""
        return self._ctx

    @property
    def open_sockets(self) -> int:
        return self._sockets.open

    def subscribed(self) -> dict[str, SubscriptionStats]:
        """Instance URL -> its subscription's counters."""
        return {url: sub.stats for url, sub in self._subs.items()}

    def reconcile(self) -> None:
        """Subscribe to new instances, drop gone ones, reset re-admitted ones."""
        if self._ctx is None:
            return
        wanted = {i.url: i for i in self._registry.instances() if i.kv_events is not None}
        for url, sub in list(self._subs.items()):
            instance = wanted.get(url)
            if instance is not sub.instance:  # gone, or re-registered as another Instance
                self._drop(url)
                continue
            if instance.healthy and not sub.was_healthy:
                sub.reset("readmitted")
            sub.was_healthy = instance.healthy
        for url, instance in wanted.items():
            if url not in self._subs:
                self._subs[url] = _Subscription(
                    instance, self._ctx, self.index, self.metrics, self._config, self._sockets
                )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._config.sync_interval_s)
            with supervised(log, "KV event subscriptions reconcile"):
                self.reconcile()

    def _on_remove(self, instance: Instance) -> None:
        sub = self._subs.get(instance.url)
        if sub is not None and sub.instance is instance:
            self._drop(instance.url)

    def _drop(self, url: str) -> None:
        """Forget an instance now; its task closes its sockets when it next runs."""
        sub = self._subs.pop(url)
        sub.task.cancel()
        self._retired.add(sub.task)
        sub.task.add_done_callback(self._retired.discard)
        self.index.remove_instance(url)
        self.metrics.forget(url)
