"""The public config helper and the metrics plumbing (stats objects, Prometheus observe)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from kv_transfer.config import TransferSettings, connector_config, connector_config_json
from kv_transfer.stats import (
    BLOCKS_HELD,
    BYTES_TOTAL,
    FAILURES_TOTAL,
    LEASES_EXPIRED_TOTAL,
    SECONDS,
    StatsRecorder,
    TcpTransferPromMetrics,
    TcpTransferStats,
)


def test_connector_config_is_what_vllm_expects() -> None:
    cfg = connector_config("producer", "prefill-0", "0.0.0.0", 15100, "s3cret", 20.0)
    assert cfg["kv_connector"] == "TcpPullConnector"
    assert cfg["kv_connector_module_path"] == "kv_transfer.connector"
    assert cfg["kv_role"] == "kv_producer" and cfg["engine_id"] == "prefill-0"
    extra = cfg["kv_connector_extra_config"]
    assert (extra["host"], extra["port"], extra["secret"], extra["lease_s"]) == (
        "0.0.0.0",
        15100,
        "s3cret",
        20.0,
    )
    assert connector_config("kv_consumer", "d")["kv_role"] == "kv_consumer"
    assert json.loads(connector_config_json("both", "x"))["kv_role"] == "kv_both"
    # The parsed form is what the connector reads back inside vLLM.
    settings = TransferSettings.from_extra_config(extra)
    assert settings.secret == b"s3cret" and settings.port == 15100
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


def _sample(name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model_name": "tiny", "engine": "0"})


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
