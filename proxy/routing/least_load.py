"""Least load: the candidate with the smallest weighted in-flight load.

Load = ``request_weight`` x in-flight requests + ``token_weight`` x in-flight tokens
(prompt plus requested output of every request still streaming). Requests stand
for batch slots, tokens for KV-cache pressure; with the defaults 500 in-flight
tokens weigh as much as one request. Ties rotate so an idle pool is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.instances import Instance
from proxy.routing._options import number_option
from proxy.routing.base import RoutingPolicy, RoutingRequest

DEFAULT_REQUEST_WEIGHT = 1.0
DEFAULT_TOKEN_WEIGHT = 0.002


@dataclass(frozen=True, slots=True)
class LoadWeights:
    """How requests and tokens in flight add up to one load figure."""

    request_weight: float = DEFAULT_REQUEST_WEIGHT
    token_weight: float = DEFAULT_TOKEN_WEIGHT

    @classmethod
    def from_options(cls, request_weight: object, token_weight: object) -> LoadWeights:
        weights = cls(
            request_weight=number_option("request_weight", request_weight, minimum=0.0),
            token_weight=number_option("token_weight", token_weight, minimum=0.0),
        )
        if weights.request_weight == 0.0 and weights.token_weight == 0.0:
            raise ValueError("options request_weight and token_weight cannot both be 0")
        return weights

    def load(self, instance: Instance) -> float:
        return (
            self.request_weight * instance.in_flight_requests
            + self.token_weight * instance.in_flight_tokens
        )


class LeastLoadPolicy(RoutingPolicy):
    def __init__(
        self,
        request_weight: float = DEFAULT_REQUEST_WEIGHT,
        token_weight: float = DEFAULT_TOKEN_WEIGHT,
    ) -> None:
        self.weights = LoadWeights.from_options(request_weight, token_weight)
        self._tie_offset = 0

    def select(self, candidates: Sequence[Instance], request: RoutingRequest) -> Instance:
        count = len(candidates)
        # Scan from a rotating start so equal loads (an idle pool) take turns
        # instead of piling onto the first listed instance.
        start = self._tie_offset % count
        self._tie_offset += 1
        load = self.weights.load
        best = candidates[start]
        best_load = load(best)
        for step in range(1, count):
            candidate = candidates[(start + step) % count]
            candidate_load = load(candidate)
            if candidate_load < best_load:
                best, best_load = candidate, candidate_load
        return best


POLICY = LeastLoadPolicy
