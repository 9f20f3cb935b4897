"""Prefill cost: send the prompt where its prefill is predicted to finish first.

For each candidate the predicted finish time of this request is

    (queued prompt tokens + this prompt's tokens) / rate

where ``queued_prompt_tokens`` is the prefill work the proxy has sent there and not
yet seen answered, and ``rate`` is that instance's prefill throughput in tokens per
second, learned from the proxy's own observations: each finished prefill leg
contributes ``(tokens queued ahead of it at dispatch + its prompt tokens) /
round-trip time`` to an exponentially weighted moving average. So a slower
instance (older hardware, a noisy neighbour, longer context) gets less work
without any hard-coded cost model.

``prior_tokens_per_s`` is used only for an instance with no observation yet, and
only while no instance has one: once any instance is measured, unmeasured ones
are assumed to run at the measured mean, which keeps a new instance from looking
infinitely fast or slow. An instance's own first observation replaces the prior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from proxy.instances import Instance
from proxy.routing._options import fraction_option, number_option
from proxy.routing.base import RoutingPolicy, RoutingRequest

# Dispatches remembered while waiting for their observe(); failed legs never report,
# so the oldest are dropped past this bound instead of growing forever.
_MAX_PENDING = 4096


class PrefillCostPolicy(RoutingPolicy):
    def __init__(self, prior_tokens_per_s: float = 5000.0, ewma_alpha: float = 0.2) -> None:
        self.prior_tokens_per_s = number_option(
            "prior_tokens_per_s", prior_tokens_per_s, minimum=0.0, inclusive=False
        )
        self.ewma_alpha = fraction_option("ewma_alpha", ewma_alpha)
        # url -> learned tokens per second
        self._rates: dict[str, float] = {}
        # request id -> (url chosen, prompt tokens queued ahead of it at dispatch)
        self._pending: dict[str, tuple[str, int]] = {}
        self._tie_offset = 0

    # -- model --------------------------------------------------------------------------

    def learned_rate(self, instance: Instance) -> float | None:
        """The instance's learned tokens/s, or None before its first observation."""
        return self._rates.get(instance.url)

    def _default_rate(self) -> float:
        if not self._rates:
            return self.prior_tokens_per_s
        return sum(self._rates.values()) / len(self._rates)

    def predicted_finish_s(self, instance: Instance, request: RoutingRequest) -> float:
        rate = self._rates.get(instance.url) or self._default_rate()
        return (instance.queued_prompt_tokens + max(request.prompt_tokens, 1)) / rate

    # -- RoutingPolicy ------------------------------------------------------------------

    def select(self, candidates: Sequence[Instance], request: RoutingRequest) -> Instance:
        count = len(candidates)
        default_rate = self._default_rate()
        rates = self._rates
        work = max(request.prompt_tokens, 1)
        # Rotate the scan start so equal predictions (an idle pool) share the load
        # and every instance gets measured early.
        start = self._tie_offset % count
        self._tie_offset += 1
        best = candidates[start]
        best_finish = (best.queued_prompt_tokens + work) / (rates.get(best.url) or default_rate)
        for step in range(1, count):
            candidate = candidates[(start + step) % count]
            rate = rates.get(candidate.url) or default_rate
            finish = (candidate.queued_prompt_tokens + work) / rate
            if finish < best_finish:
                best, best_finish = candidate, finish
        self._remember(request.request_id, best)
        return best

    def _remember(self, request_id: str, instance: Instance) -> None:
        pending = self._pending
        # A retry re-selects under the same id: the later choice is the one that reports.
        pending.pop(request_id, None)
        pending[request_id] = (instance.url, instance.queued_prompt_tokens)
        if len(pending) > _MAX_PENDING:
            del pending[next(iter(pending))]

    def observe(self, instance: Instance, request: RoutingRequest, elapsed_s: float) -> None:
        dispatched = self._pending.pop(request.request_id, None)
        queued_ahead = dispatched[1] if dispatched and dispatched[0] == instance.url else 0
        work = queued_ahead + request.prompt_tokens
        if work <= 0 or not (0.0 < elapsed_s < math.inf):
            return
        sample = work / elapsed_s
        previous = self._rates.get(instance.url)
        if previous is None:
            self._rates[instance.url] = sample
        else:
            self._rates[instance.url] = previous + self.ewma_alpha * (sample - previous)

    def forget(self, instance: Instance) -> None:
        self._rates.pop(instance.url, None)
        stale = [rid for rid, (url, _) in self._pending.items() if url == instance.url]
        for rid in stale:
            del self._pending[rid]


POLICY = PrefillCostPolicy
