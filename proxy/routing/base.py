"""The one interface every routing policy implements.

A policy is a module in this package (or any importable module) that exposes
``POLICY = <RoutingPolicy subclass>``. The proxy picks the prefill and decode
policies separately by name from its config; see :func:`proxy.routing.load_policy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from proxy.instances import Instance

if TYPE_CHECKING:
    from proxy.block_hashes import HashSettings
    from proxy.kv_index import KVIndex

# An instance URL -> the hash settings the proxy computes ``RoutingRequest.block_keys`` with,
# when that instance is known to use them; None while unknown (or when it uses others).
HashSettingsLookup = Callable[[str], "HashSettings | None"]


@dataclass(slots=True)
class RoutingRequest:
    """What a policy may look at when it chooses an instance for one request."""

    request_id: str
    # The client's prompt: completion text, token ids, or the chat messages flattened to text.
    prompt: str | list[int]
    # Exact for token-id prompts, an estimate (UTF-8 bytes / 4) for text.
    prompt_tokens: int
    max_tokens: int
    # The prompt's prefix-cache block keys (``proxy.block_hashes.block_keys`` of the ids the
    # engine sees), computed only when a policy of this proxy sets ``needs_kv_index``; None
    # otherwise, and whenever they could not be computed (route on load alone then).
    block_keys: Sequence[int] | None = None


class RoutingPolicy(ABC):
    """Chooses one instance out of the routable candidates.

    ``select`` is called on the event loop for every request: it must not block
    and should be O(candidates). Candidates are never empty and never contain an
    ejected or draining instance.

    A policy that routes on the engines' prefix caches sets ``needs_kv_index = True``: the
    proxy then hands it the shared KV index once, through ``bind_kv_index``, and computes
    every request's ``block_keys`` before selection. No other policy costs that work.
    """

    needs_kv_index: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(f"{type(self).__name__} takes no options, got {sorted(options)}")

    @abstractmethod
    def select(self, candidates: Sequence[Instance], request: RoutingRequest) -> Instance: ...

    # Optional hooks: a stateless policy simply inherits these no-ops.
    def observe(  # noqa: B027
        self, instance: Instance, request: RoutingRequest, elapsed_s: float
    ) -> None:
        """Feedback after a leg routed by this policy finished successfully in ``elapsed_s``."""

    def forget(self, instance: Instance) -> None:  # noqa: B027
        """The instance left the pool; drop any state kept for it."""

    def bind_kv_index(  # noqa: B027
        self, index: KVIndex, hash_settings: HashSettingsLookup
    ) -> None:
        """Called once by the proxy, before any ``select``, when ``needs_kv_index`` is set:
        the index of the blocks each instance caches (fed by its KV events) and, per instance
        URL, the hash settings ``block_keys`` were computed with if that instance uses them."""
