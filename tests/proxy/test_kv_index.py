"""proxy.kv_index: the per-instance block index fed by vLLM KV event batches.

Most tests build batches with this module's own event types; the vLLM tests build
vLLM's event objects (``vllm.distributed.kv_events``), feed them directly and through
the msgpack encoding ``ZmqEventPublisher`` uses, and are skipped without vLLM.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from types import ModuleType

import msgpack
import pytest

from proxy.block_hashes import DEFAULT_NONE_HASH_SEED, HashSettings, block_keys
from proxy.kv_index import (
    AllBlocksCleared,
    ApplyResult,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    KVIndex,
    decode_event_batch,
    event_batch_from,
)

SETTINGS = HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED)


def _batch(*events: KVEvent) -> EventBatch:
    return EventBatch(ts=0.0, events=events)


def _stored(*keys: int, medium: str | None = "GPU", block_size: int = 16) -> BlockStored:
    return BlockStored(keys=keys, block_size=block_size, medium=medium)


def _removed(*keys: int, medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved(keys=keys, medium=medium)


def _feed(index: KVIndex, instance: str, *batches: EventBatch, first_seq: int = 0) -> None:
    for seq, batch in enumerate(batches, start=first_seq):
        assert index.apply(instance, seq, batch) == ApplyResult("applied")


# -- event order and prefix semantics ---------------------------------------------------------


def test_stored_then_removed() -> None:
    index = KVIndex(max_blocks_per_instance=100, max_instances=4)
    _feed(index, "a", _batch(_stored(1, 2, 3)))
    assert index.cached_prefix_blocks("a", [1, 2, 3, 4]) == 3
    _feed(index, "a", _batch(_removed(3)), first_seq=1)
    assert index.cached_prefix_blocks("a", [1, 2, 3, 4]) == 2
    assert index.cached_keys("a") == [1, 2]
    # Removed then stored again within one batch: order inside a batch counts too.
    _feed(index, "a", _batch(_removed(2), _stored(3), _stored(2)), first_seq=2)
    assert index.cached_keys("a") == [1, 3, 2]
    _feed(index, "a", _batch(_stored(4), _removed(4)), first_seq=3)
    assert index.cached_prefix_blocks("a", [1, 2, 3, 4]) == 3


def test_only_a_contiguous_prefix_counts() -> None:
    index = KVIndex(100, 4)
    _feed(index, "a", _batch(_stored(1, 2, 3, 4, 5)), _batch(_removed(3)))
    assert index.cached_prefix_blocks("a", [1, 2, 3, 4, 5]) == 2
    assert index.cached_prefix_blocks("a", [9, 1, 2]) == 0
    assert index.cached_prefix_blocks("a", []) == 0
    assert index.cached_prefix_blocks("unknown", [1]) == 0


def test_identical_blocks_stored_twice_need_two_removals() -> None:
    """vLLM may cache one content twice and removes each copy with its own event."""
    index = KVIndex(100, 4)
    _feed(index, "a", _batch(_stored(1, 2)), _batch(_stored(1, 2)), _batch(_removed(1, 2)))
    assert index.cached_prefix_blocks("a", [1, 2]) == 2
    _feed(index, "a", _batch(_removed(1)), first_seq=3)
    assert index.cached_prefix_blocks("a", [1, 2]) == 0
    _feed(index, "a", _batch(_removed(1)), first_seq=4)
    assert index.stats().instances["a"].unknown_removals == 1
    assert index.cached_keys("a") == [2]


def test_best_matches_covers_every_instance() -> None:
    index = KVIndex(100, 4)
    _feed(index, "a", _batch(_stored(1, 2, 3)))
    _feed(index, "b", _batch(_stored(1)))
    _feed(index, "c", _batch(_stored(2, 3)))
    assert index.best_matches([1, 2, 3]) == {"a": 3, "b": 1, "c": 0}


def test_other_media_and_block_sizes_are_not_indexed() -> None:
    index = KVIndex(100, 4, block_size=16)
    _feed(
        index,
        "a",
        _batch(
            _stored(1, medium=None),
            _stored(2, medium="CPU"),
            _stored(3, medium="STORAGE"),
            _stored(4, block_size=32),
            _removed(1, medium="CPU"),
        ),
    )
    assert index.cached_keys("a") == [1]
    assert index.stats().instances["a"].ignored_events == 4


# -- sequence numbers ---------------------------------------------------------------------------


def test_duplicates_are_ignored_and_counted() -> None:
    index = KVIndex(100, 4)
    _feed(index, "a", _batch(_stored(1)), _batch(_stored(2)))
    assert index.apply("a", 1, _batch(_removed(2))) == ApplyResult("duplicate")
    assert index.apply("a", 0, _batch(_removed(1))) == ApplyResult("duplicate")
    assert index.cached_prefix_blocks("a", [1, 2]) == 2
    stats = index.stats().instances["a"]
    assert (stats.duplicates, stats.next_seq, stats.synced) == (2, 2, True)


def test_gap_is_reported_and_the_instance_unsynced_until_replayed() -> None:
    index = KVIndex(100, 4)
    _feed(index, "a", _batch(_stored(1, 2)), _batch(_stored(3)))
    assert index.apply("a", 5, _batch(_stored(9))) == ApplyResult("gap", (2, 4))
    assert index.cached_prefix_blocks("a", [1, 2, 3]) == 0
    assert index.best_matches([1, 2, 3]) == {"a": 0}
    # Live batches keep arriving during the replay: still a gap, counted once.
    assert index.apply("a", 6, _batch(_stored(10))) == ApplyResult("gap", (2, 5))
    stats = index.stats().instances["a"]
    assert (stats.gaps, stats.synced, stats.next_seq) == (1, False, 2)
    # The replay: the missing batches, then the ones that revealed the gap, in order.
    replay = [_batch(_removed(2)), _batch(), _batch(), _batch(_stored(9)), _batch(_stored(10))]
    _feed(index, "a", *replay, first_seq=2)
    assert index.cached_prefix_blocks("a", [1, 2, 3]) == 1
    assert index.cached_keys("a") == [1, 3, 9, 10]
    assert index.stats().instances["a"].synced


def test_resync_after_an_unrecoverable_gap() -> None:
    index = KVIndex(100, 4)
    _feed(index, "a", _batch(_stored(1, 2)))
    assert index.apply("a", 40, _batch(_stored(5))).status == "gap"
    index.resync("a", 40)
    assert index.cached_keys("a") == []
    _feed(index, "a", _batch(_stored(5)), first_seq=40)
    assert index.cached_prefix_blocks("a", [5]) == 1

    _feed(index, "b", _batch(_stored(1, 2)))
    assert index.apply("b", 9, _batch()).status == "gap"
    index.resync("b", 9, keep_blocks=True)
    assert index.cached_prefix_blocks("b", [1, 2]) == 2
    assert index.apply("b", 9, _batch()).status == "applied"


def test_a_late_joiner_sees_the_gap_from_zero() -> None:
    index = KVIndex(100, 4)
    assert index.apply("a", 7, _batch(_stored(1))) == ApplyResult("gap", (0, 6))
    assert index.cached_prefix_blocks("a", [1]) == 0


def test_reset_drops_blocks_and_expects_seq_zero() -> None:
    index = KVIndex(100, 4)
    _feed(index, "a", _batch(_stored(1, 2)), _batch(_stored(3)))
    assert index.apply("a", 9, _batch()).status == "gap"
    index.reset("a")  # the engine restarted: its publisher counts from 0 again
    assert index.cached_prefix_blocks("a", [1]) == 0
    _feed(index, "a", _batch(_stored(7)))
    assert index.cached_prefix_blocks("a", [7]) == 1


def test_all_blocks_cleared() -> None:
    index = KVIndex(100, 4)
    _feed(index, "a", _batch(_stored(1, 2)), _batch(AllBlocksCleared(), _stored(3)))
    _feed(index, "b", _batch(_stored(1, 2)))
    assert index.cached_keys("a") == [3]
    assert index.best_matches([1, 2]) == {"a": 0, "b": 2}
    assert index.stats().instances["a"].next_seq == 2


def test_remove_instance() -> None:
    index = KVIndex(100, 2)
    _feed(index, "a", _batch(_stored(1)))
    _feed(index, "b", _batch(_stored(1)))
    index.remove_instance("a")
    index.remove_instance("never-seen")
    assert index.best_matches([1]) == {"b": 1}
    assert set(index.stats().instances) == {"b"}
    # Its slot is free again, and a returning instance starts from scratch.
    _feed(index, "a", _batch(_stored(2)))
    assert index.best_matches([1]) == {"a": 0, "b": 1}


@pytest.mark.parametrize("bad", [-1, True, 1.0])
def test_bad_seq_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="seq"):
        KVIndex(10, 1).apply("a", bad, _batch())  # type: ignore[arg-type]


# -- bounds ---------------------------------------------------------------------------------------


def test_per_instance_bound_drops_the_least_recently_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = KVIndex(max_blocks_per_instance=3, max_instances=4)
    with caplog.at_level(logging.WARNING, logger="proxy.kv_index"):
        _feed(index, "a", _batch(_stored(1, 2, 3)), _batch(_stored(1)), _batch(_stored(4, 5)))
        _feed(index, "a", _batch(_stored(6)), first_seq=3)
    # 1 was stored again after 2 and 3, so it outlives them.
    assert index.cached_keys("a") == [4, 5, 6]
    assert index.stats().instances["a"].evicted_for_bound == 3
    assert len([r for r in caplog.records if "reached 3 blocks" in r.getMessage()]) == 1


def test_instance_bound_refuses_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    index = KVIndex(max_blocks_per_instance=10, max_instances=2)
    _feed(index, "a", _batch(_stored(1)))
    _feed(index, "b", _batch(_stored(1)))
    with caplog.at_level(logging.WARNING, logger="proxy.kv_index"):
        assert index.apply("c", 0, _batch(_stored(1))) == ApplyResult("refused")
        assert index.apply("d", 0, _batch(_stored(1))) == ApplyResult("refused")
        index.resync("e", 5)
        index.reset("f")
    assert set(index.best_matches([1])) == {"a", "b"}
    assert index.stats().refused_batches == 2
    assert len(caplog.records) == 1
    assert "maximum of 2 instances" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_blocks_per_instance": 0, "max_instances": 1},
        {"max_blocks_per_instance": 1, "max_instances": 0},
        {"max_blocks_per_instance": 1, "max_instances": 1, "block_size": 0},
    ],
)
def test_bad_bounds_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="KVIndex"):
        KVIndex(**kwargs)


# -- two indexes agree ----------------------------------------------------------------------------


def _random_stream(seed: int, batches: int) -> list[tuple[str, int, EventBatch]]:
    rng = random.Random(seed)
    seqs = {"p0": 0, "p1": 0, "d0": 0}
    stream = []
    for _ in range(batches):
        instance = rng.choice(sorted(seqs))
        events: list[KVEvent] = []
        for _ in range(rng.randint(0, 4)):
            keys = tuple(rng.randrange(60) for _ in range(rng.randint(1, 5)))
            roll = rng.random()
            if roll < 0.6:
                events.append(_stored(*keys))
            elif roll < 0.97:
                events.append(_removed(*keys))
            else:
                events.append(AllBlocksCleared())
        stream.append((instance, seqs[instance], _batch(*events)))
        seqs[instance] += 1
    return stream


def test_two_indexes_fed_the_same_stream_agree() -> None:
    stream = _random_stream(seed=3, batches=400)
    first, second = KVIndex(40, 8), KVIndex(40, 8)
    rng = random.Random(5)
    for instance, seq, batch in stream:
        first.apply(instance, seq, batch)
        # The second proxy also sees some batches twice (a replay overlapping live ones).
        second.apply(instance, seq, batch)
        if rng.random() < 0.2:
            assert second.apply(instance, seq, batch).status == "duplicate"
    prompts = [[rng.randrange(60) for _ in range(6)] for _ in range(200)]
    assert [first.best_matches(p) for p in prompts] == [second.best_matches(p) for p in prompts]
    for instance in ("p0", "p1", "d0"):
        assert first.cached_keys(instance) == second.cached_keys(instance)
    assert any(first.best_matches(p) != {"p0": 0, "p1": 0, "d0": 0} for p in prompts)
    blocks = {name: s.blocks for name, s in first.stats().instances.items()}
    assert blocks == {name: s.blocks for name, s in second.stats().instances.items()}


# -- wire format and vLLM's event objects -------------------------------------------------------


@pytest.fixture(scope="module")
def kv_events() -> ModuleType:
    pytest.importorskip("vllm")
    from vllm.distributed import kv_events

    return kv_events


def _vllm_batch(kv_events: ModuleType, keys: Sequence[int | bytes], tokens: list[int]) -> object:
    """A KVEventBatch shaped as vLLM's BlockPool builds it."""
    return kv_events.KVEventBatch(
        ts=12.5,
        events=[
            kv_events.BlockStored(
                block_hashes=list(keys),
                parent_block_hash=None,
                token_ids=tokens,
                block_size=16,
                lora_id=None,
                medium=kv_events.MEDIUM_GPU,
                lora_name=None,
                group_idx=0,
            ),
            kv_events.BlockStored(
                block_hashes=[123],
                parent_block_hash=None,
                token_ids=tokens[:16],
                block_size=16,
                lora_id=None,
                medium=kv_events.MEDIUM_CPU,
                lora_name=None,
            ),
            kv_events.BlockRemoved(block_hashes=[keys[-1]], medium=kv_events.MEDIUM_GPU),
        ],
        data_parallel_rank=0,
    )


