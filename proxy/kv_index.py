"""Which prefix-cache blocks each engine instance holds, kept from vLLM's KV events.

Input: the batches vLLM's ``ZmqEventPublisher`` (``vllm/distributed/kv_events.py``)
publishes, one PUB message ``(topic, seq, payload)`` per batch: ``seq`` an 8-byte
big-endian counter starting at 0 in each publisher (one per engine process and DP rank:
a restarted engine starts again at 0), ``payload`` msgpack of ``KVEventBatch``, an array
``[ts, events, data_parallel_rank]`` whose events are maps tagged ``"type"``:
``BlockStored``, ``BlockRemoved`` or ``AllBlocksCleared``. :func:`decode_event_batch`
turns a payload into this module's :class:`EventBatch` with msgpack alone (no vLLM,
no msgspec); :func:`event_batch_from` converts vLLM's own event objects.

Sequence numbers: a batch is applied only when its seq is the next one expected, so the
index always equals the engine's cache as of some seq. Lower: a duplicate, ignored and
counted. Higher: a gap; the batch is not applied, :class:`ApplyResult` names the missing
range and the instance is unsynced (every lookup gives 0) until the missing batches are
applied in order or :meth:`KVIndex.resync` / :meth:`KVIndex.reset` is called. A fresh
instance expects seq 0, so joining a running engine reports the gap ``(0, seq - 1)``.
Recovery (done by the caller, which owns the sockets): vLLM's replay ROUTER socket
(``--kv-events-config`` ``replay_endpoint``) takes the first missing seq as 8 bytes
big-endian behind an empty delimiter frame and answers with every batch it still holds
from there (the last ``buffer_steps``, 10 000 by default) as ``("", topic, seq,
payload)``, then ``("", "", -1 as 8 signed bytes, "")``; it answers many messages per
request, so a DEALER socket reads them. When the replay starts after the first missing
seq the gap cannot be filled: :meth:`KVIndex.resync` at the next seq to apply. The index
cannot tell a restart from duplicates (a restarted publisher's seqs are below the last
one seen): the caller calls :meth:`KVIndex.reset` when it learns that an engine restarted.

What is indexed: the device tier only, events whose ``medium`` is ``"GPU"`` (what vLLM's
main block pool reports, CPU backends included) or unset; CPU/STORAGE offload tiers are
counted as ignored. Keys are :func:`proxy.block_hashes.to_block_key` of the event
hashes, the 64-bit keys :func:`proxy.block_hashes.block_keys` computes for a
prompt. Each key maps to its live copy count: the engine may cache identical blocks
twice (two requests computing one prefix in the same step) and removes them one event
each, so a key leaves the index when its last copy does. ``parent_block_hash`` is not
kept: a prefix lookup walks the prompt's own chain, and a removal leaves nothing behind.
Engines asked for ``kv_cache_report_mode="full"`` re-store reused blocks, inflating
counts; a key then outlives its eviction until its instance is reset or bounded.

Memory: one ``OrderedDict[int, int]`` per instance, about 127 bytes per indexed block
(measured with tracemalloc over 1M blocks of 64-bit keys, CPython 3.11, key objects
included), so at most about ``127 * max_blocks_per_instance * max_instances`` bytes. An
instance over ``max_blocks_per_instance`` (its removals were lost, or the bound is below
the engine's block count) loses its least recently stored keys, counted in
``evicted_for_bound``; instances beyond ``max_instances`` are refused (logged once,
counted). Lookups cost O(prompt blocks) per instance; nothing here is thread-safe.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from proxy.block_hashes import BlockKey, to_block_key

__all__ = [
    "DEVICE_MEDIA",
    "AllBlocksCleared",
    "ApplyResult",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "IndexStats",
    "InstanceStats",
    "KVEvent",
    "KVIndex",
    "decode_event_batch",
    "event_batch_from",
]

log = logging.getLogger(__name__)

# vLLM's main block pool always says "GPU" (MEDIUM_GPU), on CPU backends too; None is
# an event that names no medium. Offload tiers say "CPU" or "STORAGE" and are not indexed.
DEVICE_MEDIA = frozenset({"GPU", None})


@dataclass(frozen=True, slots=True)
class BlockStored:
    keys: tuple[BlockKey, ...]
    block_size: int | None = None
    medium: str | None = None
    parent_key: BlockKey | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    keys: tuple[BlockKey, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published ``KVEventBatch``; ``unknown_events`` counts event types not understood."""

    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None
    unknown_events: int = 0


