"""Upstream instances as the proxy sees them: address, role, health and live load."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(eq=False, slots=True)
class Instance:
    """One vLLM server behind the proxy.

    Load counters are owned by the proxy's request flow: they go up when a leg is
    dispatched and down when the client's stream ends (not when headers arrive),
    so policies see the load an instance really carries.
    """

    url: str
    role: Role
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
