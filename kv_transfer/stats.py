"""Transfer metrics, carried by vLLM's connector-stats plumbing to the worker's /metrics.

Workers (and the scheduler half, for the held-blocks gauge) return a
``TcpTransferStats`` from ``get_kv_connector_stats``; vLLM aggregates them,
ships them to the API server process and calls ``TcpTransferPromMetrics.observe``
there, which updates the Prometheus metrics named in the team contract.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, cast

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from kv_transfer.params import RecomputeReason

BYTES_TOTAL = "pdserve_kv_transfer_bytes_total"
SECONDS = "pdserve_kv_transfer_seconds"
FAILURES_TOTAL = "pdserve_kv_transfer_failures_total"
BLOCKS_HELD = "pdserve_kv_blocks_held"
LEASES_EXPIRED_TOTAL = "pdserve_kv_leases_expired_total"
RECOMPUTED_REQUESTS_TOTAL = "pdserve_kv_recomputed_requests_total"
RECOMPUTED_TOKENS_TOTAL = "pdserve_kv_recomputed_tokens_total"
METRIC_NAMES = (
    BYTES_TOTAL,
    SECONDS,
    FAILURES_TOTAL,
    BLOCKS_HELD,
    LEASES_EXPIRED_TOTAL,
    RECOMPUTED_REQUESTS_TOTAL,
    RECOMPUTED_TOKENS_TOTAL,
)

SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _empty() -> dict[str, Any]:
    return {
        "transfer_bytes": [],
        "transfer_seconds": [],
        "failures": 0,
        "leases_expired": 0,
        "blocks_held": None,
        # reason -> [requests, tokens] computed again on a decode instance
        "recomputed": {},
    }


@dataclass
class TcpTransferStats(KVConnectorStats):
    """``data``: per-transfer bytes and seconds, failure and expiry counts, held-blocks gauge."""

    def __post_init__(self) -> None:
        merged = _empty()
        merged.update(self.data or {})
        self.data = merged

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        data = other.data
        self.data["transfer_bytes"].extend(data.get("transfer_bytes", ()))
        self.data["transfer_seconds"].extend(data.get("transfer_seconds", ()))
        self.data["failures"] += int(data.get("failures", 0))
        self.data["leases_expired"] += int(data.get("leases_expired", 0))
        for reason, (requests, tokens) in data.get("recomputed", {}).items():
            mine = self.data["recomputed"].setdefault(reason, [0, 0])
            mine[0] += requests
            mine[1] += tokens
        if data.get("blocks_held") is not None:
            self.data["blocks_held"] = data["blocks_held"]
        return self

    def reduce(self) -> dict[str, int | float]:
        nbytes = sum(self.data["transfer_bytes"])
        seconds = sum(self.data["transfer_seconds"])
        reduced: dict[str, int | float] = {
            "transfers": len(self.data["transfer_bytes"]),
            "MiB": round(nbytes / 2**20, 3),
            "GB/s": round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0,
            "failures": self.data["failures"],
            "leases_expired": self.data["leases_expired"],
            "recomputed": sum(r for r, _ in self.data["recomputed"].values()),
        }
        if self.data["blocks_held"] is not None:
            reduced["blocks_held"] = self.data["blocks_held"]
        return reduced

    def is_empty(self) -> bool:
        return (
            not self.data["transfer_bytes"]
            and not self.data["failures"]
            and not self.data["leases_expired"]
            and not self.data["recomputed"]
            and self.data["blocks_held"] is None
        )


class StatsRecorder:
    """Thread-safe accumulator the transfer threads write and each engine step drains."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = _empty()

    def transfer(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._data["transfer_bytes"].append(nbytes)
            self._data["transfer_seconds"].append(seconds)

    def failure(self) -> None:
        with self._lock:
            self._data["failures"] += 1

    def lease_expired(self, count: int = 1) -> None:
        with self._lock:
            self._data["leases_expired"] += count

    def recomputed(self, reason: str, tokens: int) -> None:
        """A decode request computed ``tokens`` prompt tokens again instead of pulling them."""
        with self._lock:
            entry = self._data["recomputed"].setdefault(reason, [0, 0])
            entry[0] += 1
            entry[1] += tokens

    def blocks_held(self, value: int) -> None:
        with self._lock:
            self._data["blocks_held"] = value

    def drain(self) -> TcpTransferStats | None:
        with self._lock:
            data, self._data = self._data, _empty()
        stats = TcpTransferStats(data=data)
        return None if stats.is_empty() else stats


class TcpTransferPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_stale()
        per_engine = per_engine_labelvalues

        def children(metric: Any) -> dict[int, Any]:
            return {idx: metric.labels(*values) for idx, values in per_engine.items()}

        self.bytes_total = children(
            cast(Any, self._counter_cls)(
                name=BYTES_TOTAL,
                documentation="KV cache bytes moved by the TCP pull connector "
                "(served on a prefill instance, received on a decode instance).",
                labelnames=labelnames,
            )
        )
        self.seconds = children(
            cast(Any, self._histogram_cls)(
                name=SECONDS,
                documentation="Duration of one request's KV block transfer.",
                buckets=list(SECONDS_BUCKETS),
                labelnames=labelnames,
            )
        )
        self.failures_total = children(
            cast(Any, self._counter_cls)(
                name=FAILURES_TOTAL,
                documentation="KV transfers that failed or were refused "
                "(decode: failed pulls; prefill: refused connections and reads).",
                labelnames=labelnames,
            )
        )
        self.blocks_held = children(
            cast(Any, self._gauge_cls)(
                name=BLOCKS_HELD,
                documentation="KV blocks a prefill instance holds for decode pulls.",
                labelnames=labelnames,
                multiprocess_mode="mostrecent",
            )
        )
        self.leases_expired_total = children(
            cast(Any, self._counter_cls)(
                name=LEASES_EXPIRED_TOTAL,
                documentation="Held prefill requests released because no decode "
                "instance pulled them before the lease expired.",
                labelnames=labelnames,
            )
        )
        reason_labels = [*labelnames, "reason"]

        def by_reason(metric: Any) -> dict[tuple[int, str], Any]:
            # Every reason exists from the start at 0, so rate() and alerts see the series.
            return {
                (idx, reason): metric.labels(*values, reason)
                for idx, values in per_engine.items()
                for reason in RecomputeReason.ALL
            }

        self.recomputed_requests_total = by_reason(
            cast(Any, self._counter_cls)(
                name=RECOMPUTED_REQUESTS_TOTAL,
                documentation="Decode requests that computed some or all of the prompt again "
                "instead of using the prefill instance's KV, by reason.",
                labelnames=reason_labels,
            )
        )
        self.recomputed_tokens_total = by_reason(
            cast(Any, self._counter_cls)(
                name=RECOMPUTED_TOKENS_TOTAL,
                documentation="Prompt tokens a decode instance computed again instead of "
                "pulling them, by reason.",
                labelnames=reason_labels,
            )
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        for nbytes in data.get("transfer_bytes", ()):
            self.bytes_total[engine_idx].inc(nbytes)
        for seconds in data.get("transfer_seconds", ()):
            self.seconds[engine_idx].observe(seconds)
        if data.get("failures"):
            self.failures_total[engine_idx].inc(data["failures"])
        if data.get("leases_expired"):
            self.leases_expired_total[engine_idx].inc(data["leases_expired"])
        if data.get("blocks_held") is not None:
            self.blocks_held[engine_idx].set(data["blocks_held"])
        for reason, (requests, tokens) in data.get("recomputed", {}).items():
            key = (engine_idx, reason)
            if key in self.recomputed_requests_total:
                self.recomputed_requests_total[key].inc(requests)
                self.recomputed_tokens_total[key].inc(tokens)


def _unregister_stale() -> None:
    """vLLM re-creates its stat loggers in-process (tests, restarts) and only
    unregisters ``vllm:``-prefixed collectors itself; drop ours too."""
    from prometheus_client import REGISTRY

    names_to_collectors = getattr(REGISTRY, "_names_to_collectors", {})
    for name in METRIC_NAMES:
        collector = names_to_collectors.get(name)
        if collector is not None:
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(collector)
