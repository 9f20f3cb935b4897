"""Round robin: each request goes to the next candidate in turn, ignoring load."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.instances import Instance
from proxy.routing.base import RoutingPolicy, RoutingRequest


class RoundRobinPolicy(RoutingPolicy):
    def __init__(self) -> None:
        # A plain counter modulo the current candidate count: when the pool shrinks
        # or grows the rotation carries on over whatever is routable now.
        self._turn = 0

    def select(self, candidates: Sequence[Instance], request: RoutingRequest) -> Instance:
        chosen = candidates[self._turn % len(candidates)]
        self._turn += 1
        return chosen


POLICY = RoundRobinPolicy
