"""Cache-aware routing that checks itself: predicted against observed prefix-cache hits.

When the proxy routes a request on its KV index, it predicts how many of the prompt's tokens
the chosen instance's prefix cache holds: the leading blocks the index lists for it, in whole
blocks and at most ``prompt_tokens - 1`` tokens, as vLLM counts a hit. The engine then says
what was true: vLLM started with ``--enable-prompt-tokens-details`` (pdserve's worker launch
does it) reports ``usage.prompt_tokens_details.cached_tokens`` in every non-streamed answer,
its own prefix-cache hit for that request. The proxy reads it from the prefill leg's answer
(always non-streamed) and from a non-streamed answer of an instance that served the request
whole (aggregated, cache bypass, fallbacks). Streamed answers carry usage only when the client
asked for it and a disaggregated decode counts the pulled blocks as cached, so neither is read.

Per instance, over the last ``window`` requests on which either side saw a hit::

    agreement = 1 - sum |predicted - observed| / sum max(predicted, observed)

Below ``min_agreement`` the instance is *distrusted*: :meth:`HitCheck.settings_for` answers
None for it, so cache-aware policies and the cache bypass treat it as caching nothing and
route it on load alone. That is logged once with the likely cause: predictions of 0 against
real hits mean the proxy's block hashes are not the engine's (hash seed, block size,
algorithm) or no event reaches the index; predictions above the hits mean the index holds
blocks the engine no longer has (lost or late events). Predictions go on while distrusted,
and once a full window agrees again the instance is trusted again (logged too).

A known source of disagreement that is not a fault: requests that share a new prefix and
reach one instance before its events for the first of them arrive are predicted no hit but
hit (vLLM caches a block as soon as it schedules it). A window of several such requests is
needed to distrust an instance, and steady traffic on a prefix agrees.

Metrics (per role and instance URL): ``pdserve_routing_predicted_hit_tokens_total``,
``pdserve_routing_observed_hit_tokens_total``, ``pdserve_routing_hit_checks_total`` (requests
compared), ``pdserve_routing_cache_trusted`` (1, or 0 while distrusted) and
``pdserve_routing_cache_distrusted_total`` (times an instance was distrusted).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from proxy.block_hashes import HashSettings
from proxy.config import CacheCheckConfig
from proxy.instances import Instance
from proxy.kv_index import KVIndex
from proxy.metrics import ProxyMetrics
from proxy.routing.base import HashSettingsLookup

log = logging.getLogger(__name__)

_CACHED_TOKENS = b'"cached_tokens":'


def observed_cached_tokens(answer: bytes) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` of a vLLM non-streamed answer, or None
    when it has none (an engine without ``--enable-prompt-tokens-details``).

    A byte search, not a parse: the answer is relayed as is and vLLM writes compact JSON
    in which no other field has this name."""
    at = answer.rfind(_CACHED_TOKENS)
    if at < 0:
        return None
    start = at + len(_CACHED_TOKENS)
    end = start
    while end < len(answer) and answer[end : end + 1].isdigit():
        end += 1
    if end == start:
        return None  # null: the engine did not count
    return int(answer[start:end])


