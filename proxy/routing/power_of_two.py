"""Power of two choices: sample two distinct candidates, keep the less loaded one.

Nearly as even as least load but without herding: many proxies (or a burst
that arrives before the counters move) do not all pick the same idle instance.
Load is weighted as in :mod:`proxy.routing.least_load`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from proxy.instances import Instance
from proxy.routing.base import RoutingPolicy, RoutingRequest
from proxy.routing.least_load import DEFAULT_REQUEST_WEIGHT, DEFAULT_TOKEN_WEIGHT, LoadWeights


class PowerOfTwoPolicy(RoutingPolicy):
    def __init__(
        self,
        request_weight: float = DEFAULT_REQUEST_WEIGHT,
        token_weight: float = DEFAULT_TOKEN_WEIGHT,
        seed: int | None = None,
    ) -> None:
        self.weights = LoadWeights.from_options(request_weight, token_weight)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"option seed must be an integer or null, got {seed!r}")
        # Own generator: seedable for tests, and never disturbs the global one.
        self._rng = random.Random(seed)

    def select(self, candidates: Sequence[Instance], request: RoutingRequest) -> Instance:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        first = self._rng.randrange(count)
        # Draw the second from the other count-1 slots so the pair is distinct.
        second = (first + 1 + self._rng.randrange(count - 1)) % count
        a, b = candidates[first], candidates[second]
        return b if self.weights.load(b) < self.weights.load(a) else a


POLICY = PowerOfTwoPolicy
