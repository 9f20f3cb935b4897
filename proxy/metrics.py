"""The proxy's Prometheus metrics, in a registry of its own (no global state).

Histograms observed on the hot path (per request, per streamed chunk) use a
lock-free bucket list read at scrape time: the proxy runs on one event loop, and
prometheus_client's locked histograms cost several times more per observation.
Per-instance gauges are read from the live registry at scrape time, so load
accounting on the request path costs nothing extra.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kv_transfer.params import Outcome
from proxy.instances import Instance, Role

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0,
    10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
STAGE_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class HistogramChild:
    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.total += value


class FastHistogram(Collector):
    """A labelled histogram for single-threaded use; ``labels()`` children are cached."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(buckets)
        self._children: dict[tuple[str, ...], HistogramChild] = {}

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = HistogramChild(self.buckets)
        return child

    def remove(self, *values: str) -> None:
        """Drop the series (no error when absent); callers must drop their cached child too."""
        self._children.pop(values, None)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative, running = [], 0
            for bound, count in zip((*self.buckets, math.inf), child.counts, strict=True):
                running += count
                cumulative.append((_bound_text(bound), running))
            family.add_metric(list(values), cumulative, child.total)
        yield family


class _InstanceGauges(Collector):
    def __init__(self, instances: Callable[[], Iterable[Instance]]) -> None:
        self._instances = instances

    def collect(self) -> Iterator[Metric]:
        labels = ["role", "instance"]
        requests = GaugeMetricFamily(
            "pdserve_instance_in_flight_requests",
            "Requests in flight on the instance (until the client's stream ends).",
            labels=labels,
        )
        tokens = GaugeMetricFamily(
            "pdserve_instance_in_flight_tokens",
            "Prompt plus requested output tokens of the requests in flight on the instance.",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "pdserve_instance_healthy", "1 if the instance passes health checks.", labels=labels
        )
        for instance in self._instances():
            key = [instance.role.value, instance.url]
            requests.add_metric(key, instance.in_flight_requests)
            tokens.add_metric(key, instance.in_flight_tokens)
            healthy.add_metric(key, 1.0 if instance.healthy else 0.0)
        yield requests
        yield tokens
        yield healthy


