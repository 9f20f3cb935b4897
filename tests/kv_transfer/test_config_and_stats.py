"""The public config helper and the metrics plumbing (stats objects, Prometheus observe)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from kv_transfer.config import TransferSettings, connector_config, connector_config_json
from kv_transfer.params import RecomputeReason
from kv_transfer.stats import (
    BLOCKS_HELD,
    BYTES_TOTAL,
    FAILURES_TOTAL,
    LEASES_EXPIRED_TOTAL,
    METRIC_NAMES,
    RECOMPUTED_REQUESTS_TOTAL,
    RECOMPUTED_TOKENS_TOTAL,
    SECONDS,
    StatsRecorder,
    TcpTransferPromMetrics,
    TcpTransferStats,
)


def test_connector_config_is_what_vllm_expects() -> None:
    cfg = connector_config("producer", "prefill-0", "0.0.0.0", 15100, lease_s=20.0)
    assert cfg["kv_connector"] == "TcpPullConnector"
    assert cfg["kv_connector_module_path"] == "kv_transfer.connector"
    assert cfg["kv_role"] == "kv_producer" and cfg["engine_id"] == "prefill-0"
    extra = cfg["kv_connector_extra_config"]
    assert (extra["host"], extra["port"], extra["lease_s"]) == ("0.0.0.0", 15100, 20.0)
    # The secret is not part of the JSON (vLLM logs it, and it sits in the server's argv).
    assert "secret" not in extra and "secret_file" not in extra
    assert connector_config("kv_consumer", "d")["kv_role"] == "kv_consumer"
    assert json.loads(connector_config_json("both", "x"))["kv_role"] == "kv_both"
    # The parsed form is what the connector reads back inside vLLM, the secret from its env.
    settings = TransferSettings.from_extra_config(
        extra, env={"PDSERVE_KV_SECRET": "k" * 8 + "9" * 8}
    )
    assert settings.secret == b"kkkkkkkk99999999" and settings.port == 15100
    assert "kkkkkkkk" not in repr(settings)
    assert settings.public_host == "127.0.0.1"  # 0.0.0.0 is not dialable
    advertised = connector_config("producer", "p", "0.0.0.0", 1, advertise_host="10.1.2.3")
    assert TransferSettings.from_extra_config(
        advertised["kv_connector_extra_config"]
    ).public_host == ("10.1.2.3")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "prefill"}, "unknown KV role"),
        ({"engine_id": ""}, "engine_id"),
        ({"port": 70000}, "port"),
        ({"lease_s": 0}, "lease_s"),
        ({"kv_load_failure_policy": "retry"}, "kv_load_failure_policy"),
    ],
)
def test_connector_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"role": "producer", "engine_id": "e", **kwargs}
    with pytest.raises(ValueError, match=message):
        connector_config(**args)


def test_unknown_extra_config_keys_are_named() -> None:
    with pytest.raises(ValueError, match="lease_seconds"):
        TransferSettings.from_extra_config({"lease_seconds": 3})


def test_stats_aggregate_and_reduce() -> None:
    a = StatsRecorder()
    a.transfer(1000, 0.5)
    a.failure()
    b = StatsRecorder()
    b.transfer(3000, 0.5)
    b.lease_expired(2)
    b.blocks_held(7)
    merged = a.drain()
    assert merged is not None
    other = b.drain()
    assert other is not None
    merged.aggregate(other)
    assert merged.data["transfer_bytes"] == [1000, 3000]
    assert merged.data["failures"] == 1 and merged.data["leases_expired"] == 2
    assert merged.data["blocks_held"] == 7
    assert merged.reduce()["transfers"] == 2
    assert a.drain() is None  # drained, nothing new
    # vLLM rebuilds the stats object from its dict on the API-server side.
    rebuilt = TcpTransferStats(data=merged.to_dict())
    assert not rebuilt.is_empty()


def test_recomputed_stats_aggregate_and_reduce() -> None:
    a = StatsRecorder()
    a.recomputed(RecomputeReason.PULL_FAILED, 64)
    a.recomputed(RecomputeReason.PULL_FAILED, 32)
    a.recomputed(RecomputeReason.UNUSABLE, 70)
    b = StatsRecorder()
    b.recomputed(RecomputeReason.PULL_FAILED, 10)
    b.recomputed(RecomputeReason.LEASE_LOST, 5)
    merged, other = a.drain(), b.drain()
    assert merged is not None and other is not None
    # A recompute alone is worth reporting: the step's stats are not empty.
    assert not merged.is_empty() and not other.is_empty()
    merged.aggregate(other)
    assert merged.data["recomputed"] == {
        "pull_failed": [3, 106],
        "unusable": [1, 70],
        "lease_lost": [1, 5],
    }
    assert merged.reduce()["recomputed"] == 5
    # Aggregating did not change the other side's counts.
    assert other.data["recomputed"] == {"pull_failed": [1, 10], "lease_lost": [1, 5]}
    # The API-server side rebuilds the object from its dict (lists may arrive as tuples).
    rebuilt = TcpTransferStats(data=merged.to_dict())
    rebuilt.aggregate(TcpTransferStats(data={"recomputed": {"unusable": (2, 20)}}))
    assert rebuilt.data["recomputed"]["unusable"] == [3, 90]
    assert a.drain() is None and b.drain() is None
    empty = TcpTransferStats()
    assert empty.is_empty() and empty.reduce()["recomputed"] == 0


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model_name": "tiny", "engine": "0", **labels})


def test_prometheus_metrics_observe_with_contract_names() -> None:
    vllm_config = SimpleNamespace(kv_transfer_config=None)
    types: dict[Any, Any] = {Counter: Counter, Gauge: Gauge, Histogram: Histogram}
    labels = ["model_name", "engine"]
    per_engine: dict[int, list[object]] = {0: ["tiny", "0"]}
    # Built twice, as vLLM does when it re-creates its stat loggers in one process.
    TcpTransferPromMetrics(vllm_config, types, labels, per_engine)  # type: ignore[arg-type]
    metrics = TcpTransferPromMetrics(vllm_config, types, labels, per_engine)  # type: ignore[arg-type]
    metrics.observe(
        {
            "transfer_bytes": [100, 200],
            "transfer_seconds": [0.01, 0.02],
            "failures": 1,
            "leases_expired": 3,
            "blocks_held": 5,
        }
    )
    metrics.observe({"transfer_bytes": [], "transfer_seconds": [], "blocks_held": None})
    assert _sample(BYTES_TOTAL) == 300
    assert _sample(SECONDS + "_count") == 2
    assert _sample(FAILURES_TOTAL) == 1
    assert _sample(LEASES_EXPIRED_TOTAL) == 3
    assert _sample(BLOCKS_HELD) == 5


def test_the_controller_and_status_read_the_gauge_the_worker_exports() -> None:
    from deploy.worker_metrics import KV_BLOCKS_METRIC, kv_blocks_in

    assert KV_BLOCKS_METRIC == BLOCKS_HELD
    text = f'# TYPE {BLOCKS_HELD} gauge\n{BLOCKS_HELD}{{engine="0"}} 3.0\n'
    assert kv_blocks_in(text) == 3


def test_prometheus_recompute_series_exist_from_the_start() -> None:
    vllm_config = SimpleNamespace(kv_transfer_config=None)
    types: dict[Any, Any] = {Counter: Counter, Gauge: Gauge, Histogram: Histogram}
    labels = ["model_name", "engine"]
    per_engine: dict[int, list[object]] = {0: ["tiny", "0"], 1: ["tiny", "1"]}
    metrics = TcpTransferPromMetrics(vllm_config, types, labels, per_engine)  # type: ignore[arg-type]
    assert {RECOMPUTED_REQUESTS_TOTAL, RECOMPUTED_TOKENS_TOTAL} <= set(METRIC_NAMES)
    # Every reason, on every engine, at 0 before anything happened (rate() and alerts work).
    for engine in ("0", "1"):
        for reason in RecomputeReason.ALL:
            for name in (RECOMPUTED_REQUESTS_TOTAL, RECOMPUTED_TOKENS_TOTAL):
                value = REGISTRY.get_sample_value(
                    name, {"model_name": "tiny", "engine": engine, "reason": reason}
                )
                assert value == 0, (name, engine, reason)
    metrics.observe({"recomputed": {"pull_failed": [2, 96], "unusable": [1, 70]}}, engine_idx=1)
    metrics.observe({"recomputed": {"pull_failed": [1, 4], "not-a-reason": [9, 9]}}, engine_idx=1)
    assert _sample(RECOMPUTED_REQUESTS_TOTAL, reason="pull_failed") == 0  # engine 0 untouched

    def sample1(name: str, reason: str) -> float | None:
        return REGISTRY.get_sample_value(
            name, {"model_name": "tiny", "engine": "1", "reason": reason}
        )

    assert sample1(RECOMPUTED_REQUESTS_TOTAL, "pull_failed") == 3
    assert sample1(RECOMPUTED_TOKENS_TOTAL, "pull_failed") == 100
    assert sample1(RECOMPUTED_REQUESTS_TOTAL, "unusable") == 1
    assert sample1(RECOMPUTED_TOKENS_TOTAL, "unusable") == 70
    assert sample1(RECOMPUTED_REQUESTS_TOTAL, "lease_lost") == 0
    # Label values come from a fixed set, never from what a stats dict carries.
    assert sample1(RECOMPUTED_REQUESTS_TOTAL, "not-a-reason") is None
