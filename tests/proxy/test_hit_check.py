"""HitCheck on its own: what it predicts, when it distrusts an instance, what it says."""

from __future__ import annotations

import logging
import time

import pytest

from proxy.block_hashes import HashSettings, block_keys, resolve_none_hash_seed
from proxy.config import CacheCheckConfig
from proxy.hit_check import HitCheck, predicted_hit_tokens
from proxy.instances import Instance, Role
from proxy.kv_index import BlockStored, EventBatch, KVIndex
from proxy.metrics import ProxyMetrics

SETTINGS = HashSettings(4, "sha256", resolve_none_hash_seed("sha256", None))
URL = "http://10.0.0.1:8000"


def make(window: int = 4, min_agreement: float = 0.5) -> tuple[HitCheck, KVIndex]:
    index = KVIndex(1000, 8)
    check = HitCheck(
        index,
        lambda url: SETTINGS,
        CacheCheckConfig(window=window, min_agreement=min_agreement),
        ProxyMetrics(list),
    )
    return check, index


@pytest.mark.parametrize(
    ("blocks", "prompt_tokens", "expected"),
    [(0, 100, 0), (3, 100, 12), (25, 100, 96), (25, 101, 100), (2, 8, 4), (1, 1, 0), (1, 0, 0)],
)
def test_a_prediction_is_what_vllm_would_count(
    blocks: int, prompt_tokens: int, expected: int
) -> None:
    """Whole blocks, and never the last prompt token: vLLM always computes it."""
    assert predicted_hit_tokens(blocks, 4, prompt_tokens) == expected


def test_predicts_from_the_index_only_when_it_can() -> None:
    check, index = make()
    prompt = list(range(21))
    keys = block_keys(prompt, SETTINGS)
    assert check.predict(URL, keys, len(prompt)) is None  # never heard from: unknown
    index.apply(URL, 0, EventBatch(time.time(), (BlockStored(tuple(keys[:3]), 4),)))
    assert check.predict(URL, keys, len(prompt)) == 12
    assert check.predict(URL, None, len(prompt)) is None
    index.apply(URL, 5, EventBatch(time.time(), ()))  # a gap: out of sync
    assert check.predict(URL, keys, len(prompt)) is None


@pytest.mark.parametrize(
    ("samples", "cause"),
    [
        ([(0, 40)] * 4, "block hashes are not the engine's"),
        ([(40, 0)] * 4, "no longer holds"),
        ([(8, 40)] * 4, "lacks blocks the engine holds"),
    ],
)
def test_a_window_that_disagrees_distrusts_the_instance_once_with_its_cause(
    samples: list[tuple[int, int]], cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    check, _ = make()
    instance = Instance(URL, Role.PREFILL)
    for predicted, observed in samples[:-1]:
        check.record(instance, predicted, observed)
        assert check.trusted(URL)  # the window is not full yet
    check.record(instance, *samples[-1])
    assert not check.trusted(URL) and check.settings_for(URL) is None
    check.record(instance, *samples[-1])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and cause in warnings[0].getMessage()
    assert URL in warnings[0].getMessage()


def test_requests_without_hits_on_either_side_do_not_count() -> None:
    check, _ = make()
    instance = Instance(URL, Role.DECODE)
    for _ in range(3):
        check.record(instance, 0, 40)
    for _ in range(50):
        check.record(instance, 0, 0)  # a workload without reuse dilutes nothing
    check.record(instance, 0, 40)
    assert not check.trusted(URL)


def test_a_few_late_events_do_not_distrust_an_instance() -> None:
    """A burst on a new prefix reaches the instance before its events do: predicted 0, hit.
    Steady traffic on the prefix outweighs it."""
    check, _ = make(window=16)
    instance = Instance(URL, Role.DECODE)
    for _ in range(3):
        check.record(instance, 0, 64)
    for _ in range(13):
        check.record(instance, 64, 64)
    assert check.trusted(URL)


def test_disabled_checks_change_nothing() -> None:
    index = KVIndex(1000, 8)
    check = HitCheck(
        index, lambda url: SETTINGS, CacheCheckConfig(enabled=False, window=1), ProxyMetrics(list)
    )
    check.record(Instance(URL, Role.DECODE), 0, 400)
    assert check.trusted(URL) and check.settings_for(URL) == SETTINGS