class ProxyMetrics:
    """Every metric the proxy exports; see the team contract for names and labels."""

    def __init__(self, instances: Callable[[], Iterable[Instance]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pdserve_requests",
            "Client requests by endpoint, model, HTTP status and path (disaggregated, "
            "aggregated, fallback when no prefill instance is healthy, or prefill_fallback "
            "when no decode instance is and a prefill instance serves the request whole).",
            ["endpoint", "model", "status", "path"],
            registry=r,
        )
        self.ttft = self._histogram(
            "pdserve_ttft_seconds",
            "Proxy receive to first content byte sent to the client (streamed requests).",
            ["endpoint", "model", "path"],
            TTFT_BUCKETS,
        )
        self.itl = self._histogram(
            "pdserve_inter_token_latency_seconds",
            "Gap between streamed content chunks sent to the client.",
            ["endpoint", "model"],
            ITL_BUCKETS,
        )
        self.e2e = self._histogram(
            "pdserve_e2e_latency_seconds",
            "Proxy receive to the end of the response.",
            ["endpoint", "model", "path"],
            E2E_BUCKETS,
        )
        self.stage = self._histogram(
            "pdserve_stage_latency_seconds",
            "PD stages: prefill round trip, handoff (prefill answer to decode sent), "
            "decode_first_token (decode sent to first byte back).",
            ["stage"],
            STAGE_BUCKETS,
        )
        self.retries = Counter(
            "pdserve_retries",
            "Upstream legs retried, by stage: prefill (a prefill leg sent again to another "
            "prefill instance), decode (a request moved to another decode instance, or to "
            "another prefill instance serving it whole while no decode instance is routable; "
            "see pdserve_migrations_total).",
            ["stage"],
            registry=r,
        )
        self.migrations = Counter(
            "pdserve_migrations",
            "Requests moved to another decode instance after their decode leg failed (or, "
            "while no decode instance is routable, to another prefill instance serving them "
            "whole), one per move (a request moved twice counts 2), counted when the request "
            "ends. stage: "
            "before_first_byte (the client had no byte yet; the move runs a fresh prefill "
            "leg), mid_stream (the client's stream had started; the answer continues from "
            "the tokens it has). outcome: succeeded (the request then ended with HTTP 200, "
            "its stream complete) or failed (it did not: the last attempt's error, a "
            "stream ended by an SSE error event, or the client went away).",
            ["stage", "outcome"],
            registry=r,
        )
        self.ejections = Counter(
            "pdserve_ejections",
            "Instances ejected after consecutive failed health checks.",
            ["role", "instance"],
            registry=r,
        )
        self.timeouts = Counter(
            "pdserve_timeouts",
            "Upstream deadlines missed, by stage (connect, prefill, first_byte, stall).",
            ["stage"],
            registry=r,
        )
        self.routing_decisions = Counter(
            "pdserve_routing_decisions",
            "Instances chosen by the routing policies.",
            ["role", "policy", "instance"],
            registry=r,
        )
        self.kv_handoffs = Counter(
            "pdserve_kv_handoffs",
            "Disaggregated requests the decode answered, by what happened to the prompt's KV: "
            "transferred, local_cache (the decode's own prefix cache had it), recomputed "
            "(computed again on the decode: see pdserve_kv_recomputed_requests_total there), "
            "unreported (streamed answers and decode workers that do not say).",
            ["outcome"],
            registry=r,
        )
        self.kv_releases = Counter(
            "pdserve_kv_releases",
            "Releases the proxy sent to prefill instances for KV no decode leg would read, by "
            "outcome: released, not_held (already freed, or freed when the hold arrives), failed.",
            ["outcome"],
            registry=r,
        )
        # Cache-aware routing's self-check (proxy/hit_check.py), by role and instance URL:
        # registered always, with series only while a cache-aware policy routes.
        hit_labels = ["role", "instance"]
        self.predicted_hit_tokens = Counter(
            "pdserve_routing_predicted_hit_tokens",
            "Prompt tokens the proxy predicted the routed instance's prefix cache holds, on "
            "requests whose answer reported the engine's own figure.",
            hit_labels,
            registry=r,
        )
        self.observed_hit_tokens = Counter(
            "pdserve_routing_observed_hit_tokens",
            "Prompt tokens the engine reported as prefix-cache hits on those requests.",
            hit_labels,
            registry=r,
        )
        self.hit_checks = Counter(
            "pdserve_routing_hit_checks",
            "Requests whose predicted prefix-cache hit was compared with the engine's.",
            hit_labels,
            registry=r,
        )
        self.cache_trusted = Gauge(
            "pdserve_routing_cache_trusted",
            "1 while the proxy's prefix-cache predictions for the instance agree with the "
            "engine; 0 while they do not and it is routed on load alone.",
            hit_labels,
            registry=r,
        )
        self.cache_distrusted = Counter(
            "pdserve_routing_cache_distrusted",
            "Times the instance's predictions stopped agreeing with the engine and "
            "cache-aware routing fell back to load alone for it.",
            hit_labels,
            registry=r,
        )
        self.kv_handoff_outcomes = {
            outcome: self.kv_handoffs.labels(outcome) for outcome in HANDOFF_OUTCOMES
        }
        r.register(_InstanceGauges(instances))
        self.stage_prefill = self.stage.labels("prefill")
        self.stage_handoff = self.stage.labels("handoff")
        self.stage_decode_first_token = self.stage.labels("decode_first_token")
        self._request_children: dict[tuple[str, str, int, str], Counter] = {}
        # Models the decode pool serves (set by the model catalog): the only model label
        # values besides UNKNOWN_MODEL and "" (no model given).
        self._known_models: frozenset[str] = frozenset()
        self._served_models: set[str] = set()
        # pdserve_routing_decisions_total children by (role, instance URL); the request
        # path reads this dict, so a removed instance must leave it too.
        self.decisions: dict[tuple[Role, str], Counter] = {}
        self._decision_labels: dict[tuple[Role, str], tuple[str, str, str]] = {}

    def set_known_models(self, models: frozenset[str]) -> None:
        self._known_models = models

    def model_label(self, model: str | None, served: bool = False) -> str:
        """The client's model name as a label value: a served model, "unknown" or "".

        ``served``: a worker answered this request for ``model`` with success, so the model is
        real even when the catalog has not been fetched yet (startup, a worker just added).
        Such names are kept, up to ``MAX_SERVED_MODELS``: a worker that accepts any name cannot
        make the label set grow without bound."""
        if not model:
            return ""
        if model in self._known_models or model in self._served_models:
            return model
        if served and len(self._served_models) < MAX_SERVED_MODELS:
            self._served_models.add(model)
            return model
        return UNKNOWN_MODEL

    def decision_counter(self, role: Role, policy: str, instance: str) -> Counter:
        """The routing-decision child for an instance, cached in :attr:`decisions`."""
        key = (role, instance)
        counter = self.decisions.get(key)
        if counter is None:
            labels = (role.value, policy, instance)
            counter = self.decisions[key] = self.routing_decisions.labels(*labels)
            self._decision_labels[key] = labels
        return counter

    def forget_instance(self, role: Role, instance: str) -> None:
        """Remove every series labelled with an instance that left the registry."""
        key = (role, instance)
        self.decisions.pop(key, None)
        labels = self._decision_labels.pop(key, None)
        if labels is not None:
            self.routing_decisions.remove(*labels)
        with contextlib.suppress(KeyError):  # older prometheus_client raise it when absent
            self.ejections.remove(role.value, instance)

    def count_request(self, endpoint: str, model: str | None, status: int, path: str) -> None:
        """``model`` is the client's: it is mapped to a bounded label value here."""
        key = (endpoint, self.model_label(model, served=status == 200), status, path)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(
                endpoint, key[1], str(status), path
            )
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _histogram(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> FastHistogram:
        histogram = FastHistogram(name, doc, labels, buckets)
        self.registry.register(histogram)
        return histogram


# The model label of requests naming a model the decode pool does not serve (or before
# its model list is known): client-chosen strings never become label values.
UNKNOWN_MODEL = "unknown"
MAX_SERVED_MODELS = 64

HANDOFF_OUTCOMES = (
    Outcome.TRANSFERRED,
    Outcome.LOCAL_CACHE,
    Outcome.RECOMPUTED,
    "unreported",
)


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))