def predicted_hit_tokens(cached_blocks: int, block_size: int, prompt_tokens: int) -> int:
    """The hit vLLM would report for a prompt whose first ``cached_blocks`` blocks it holds:
    whole blocks only, and never the prompt's last token (vLLM always computes it)."""
    if prompt_tokens < 1:
        return 0
    return min(cached_blocks, (prompt_tokens - 1) // block_size) * block_size


@dataclass(slots=True)
class _Track:
    role: str
    samples: deque[tuple[int, int]]
    trusted: bool = True
    distrusted_once: bool = False  # its pdserve_routing_cache_distrusted_total series exists
    # The metric children, looked up once.
    children: tuple[Counter, Counter, Counter, Gauge] | None = field(default=None, repr=False)


class HitCheck:
    """Predictions for the routed instance, the engines' answers, and per-instance trust."""

    def __init__(
        self,
        index: KVIndex,
        settings_for: HashSettingsLookup,
        config: CacheCheckConfig,
        metrics: ProxyMetrics,
    ) -> None:
        """``settings_for(url)``: the hash settings the proxy computes block keys with, when
        ``url``'s engine uses them (else None)."""
        self._index = index
        self._settings_for = settings_for
        self._config = config
        self._tracks: dict[str, _Track] = {}
        self._predicted = metrics.predicted_hit_tokens
        self._observed = metrics.observed_hit_tokens
        self._checks = metrics.hit_checks
        self._trusted = metrics.cache_trusted
        self._distrusted = metrics.cache_distrusted

    # -- for routing ----------------------------------------------------------------------

    def settings_for(self, url: str) -> HashSettings | None:
        """What cache-aware routing may use for ``url``: its hash settings while its
        predictions are trusted, None (route it on load alone) otherwise."""
        track = self._tracks.get(url)
        if track is not None and not track.trusted:
            return None
        return self._settings_for(url)

    def trusted(self, url: str) -> bool:
        track = self._tracks.get(url)
        return track is None or track.trusted

    def predict(self, url: str, block_keys: Sequence[int] | None, prompt_tokens: int) -> int | None:
        """Prompt tokens ``url``'s prefix cache is predicted to hold, trusted or not; None
        when there is nothing to predict from (no keys, its hash settings unknown or not the
        proxy's, its index out of sync)."""
        if not block_keys:
            return None
        settings = self._settings_for(url)
        if settings is None or not self._index.synced(url):
            return None
        blocks = self._index.cached_prefix_blocks(url, block_keys)
        return predicted_hit_tokens(blocks, settings.block_size, prompt_tokens)

    # -- from the engines' answers ---------------------------------------------------------

    def record(self, instance: Instance, predicted: int, observed: int) -> None:
        """One request's predicted and reported hit on ``instance``."""
        if not self._config.enabled:
            return
        url = instance.url
        track = self._tracks.get(url)
        if track is None or track.role != instance.role.value:
            track = self._tracks[url] = _Track(
                instance.role.value, deque(maxlen=self._config.window)
            )
        children = track.children
        if children is None:
            labels = (track.role, url)
            children = track.children = (
                self._predicted.labels(*labels),
                self._observed.labels(*labels),
                self._checks.labels(*labels),
                self._trusted.labels(*labels),
            )
            children[3].set(1)
        children[0].inc(predicted)
        children[1].inc(observed)
        children[2].inc()
        if predicted == 0 and observed == 0:
            return  # says nothing about the hashes
        track.samples.append((predicted, observed))
        if len(track.samples) < self._config.window:
            return
        predicted_sum = sum(p for p, _ in track.samples)
        observed_sum = sum(o for _, o in track.samples)
        error = sum(abs(p - o) for p, o in track.samples)
        agreement = 1.0 - error / sum(max(p, o) for p, o in track.samples)
        agrees = agreement >= self._config.min_agreement
        if agrees == track.trusted:
            return
        track.trusted = agrees
        children[3].set(1 if agrees else 0)
        window = len(track.samples)
        if agrees:
            log.info(
                "prefix-cache predictions for %s instance %s agree with the engine again "
                "(%.0f %% over the last %d requests with hits): cache-aware routing uses "
                "its cache again", track.role, url, agreement * 100, window,
            )  # fmt: skip
            return
        track.distrusted_once = True
        self._distrusted.labels(track.role, url).inc()
        log.warning(
            "prefix-cache predictions for %s instance %s disagree with the engine: over the "
            "last %d requests with hits the proxy predicted %d cached tokens, the engine "
            "reported %d (agreement %.0f %% < %.0f %%), %s; it is routed on load alone "
            "until they agree again", track.role, url, window, predicted_sum, observed_sum,
            agreement * 100, self._config.min_agreement * 100,
            _likely_cause(predicted_sum, observed_sum),
        )  # fmt: skip

    def forget(self, instance: Instance) -> None:
        """The instance left: its samples and series go (a new one starts trusted)."""
        track = self._tracks.pop(instance.url, None)
        if track is None or track.children is None:
            return
        labels = (track.role, instance.url)
        for metric in (self._predicted, self._observed, self._checks, self._trusted):
            metric.remove(*labels)
        if track.distrusted_once:
            self._distrusted.remove(*labels)


def _likely_cause(predicted: int, observed: int) -> str:
    if predicted == 0:
        return (
            "most likely the proxy's block hashes are not the engine's (its hash seed: "
            "routing_tokenizer.engine_pythonhashseed must be the engines' PYTHONHASHSEED; its "
            "block size or hash algorithm; its tokenizer) or none of its KV events reach the "
            "proxy"
        )
    if predicted > observed:
        return (
            "the index lists blocks the engine no longer holds (KV events lost or late, an "
            "engine restart not yet seen)"
        )
    return "the index lacks blocks the engine holds (KV events lost or late)"
