"""Prefill-side table of finished requests whose blocks are held for a decode pull.

A lease ends when the decode side releases it, or when it expires. Either way
the request id lands in the "done" list, which the worker reports to vLLM as
``finished_sending`` so the scheduler frees the blocks. A lease is never
expired while a transfer is reading its blocks: those blocks must stay
allocated until the last byte is on the wire.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class EndReason(StrEnum):
    RELEASED = "released"
    EXPIRED = "expired"


class LeaseError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Lease:
    request_id: str
    block_ids: tuple[int, ...]
    expires_at: float  # unix seconds
    owned: frozenset[int] = field(init=False)
    readers: int = 0
    release_requested: bool = False

    def __post_init__(self) -> None:
        self.owned = frozenset(self.block_ids)


class LeaseTable:
    """Thread-safe: the worker adds and reaps, block-server threads read and release."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._leases: dict[str, Lease] = {}
        self._done: list[tuple[str, EndReason]] = []
        # Releases that arrived before the worker learned of the lease (the
        # scheduler ships holds one engine step after the request finished).
        self._early_releases: dict[str, float] = {}

    def add(self, request_id: str, block_ids: Sequence[int], expires_at: float) -> None:
        with self._cond:
            if request_id in self._leases:
                return
            if self._early_releases.pop(request_id, None) is not None:
                self._done.append((request_id, EndReason.RELEASED))
                return
            self._leases[request_id] = Lease(request_id, tuple(block_ids), expires_at)
            self._cond.notify_all()

    def acquire(self, request_id: str, block_ids: Sequence[int], wait_s: float) -> Lease:
        """Pin ``request_id`` for a read of ``block_ids``; raise LeaseError if refused.

        Waits up to ``wait_s`` for a lease the worker has not registered yet.
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                lease = self._leases.get(request_id)
                if lease is not None and not lease.release_requested:
                    break
                remaining = deadline - time.monotonic()
                if lease is not None or remaining <= 0:
                    raise LeaseError(
                        "unknown_request",
                        f"request {request_id!r} holds no blocks here "
                        "(never prefilled here, already released, or lease expired)",
                    )
                self._cond.wait(remaining)
            unowned = [b for b in block_ids if b not in lease.owned]
            if unowned:
                raise LeaseError(
                    "block_not_owned",
                    f"blocks {unowned[:8]} are not held for request {request_id!r}",
                )
            lease.readers += 1
            return lease

    def finish_read(self, lease: Lease) -> None:
        with self._cond:
            lease.readers -= 1
            self._maybe_end(lease)

    def release(self, request_id: str) -> bool:
        """The decode side is done with ``request_id``; True if a lease was known."""
        with self._cond:
            lease = self._leases.get(request_id)
            if lease is None:
                self._early_releases[request_id] = self._clock()
                return False
            lease.release_requested = True
            self._maybe_end(lease)
            return True

    def reap_expired(self) -> list[str]:
        """End every lease past its expiry that no transfer is reading; return their ids."""
        now = self._clock()
        expired: list[str] = []
        with self._cond:
            for lease in list(self._leases.values()):
                if lease.expires_at <= now and lease.readers == 0 and not lease.release_requested:
                    del self._leases[lease.request_id]
                    self._done.append((lease.request_id, EndReason.EXPIRED))
                    expired.append(lease.request_id)
            # An early release whose lease never arrives is forgotten after a while.
            stale = [r for r, t in self._early_releases.items() if now - t > 600.0]
            for request_id in stale:
                del self._early_releases[request_id]
        return expired

    def drain_done(self) -> list[tuple[str, EndReason]]:
        with self._cond:
            done, self._done = self._done, []
            return done

    def blocks_held(self) -> int:
        with self._cond:
            return sum(len(lease.block_ids) for lease in self._leases.values())

    def __len__(self) -> int:
        with self._cond:
            return len(self._leases)

    def _maybe_end(self, lease: Lease) -> None:
        if (
            lease.release_requested
            and lease.readers == 0
            and self._leases.pop(lease.request_id, None) is not None
        ):
            self._done.append((lease.request_id, EndReason.RELEASED))
