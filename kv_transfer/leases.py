"""Prefill-side table of finished requests whose blocks are held for a decode pull.

A lease follows the request, not the clock. It starts when the prefill scheduler decides to
hold (``add``, with a first expiry ``lease_s`` ahead) and lives on while a decode instance
claims it: a decode engine renews its claim from the moment it accepts the request until its
pull is done, however long the request waits in its queue. A lease ends when the decode side
releases it (after reading, or because it gave up), or when nobody renewed it for ``lease_s``:
then the decode side is gone and nobody will read. Either way the request id lands in the
"done" list, which the worker reports to vLLM as ``finished_sending`` so the scheduler frees
the blocks. A lease never expires while a transfer is reading its blocks: those blocks must
stay allocated until the last byte is on the wire.

Holds reach the worker one engine step after the prefill answered, so a claim, release or
read may arrive first: claims and releases are remembered and applied when the hold arrives,
and a read may wait (bounded) for a hold it knows was issued.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class EndReason(StrEnum):
    RELEASED = "released"
    EXPIRED = "expired"


class LeaseState(StrEnum):
    """What a claim renewal finds (the decode side acts on it)."""

    HELD = "held"  # the blocks are held; the lease was extended
    PENDING = "pending"  # no hold here yet (it may still be on its way from the scheduler)
    GONE = "gone"  # the lease ended (released or expired): the blocks are not coming back


# How long ended and early-arrived request ids are remembered.
_MEMORY_S = 600.0
_MEMORY_MAX = 100_000


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
        self._undrained: set[str] = set()  # the request ids in _done
        # Releases and claim renewals that arrived before the worker learned of the lease,
        # with when they arrived (releases) or the expiry they asked for (renewals).
        self._early_releases: dict[str, float] = {}
        self._early_renewals: dict[str, float] = {}
        # Leases that ended, so late claims and reads are told at once that nothing is held.
        self._ended: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str, block_ids: Sequence[int], expires_at: float) -> None:
        with self._cond:
            if request_id in self._leases:
                return
            if self._early_releases.pop(request_id, None) is not None:
                self._early_renewals.pop(request_id, None)
                self._end(request_id, EndReason.RELEASED)
                return
            renewed = self._early_renewals.pop(request_id, None)
            if renewed is not None:
                expires_at = max(expires_at, renewed)
            self._leases[request_id] = Lease(request_id, tuple(block_ids), expires_at)
            self._cond.notify_all()

    def renew(self, request_ids: Sequence[str], extend_s: float) -> list[LeaseState]:
        """Extend each lease to at least ``extend_s`` from now; say what each one is."""
        until = self._clock() + extend_s
        states: list[LeaseState] = []
        with self._cond:
            for request_id in request_ids:
                lease = self._leases.get(request_id)
                if lease is not None and not lease.release_requested:
                    lease.expires_at = max(lease.expires_at, until)
                    states.append(LeaseState.HELD)
                elif lease is not None or request_id in self._ended:
                    states.append(LeaseState.GONE)
                elif len(self._early_renewals) >= _MEMORY_MAX:
                    states.append(LeaseState.PENDING)
                else:
                    previous = self._early_renewals.get(request_id, 0.0)
                    self._early_renewals[request_id] = max(previous, until)
                    states.append(LeaseState.PENDING)
        return states

    def acquire(self, request_id: str, block_ids: Sequence[int], wait_s: float) -> Lease:
        """Pin ``request_id`` for a read of ``block_ids``; raise LeaseError if refused.

        Waits up to ``wait_s`` for a lease the worker has not registered yet; a lease that
        already ended is refused at once.
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                lease = self._leases.get(request_id)
                if lease is not None and not lease.release_requested:
                    break
                remaining = deadline - time.monotonic()
                if lease is not None or request_id in self._ended or remaining <= 0:
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
                if request_id not in self._ended and len(self._early_releases) < _MEMORY_MAX:
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
                    self._end(lease.request_id, EndReason.EXPIRED)
                    expired.append(lease.request_id)
            # Early releases and renewals whose lease never arrives are forgotten after a while.
            for request_id in [r for r, t in self._early_releases.items() if now - t > _MEMORY_S]:
                del self._early_releases[request_id]
            for request_id in [r for r, t in self._early_renewals.items() if now - t > _MEMORY_S]:
                del self._early_renewals[request_id]
            while self._ended and (
                len(self._ended) > _MEMORY_MAX or now - next(iter(self._ended.values())) > _MEMORY_S
            ):
                self._ended.popitem(last=False)
        return expired

    def drain_done(self) -> list[tuple[str, EndReason]]:
        with self._cond:
            done, self._done = self._done, []
            self._undrained.clear()
            return done

    def blocks_held(self) -> int:
        with self._cond:
            return sum(len(lease.block_ids) for lease in self._leases.values())

    def holds(self, request_id: str) -> bool:
        """True while ``request_id``'s blocks are held (or a hold for it is known to come)."""
        with self._cond:
            return request_id in self._leases or request_id in self._early_renewals

    def unreported(self, request_id: str) -> bool:
        """True until the end of ``request_id``'s lease has been taken by ``drain_done``: its
        blocks are held, a hold for it is known to come, or it ended and is not drained yet.

        One answer under one lock: a lease that ends on a block-server thread between two
        separate checks (held? drained?) would pass both."""
        with self._cond:
            return (
                request_id in self._leases
                or request_id in self._early_renewals
                or request_id in self._undrained
            )

    def __len__(self) -> int:
        with self._cond:
            return len(self._leases)

    def _maybe_end(self, lease: Lease) -> None:
        if (
            lease.release_requested
            and lease.readers == 0
            and self._leases.pop(lease.request_id, None) is not None
        ):
            self._end(lease.request_id, EndReason.RELEASED)

    def _end(self, request_id: str, reason: EndReason) -> None:
        self._done.append((request_id, reason))
        self._undrained.add(request_id)
        self._ended[request_id] = self._clock()
        self._ended.move_to_end(request_id)
        self._cond.notify_all()