ApplyStatus = Literal["applied", "duplicate", "gap", "refused"]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """``missing`` (first, last seq, inclusive) is set for a gap: replay from ``missing[0]``."""

    status: ApplyStatus
    missing: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class InstanceStats:
    blocks: int
    next_seq: int
    synced: bool
    gaps: int
    duplicates: int
    evicted_for_bound: int
    # Events skipped: another medium, another block size, or a type this module does not know.
    ignored_events: int
    # Removals of keys not indexed: lost stores, bound evictions, or a resync that dropped them.
    unknown_removals: int


@dataclass(frozen=True, slots=True)
class IndexStats:
    instances: dict[str, InstanceStats]
    refused_batches: int


@dataclass(slots=True)
class _Instance:
    # Key -> live copies, least recently stored first (the end the bound evicts from).
    blocks: OrderedDict[BlockKey, int] = field(default_factory=OrderedDict)
    next_seq: int = 0
    synced: bool = True
    gaps: int = 0
    duplicates: int = 0
    evicted_for_bound: int = 0
    ignored_events: int = 0
    unknown_removals: int = 0
    bound_logged: bool = False


class KVIndex:
    """Per-instance block indexes fed by KV event batches; see the module docstring."""

    def __init__(
        self, max_blocks_per_instance: int, max_instances: int, *, block_size: int | None = None
    ) -> None:
        """``block_size``, when given, is the engines' hash block size: stored events of
        another size (which could never match the prompt keys) are counted as ignored."""
        for name, value in (
            ("max_blocks_per_instance", max_blocks_per_instance),
            ("max_instances", max_instances),
            ("block_size", 1 if block_size is None else block_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVIndex {name} must be an integer >= 1, got {value!r}")
        self._max_blocks = max_blocks_per_instance
        self._max_instances = max_instances
        self._block_size = block_size
        self._instances: dict[str, _Instance] = {}
        self._refused_batches = 0
        self._refusal_logged = False

    # -- feeding ----------------------------------------------------------------------------

    def apply(self, instance: str, seq: int, batch: EventBatch) -> ApplyResult:
        """Apply ``batch``, published by ``instance`` with sequence number ``seq``."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"KV event seq from {instance!r} must be an int >= 0, got {seq!r}")
        state = self._state(instance)
        if state is None:
            self._refused_batches += 1
            return ApplyResult("refused")
        if seq < state.next_seq:
            state.duplicates += 1
            return ApplyResult("duplicate")
        if seq > state.next_seq:
            if state.synced:
                state.synced = False
                state.gaps += 1
                log.info(
                    "KV events of %s: gap, seqs %d..%d missing; lookups give 0 until resynced",
                    instance,
                    state.next_seq,
                    seq - 1,
                )
            return ApplyResult("gap", (state.next_seq, seq - 1))
        state.ignored_events += batch.unknown_events
        for event in batch.events:
            self._apply_event(instance, state, event)
        state.next_seq = seq + 1
        state.synced = True
        return ApplyResult("applied")

    def reset(self, instance: str) -> None:
        """Forget ``instance``'s blocks and expect seq 0: the engine (re)started or was cleared.

        An unknown instance is left unknown: its first batch finds the same fresh state.
        """
        state = self._instances.get(instance)
        if state is not None:
            state.blocks.clear()
            state.next_seq = 0
            state.synced = True

    def resync(self, instance: str, next_seq: int, *, keep_blocks: bool = False) -> None:
        """Accept an unrecoverable gap: the next batch applied is ``next_seq``.

        By default the blocks are dropped, since removals in the gap are unknown (a stale
        key would send requests where their prefix no longer is). ``keep_blocks`` keeps
        them, trading that for the stores the engine will not send again.
        """
        if isinstance(next_seq, bool) or not isinstance(next_seq, int) or next_seq < 0:
            raise ValueError(
                f"resync of {instance!r}: next_seq must be an int >= 0, got {next_seq!r}"
            )
        # Creates an unknown instance: that is how a late joiner starts at the current seq.
        state = self._state(instance)
        if state is not None:
            if not keep_blocks:
                state.blocks.clear()
            state.next_seq = next_seq
            state.synced = True

    def remove_instance(self, instance: str) -> None:
        """Drop ``instance`` and everything known about it (it left the pool)."""
        self._instances.pop(instance, None)

    # -- lookups ----------------------------------------------------------------------------

    def cached_prefix_blocks(self, instance: str, keys: Sequence[BlockKey]) -> int:
        """How many leading blocks of a prompt (its :func:`block_keys`) ``instance`` holds.

        Only a contiguous prefix counts: vLLM's prefix cache stops at the first miss. An
        unknown or unsynced instance holds 0.
        """
        state = self._instances.get(instance)
        if state is None or not state.synced:
            return 0
        return _prefix_length(state.blocks, keys)

    def synced(self, instance: str) -> bool:
        """Whether ``instance`` is indexed and its events were applied without a gap since."""
        state = self._instances.get(instance)
        return state is not None and state.synced

    def best_matches(self, keys: Sequence[BlockKey]) -> dict[str, int]:
        """:meth:`cached_prefix_blocks` for every known instance."""
        return {
            name: _prefix_length(state.blocks, keys) if state.synced else 0
            for name, state in self._instances.items()
        }

    def cached_keys(self, instance: str) -> list[BlockKey]:
        """``instance``'s indexed keys, least recently stored first (for checks and debugging)."""
        state = self._instances.get(instance)
        return [] if state is None else list(state.blocks)

    def stats(self) -> IndexStats:
        return IndexStats(
            instances={
                name: InstanceStats(
                    blocks=len(state.blocks),
                    next_seq=state.next_seq,
                    synced=state.synced,
                    gaps=state.gaps,
                    duplicates=state.duplicates,
                    evicted_for_bound=state.evicted_for_bound,
                    ignored_events=state.ignored_events,
                    unknown_removals=state.unknown_removals,
                )
                for name, state in self._instances.items()
            },
            refused_batches=self._refused_batches,
        )

    # -- internals --------------------------------------------------------------------------

    def _state(self, instance: str) -> _Instance | None:
        state = self._instances.get(instance)
        if state is not None:
            return state
        if len(self._instances) >= self._max_instances:
            if not self._refusal_logged:
                self._refusal_logged = True
                log.warning(
                    "KV index holds its maximum of %d instances; ignoring events of %s "
                    "(and of any further instance, without logging again)",
                    self._max_instances,
                    instance,
                )
            return None
        state = self._instances[instance] = _Instance()
        return state

    def _apply_event(self, instance: str, state: _Instance, event: KVEvent) -> None:
        if isinstance(event, AllBlocksCleared):
            state.blocks.clear()
            return
        if event.medium not in DEVICE_MEDIA:
            state.ignored_events += 1
            return
        blocks = state.blocks
        if isinstance(event, BlockRemoved):
            for key in event.keys:
                copies = blocks.get(key)
                if copies is None:
                    state.unknown_removals += 1
                elif copies == 1:
                    del blocks[key]
                else:
                    blocks[key] = copies - 1
            return
        if self._block_size is not None and event.block_size != self._block_size:
            state.ignored_events += 1
            return
        for key in event.keys:
            blocks[key] = blocks.get(key, 0) + 1
            blocks.move_to_end(key)
        excess = len(blocks) - self._max_blocks
        if excess > 0:
            for _ in range(excess):
                blocks.popitem(last=False)
            state.evicted_for_bound += excess
            if not state.bound_logged:
                state.bound_logged = True
                log.warning(
                    "KV index of %s reached %d blocks; dropping the least recently stored "
                    "(lost removals, or a bound below the engine's block count)",
                    instance,
                    self._max_blocks,
                )


def _prefix_length(blocks: Mapping[BlockKey, int], keys: Sequence[BlockKey]) -> int:
    for index, key in enumerate(keys):
        if key not in blocks:
            return index
    return len(keys)


# -- decoding -------------------------------------------------------------------------------


def decode_event_batch(payload: bytes) -> EventBatch:
    """A published message's third frame (msgpack ``KVEventBatch``) as an :class:`EventBatch`."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"KV event payload ({len(payload)} bytes) is not msgpack: {exc}") from exc
    return event_batch_from(raw)


def event_batch_from(batch: Any) -> EventBatch:
    """An :class:`EventBatch` from a decoded payload (``[ts, events, dp_rank]``, events as
    tagged maps) or from vLLM's ``KVEventBatch`` object; an EventBatch is returned as is.

    vLLM's event classes are recognised by name (their msgspec tag), so this module
    never imports vLLM. Event types it does not know are counted, not fatal.
    """
    if isinstance(batch, EventBatch):
        return batch
    if isinstance(batch, list | tuple):
        if len(batch) not in (2, 3):
            raise ValueError(
                f"KV event batch must be [ts, events, dp_rank], got {len(batch)} items"
            )
        ts, events = batch[0], batch[1]
        rank = batch[2] if len(batch) == 3 else None
    elif hasattr(batch, "events") and hasattr(batch, "ts"):
        ts, events, rank = batch.ts, batch.events, getattr(batch, "data_parallel_rank", None)
    else:
        raise ValueError(f"not a KV event batch: {type(batch).__name__}")
    if not isinstance(events, Iterable):
        raise ValueError(f"KV event batch events must be a list, got {type(events).__name__}")
    parsed: list[KVEvent] = []
    unknown = 0
    for position, raw_event in enumerate(events):
        event = _event_from(raw_event, position)
        if event is None:
            unknown += 1
        else:
            parsed.append(event)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise ValueError(f"KV event batch data_parallel_rank must be an int, got {rank!r}")
    try:
        timestamp = float(ts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"KV event batch ts must be a number, got {ts!r}") from exc
    return EventBatch(timestamp, tuple(parsed), rank, unknown)


def _event_from(raw: Any, position: int) -> KVEvent | None:
    if isinstance(raw, BlockStored | BlockRemoved | AllBlocksCleared):
        return raw
    if isinstance(raw, Mapping):
        tag = raw.get("type")

        def get(name: str) -> Any:
            return raw.get(name)

    else:
        tag = type(raw).__name__

        def get(name: str) -> Any:
            return getattr(raw, name, None)

    try:
        if tag == "BlockStored":
            parent = get("parent_block_hash")
            return BlockStored(
                keys=_keys(get("block_hashes")),
                block_size=_optional_int(get("block_size"), "block_size"),
                medium=_medium(get("medium")),
                parent_key=None if parent is None else to_block_key(parent),
            )
        if tag == "BlockRemoved":
            return BlockRemoved(keys=_keys(get("block_hashes")), medium=_medium(get("medium")))
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"KV event {position} ({tag}) is malformed: {exc}") from exc
    return None


def _keys(hashes: Any) -> tuple[BlockKey, ...]:
    if not isinstance(hashes, list | tuple):
        raise ValueError(f"block_hashes must be a list, got {type(hashes).__name__}")
    return tuple(to_block_key(h) for h in hashes)


def _optional_int(value: Any, name: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{name} must be an int, got {value!r}")


def _medium(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"medium must be a string, got {value!r}")
    # Connectors are not consistent about case ("cpu" in one, "CPU" in vLLM's constants).
    return value.upper()
