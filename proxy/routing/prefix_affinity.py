"""Prefix affinity: requests sharing their leading prompt blocks go to the same instance.

The key is a hash of the prompt's first ``prefix_blocks`` whole blocks (blocks of
``block_chars`` characters for text, ``block_tokens`` ids for token prompts), so
requests with one system prompt or few-shot preamble land where that prefix is
already in vLLM's prefix cache. Keys map onto instances by consistent hashing with
``virtual_nodes`` points per instance: when an instance joins or leaves, only the
keys it gains or loses (about 1/N) move.

A hot prefix must not swamp its instance, so the walk follows "consistent hashing
with bounded loads" (Mirrokni, Thorup, Zadimoghaddam 2018): an instance is
skipped while its in-flight requests, counting this one, would exceed
``ceil((1 + epsilon) x average)``. The least loaded instance always fits that
bound, so a choice always exists; lower ``epsilon`` means more balance and less
affinity.

Per request: one hash of a bounded prefix, one bisect, and a walk that ends at the
first instance under the bound (expected O(candidates) steps when some are over it).
The ring is rebuilt only when the candidate set changes, and the last few rings are
kept so a flapping instance does not cost a rebuild each time.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.instances import Instance
from proxy.routing._options import int_option, number_option
from proxy.routing.base import RoutingPolicy, RoutingRequest

# Rings kept for recently seen candidate sets (ejection and re-admission flip between a few).
_RING_CACHE_SIZE = 8


def hash64(data: bytes) -> int:
    """A stable 64-bit hash: the same in every process, so proxy replicas agree."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True, slots=True)
class HashRing:
    """Sorted virtual-node points and, for each point, the index of its owner in ``urls``."""

    urls: tuple[str, ...]
    points: list[int]
    owners: list[int]

    @classmethod
    def build(cls, urls: frozenset[str], virtual_nodes: int) -> HashRing:
        ordered = tuple(sorted(urls))
        # A point depends only on (url, replica number), never on the other members:
        # that is what keeps keys in place when the membership changes.
        placed = sorted(
            (hash64(f"{url}#{replica}".encode()), owner)
            for owner, url in enumerate(ordered)
            for replica in range(virtual_nodes)
        )
        return cls(
            urls=ordered,
            points=[point for point, _ in placed],
            owners=[owner for _, owner in placed],
        )

    def start(self, key: int) -> int:
        """Index of the first point clockwise from ``key``."""
        index = bisect.bisect_left(self.points, key)
        return 0 if index == len(self.points) else index


class PrefixAffinityPolicy(RoutingPolicy):
    def __init__(
        self,
        block_chars: int = 64,
        block_tokens: int = 16,
        prefix_blocks: int = 8,
        virtual_nodes: int = 100,
        epsilon: float = 0.25,
    ) -> None:
        self.block_chars = int_option("block_chars", block_chars, minimum=1)
        self.block_tokens = int_option("block_tokens", block_tokens, minimum=1)
        self.prefix_blocks = int_option("prefix_blocks", prefix_blocks, minimum=1)
        self.virtual_nodes = int_option("virtual_nodes", virtual_nodes, minimum=1)
        self.epsilon = number_option("epsilon", epsilon, minimum=0.0)
        self._rings: OrderedDict[frozenset[str], HashRing] = OrderedDict()
        # The candidate tuple seen last, with its ring and the ring's owners as Instances:
        # the proxy usually passes the same pool again, so this is the common path.
        self._last_candidates: tuple[Instance, ...] = ()
        self._last_ring: HashRing | None = None
        self._last_owners: list[Instance] = []

    # -- keys ---------------------------------------------------------------------------

    def prefix_key(self, prompt: str | list[int]) -> int:
        """Hash of the prompt's leading whole blocks (the whole prompt if under one block)."""
        if isinstance(prompt, str):
            whole_blocks = min(self.prefix_blocks, len(prompt) // self.block_chars)
            text = prompt[: whole_blocks * self.block_chars] if whole_blocks else prompt
            # surrogatepass: JSON may carry lone surrogates; they must hash, not raise.
            return hash64(text.encode("utf-8", "surrogatepass"))
        whole_blocks = min(self.prefix_blocks, len(prompt) // self.block_tokens)
        ids = prompt[: whole_blocks * self.block_tokens] if whole_blocks else prompt
        try:
            return hash64(array("q", ids).tobytes())
        except (OverflowError, TypeError):
            # Ids the proxy did not validate: still a stable key, just a slower one.
            return hash64(repr(ids).encode())

    # -- ring ---------------------------------------------------------------------------

    def _ring_for(self, candidates: Sequence[Instance]) -> tuple[HashRing, list[Instance]]:
        current = tuple(candidates)
        if current == self._last_candidates and self._last_ring is not None:
            return self._last_ring, self._last_owners
        by_url = {instance.url: instance for instance in current}
        members = frozenset(by_url)
        ring = self._rings.get(members)
        if ring is None:
            ring = HashRing.build(members, self.virtual_nodes)
            self._rings[members] = ring
            if len(self._rings) > _RING_CACHE_SIZE:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(members)
        owners = [by_url[url] for url in ring.urls]
        self._last_candidates, self._last_ring, self._last_owners = current, ring, owners
        return ring, owners

    def forget(self, instance: Instance) -> None:
        for members in [m for m in self._rings if instance.url in m]:
            del self._rings[members]
        if any(candidate is instance for candidate in self._last_candidates):
            self._last_candidates, self._last_ring, self._last_owners = (), None, []

    # -- choice -------------------------------------------------------------------------

    def capacity(self, candidates: Sequence[Instance]) -> int:
        """Most in-flight requests an instance may hold after taking this one."""
        total = sum(instance.in_flight_requests for instance in candidates) + 1
        return math.ceil((1.0 + self.epsilon) * total / len(candidates))

    def select(self, candidates: Sequence[Instance], request: RoutingRequest) -> Instance:
        if len(candidates) == 1:
            return candidates[0]
        ring, owners = self._ring_for(candidates)
        capacity = self.capacity(candidates)
        index = ring.start(self.prefix_key(request.prompt))
        first = owners[ring.owners[index]]
        if first.in_flight_requests < capacity:
            return first
        # The preferred instance is full: walk clockwise to the next distinct instance
        # under the bound, so overflow of a hot key spreads in a stable order.
        checked = [False] * len(owners)
        checked[ring.owners[index]] = True
        remaining = len(owners) - 1
        points = len(ring.points)
        for step in range(1, points):
            owner = ring.owners[(index + step) % points]
            if checked[owner]:
                continue
            instance = owners[owner]
            if instance.in_flight_requests < capacity:
                return instance
            checked[owner] = True
            remaining -= 1
            if remaining == 0:
                break
        # Unreachable while epsilon >= 0 (the least loaded always fits); kept as a guard.
        return min(candidates, key=lambda instance: instance.in_flight_requests)


POLICY = PrefixAffinityPolicy
