"""KV cache: the candidate whose prefix cache saves the most prefill, weighed against its load.

For each candidate the expected saved prefill tokens are the prompt's leading blocks that
the instance caches, as the proxy's KV index knows them from the engine's KV events
(``KVIndex.cached_prefix_blocks`` of the request's ``block_keys``), times the engine's
block size, capped at ``prompt_tokens - 1`` (vLLM always computes the last prompt token).
An instance counts 0 while its index is unsynced (a gap in its events), while the proxy
does not yet know its hash settings (read from its ``/metrics``), and for any request
without block keys (no tokenizer configured, a tokenizer failure, a multimodal prompt):
the policy then routes on load alone. Score::

    hit_weight x saved_tokens - load_weight x in_flight_tokens

(the proxy does not track the engines' KV cache utilisation, so in-flight tokens, prompt
plus requested output, stand for it). The highest score wins; ties go to the candidate
with fewer in-flight requests, then rotate, so an idle pool is shared.

A hot prefix must not pile every request onto the instances that cache it: as in
``prefix_affinity`` ("consistent hashing with bounded loads"), an instance is skipped while
its in-flight requests, counting this one, would exceed ``ceil((1 + epsilon) x average)``.
The least loaded instance always fits, so a choice always exists; once a cacher is full
the overflow goes elsewhere, where the prefix is then cached too.

The index learns of a prompt's blocks only once the engine computed them and its events
arrived, one engine step or more after the request was routed; requests that share a new
prefix and arrive meanwhile would be scattered by load. So the policy also remembers, per
instance, the block keys of the requests it routed there for ``pending_s`` seconds (at most
``pending_blocks`` keys per instance, oldest dropped first): an instance's expected hit is
the longer of the prefix its index holds and the prefix routed to it lately. That memory is
the policy's own guess, used for scoring only; the cache bypass and the hit check trust the
index alone.

Per request: one index lookup and one walk of the routed prefixes per candidate (each a
walk of the matched prefix), O(candidates).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from proxy.instances import Instance
from proxy.routing._options import int_option, number_option
from proxy.routing.base import HashSettingsLookup, RoutingPolicy, RoutingRequest

if TYPE_CHECKING:
    from proxy.kv_index import KVIndex

DEFAULT_HIT_WEIGHT = 1.0
# An in-flight request mostly costs decode steps, which are cheap beside a prefill: a whole
# cached prefix is worth several requests of load. Tuned with `pdserve bench routing`, where
# 1.0 sent most repeats of a prefix away from its cache as soon as the cacher held one
# request more than the other instance (hit rate 51-56 % against 59-63 % for
# prefix_affinity); the load bound (epsilon) is what keeps a hot prefix from piling up.
DEFAULT_LOAD_WEIGHT = 0.25
DEFAULT_EPSILON = 0.25
# Longer than a prefill normally queues: the blocks are in the index well before it ends.
DEFAULT_PENDING_S = 30.0
DEFAULT_PENDING_BLOCKS = 65_536


def _no_settings(url: str) -> None:
    return None


class KVCachePolicy(RoutingPolicy):
    needs_kv_index = True

    def __init__(
        self,
        hit_weight: float = DEFAULT_HIT_WEIGHT,
        load_weight: float = DEFAULT_LOAD_WEIGHT,
        epsilon: float = DEFAULT_EPSILON,
        pending_s: float = DEFAULT_PENDING_S,
        pending_blocks: int = DEFAULT_PENDING_BLOCKS,
    ) -> None:
        self.hit_weight = number_option("hit_weight", hit_weight, minimum=0.0)
        self.load_weight = number_option("load_weight", load_weight, minimum=0.0)
        if self.hit_weight == 0.0 and self.load_weight == 0.0:
            raise ValueError("options hit_weight and load_weight cannot both be 0")
        self.epsilon = number_option("epsilon", epsilon, minimum=0.0)
        self.pending_s = number_option("pending_s", pending_s, minimum=0.0)
        self.pending_blocks = int_option("pending_blocks", pending_blocks, minimum=1)
        # What "now" is for pending_s (a test sets its own).
        self.clock: Callable[[], float] = time.monotonic
        # Instance URL -> block key -> when it stops counting, oldest routed first.
        self._pending: dict[str, OrderedDict[int, float]] = {}
        self._index: KVIndex | None = None
        self._hash_settings: HashSettingsLookup = _no_settings
        self._tie_offset = 0

    def bind_kv_index(self, index: KVIndex, hash_settings: HashSettingsLookup) -> None:
        self._index = index
        self._hash_settings = hash_settings

    def capacity(self, candidates: Sequence[Instance]) -> int:
        """Most in-flight requests an instance may hold after taking this one."""
        total = sum(instance.in_flight_requests for instance in candidates) + 1
        return math.ceil((1.0 + self.epsilon) * total / len(candidates))

    def saved_tokens(self, instance: Instance, request: RoutingRequest) -> int:
        """Prefill tokens ``instance``'s prefix cache is expected to save for ``request``."""
        keys = request.block_keys
        index = self._index
        if not keys or index is None:
            return 0
        settings = self._hash_settings(instance.url)
        if settings is None:
            return 0
        blocks = max(
            index.cached_prefix_blocks(instance.url, keys), self._pending_prefix(instance.url, keys)
        )
        if not blocks:
            return 0
        return max(0, min(blocks * settings.block_size, request.prompt_tokens - 1))

    def _pending_prefix(self, url: str, keys: Sequence[int]) -> int:
        """Leading blocks of ``keys`` routed to ``url`` within the last ``pending_s``."""
        pending = self._pending.get(url)
        if not pending:
            return 0
        now = self.clock()
        count = 0
        for key in keys:
            until = pending.get(key)
            if until is None or until < now:
                break
            count += 1
        return count

    def _remember(self, url: str, keys: Sequence[int]) -> None:
        if self.pending_s <= 0:
            return
        pending = self._pending.setdefault(url, OrderedDict())
        until = self.clock() + self.pending_s
        for key in keys:
            pending[key] = until
            pending.move_to_end(key)
        while len(pending) > self.pending_blocks:
            pending.popitem(last=False)

    def forget(self, instance: Instance) -> None:
        self._pending.pop(instance.url, None)

    def select(self, candidates: Sequence[Instance], request: RoutingRequest) -> Instance:
        count = len(candidates)
        if count == 1:
            if request.block_keys and self._index is not None:
                self._remember(candidates[0].url, request.block_keys)
            return candidates[0]
        capacity = self.capacity(candidates)
        use_cache = bool(request.block_keys) and self._index is not None and self.hit_weight > 0
        # Scan from a rotating start so equal scores (an idle pool) take turns.
        start = self._tie_offset % count
        self._tie_offset += 1
        best: Instance | None = None
        best_key: tuple[float, int] = (-math.inf, 0)
        for step in range(count):
            candidate = candidates[(start + step) % count]
            if candidate.in_flight_requests >= capacity:
                continue  # the hot-spot bound
            score = -self.load_weight * candidate.in_flight_tokens
            if use_cache:
                score += self.hit_weight * self.saved_tokens(candidate, request)
            # Higher score first, then fewer in-flight requests.
            key = (score, -candidate.in_flight_requests)
            if best is None or key > best_key:
                best, best_key = candidate, key
        if best is None:  # unreachable while epsilon >= 0 (the least loaded always fits)
            best = min(candidates, key=lambda instance: instance.in_flight_requests)
        if use_cache and request.block_keys:
            self._remember(best.url, request.block_keys)
        return best


POLICY = KVCachePolicy