def _prompt_and_hashes(int_hashes: bool) -> tuple[list[int], list[int], list[int | bytes]]:
    from proxy.block_hashes import block_hashes

    tokens = [random.Random(1).randrange(50_000) for _ in range(16 * 4)]
    keys = block_keys(tokens, SETTINGS)
    # What vLLM publishes: the int form by default, the full hash with the env var at 0.
    published: list[int | bytes] = (
        list(keys) if int_hashes else list(block_hashes(tokens, SETTINGS))
    )
    return tokens, keys, published


@pytest.mark.parametrize("int_hashes", [True, False])
def test_vllm_event_objects_feed_the_index(kv_events: ModuleType, int_hashes: bool) -> None:
    tokens, keys, published = _prompt_and_hashes(int_hashes)
    batch = event_batch_from(_vllm_batch(kv_events, published, tokens))
    assert (batch.ts, batch.data_parallel_rank, batch.unknown_events) == (12.5, 0, 0)
    index = KVIndex(100, 4, block_size=16)
    assert index.apply("p0", 0, batch).status == "applied"
    assert index.cached_prefix_blocks("p0", keys) == 3
    assert index.cached_keys("p0") == keys[:3]
    assert index.stats().instances["p0"].ignored_events == 1  # the CPU tier's event


@pytest.mark.parametrize("int_hashes", [True, False])
def test_msgpack_round_trip_as_the_zmq_publisher_sends_it(
    kv_events: ModuleType, int_hashes: bool
) -> None:
    import msgspec

    tokens, keys, published = _prompt_and_hashes(int_hashes)
    cleared = kv_events.KVEventBatch(ts=13.0, events=[kv_events.AllBlocksCleared()])
    # ZmqEventPublisher: one msgspec msgpack Encoder, frames (topic, seq 8 bytes BE, payload).
    encoder = msgspec.msgpack.Encoder()
    frames = [
        (b"kv", seq.to_bytes(8, "big"), encoder.encode(batch))
        for seq, batch in enumerate([_vllm_batch(kv_events, published, tokens), cleared])
    ]
    index = KVIndex(100, 4, block_size=16)
    _topic, seq_bytes, payload = frames[0]
    decoded = decode_event_batch(payload)
    assert decoded == event_batch_from(_vllm_batch(kv_events, published, tokens))
    assert index.apply("p0", int.from_bytes(seq_bytes, "big"), decoded).status == "applied"
    assert index.best_matches(keys) == {"p0": 3}

    _topic, seq_bytes, payload = frames[1]
    assert index.apply("p0", int.from_bytes(seq_bytes, "big"), decode_event_batch(payload)) == (
        ApplyResult("applied")
    )
    assert index.best_matches(keys) == {"p0": 0}


def test_decoder_handles_omitted_fields_and_unknown_event_types() -> None:
    payload = msgpack.packb(
        [
            1.0,
            [
                {"type": "BlockStored", "block_hashes": [5, 6], "block_size": 16},
                {"type": "SomethingNew", "x": 1},
                {"type": "BlockRemoved", "block_hashes": [6], "medium": "gpu"},
            ],
        ]
    )
    batch = decode_event_batch(payload)
    assert batch == EventBatch(
        1.0,
        (BlockStored((5, 6), 16, None), BlockRemoved((6,), "GPU")),
        None,
        unknown_events=1,
    )
    index = KVIndex(10, 1)
    index.apply("a", 0, batch)
    assert index.cached_keys("a") == [5]
    assert index.stats().instances["a"].ignored_events == 1


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb({"ts": 1}), "not a KV event batch"),
        (msgpack.packb([1.0]), r"\[ts, events, dp_rank\]"),
        (msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": "x"}]]), "event 0"),
        (msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": [-3]}]]), "event 0"),
        (msgpack.packb(["now", []]), "ts"),
    ],
)
def test_malformed_payloads_raise_with_context(payload: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_event_batch(payload)
