"""The one interface every routing policy implements.

A policy is a module in this package (or any importable module) that exposes
``POLICY = <RoutingPolicy subclass>``. The proxy picks the prefill and decode
policies separately by name from its config; see :func:`proxy.routing.load_policy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.instances import Instance


@dataclass(slots=True)
class RoutingRequest:
    """What a policy may look at when it chooses an instance for one request."""

    request_id: str
    # The client's prompt: completion text, token ids, or the chat messages flattened to text.
    prompt: str | list[int]
    # Exact for token-id prompts, an estimate (UTF-8 bytes / 4) for text.
    prompt_tokens: int
    max_tokens: int


class RoutingPolicy(ABC):
    """Chooses one instance out of the routable candidates.

    ``select`` is called on the event loop for every request: it must not block
    and should be O(candidates). Candidates are never empty and never contain an
    ejected or draining instance.
    """

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
