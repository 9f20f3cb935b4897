"""Upstream instances as the proxy sees them: address, role, health and live load."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class KvEventsEndpoint:
    """Where an instance publishes vLLM's KV cache events, as a proxy dials them.

    The field names are those of vLLM's ``KVEventsConfig``; the JSON form (admin API, config
    file, controller) is ``{"endpoint": "tcp://host:port", "replay_endpoint": ...}``. Both
    are on the instance URL's own host (``registry.parse_kv_events`` makes sure), so nobody
    who registers an instance can point the proxy at an arbitrary address.
    """

    endpoint: str  # the ZMQ PUB socket
    replay_endpoint: str | None = None  # the ZMQ ROUTER that resends missed batches

    def to_json(self) -> dict[str, str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


KV_EVENTS_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(KvEventsEndpoint))


@dataclass(eq=False, slots=True)
class Instance:
    """One vLLM server behind the proxy.

    Load counters are owned by the proxy's request flow: they go up when a leg is
    dispatched and down when the client's stream ends (not when headers arrive),
    so policies see the load an instance really carries.
    """

    url: str
    role: Role
    kv_events: KvEventsEndpoint | None = None  # None: the instance publishes none we know of
    healthy: bool = True
    draining: bool = False
    consecutive_failures: int = 0
    # Health checks passed in a row while ejected; re-admission needs a few of them.
    consecutive_successes: int = 0
    in_flight_requests: int = 0
    # Prompt plus requested output tokens of every request still in flight here.
    in_flight_tokens: int = 0
    # Prompt tokens of prefill legs sent but not yet answered: the instance's prefill queue.
    queued_prompt_tokens: int = 0

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining
