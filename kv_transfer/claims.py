"""Decode side: claims on prefill leases, renewed while the request waits in the decode queue.

A prefill instance holds a finished request's blocks for ``lease_s`` and no longer, unless
someone says the request is still alive. The decode engine says so: from the moment its
scheduler accepts the request (``on_new_request``, before the request is ever scheduled)
until its pull has finished, this keeper renews the lease every ``lease_s / 3`` over a
control connection to the prefill's block server. A request that merely waits long in a busy
decode queue therefore keeps its blocks; a decode that died stops renewing and the prefill
frees them ``lease_s`` later; a request the decode drops (aborted, unusable params, served
from its own cache) is released at once.

The keeper runs on its own thread in the engine's scheduler process. That process only
schedules (the model runs in worker processes), so renewals are not held up by a long
forward pass, and nothing here ever blocks the scheduler: the hooks only update a table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kv_transfer import wire
from kv_transfer.block_client import BlockClient, Endpoint
from kv_transfer.leases import LeaseState
from kv_transfer.params import MAX_LEASE_S

logger = logging.getLogger(__name__)

# Renewals per lease period: two may be lost before the lease ends.
RENEWALS_PER_LEASE = 3


@dataclass
class _Claim:
    endpoints: tuple[Endpoint, ...]  # one block server per prefill TP rank
    remote_request_id: str
    lease_s: float
    claimed_at: float
    next_due: float
    last_held: float | None = None  # last time a renewal found the blocks held
    pulling: bool = False


@dataclass
class _Work:
    renew: dict[Endpoint, list[tuple[str, _Claim]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    release: list[tuple[Endpoint, str]] = field(default_factory=list)


class ClaimKeeper:
    """Renews claims on prefill leases and sends releases, off the scheduler's thread."""

    def __init__(self, client: BlockClient, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock
        self._cond = threading.Condition()
        self._claims: dict[str, _Claim] = {}
        self._releases: list[tuple[Endpoint, str]] = []
        self._lost: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failing: set[Endpoint] = set()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-claims-io")

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kv-claims", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- called from the scheduler (cheap, never blocks on the network) -------------------------

    def claim(
        self,
        request_id: str,
        endpoints: Sequence[Endpoint],
        remote_request_id: str,
        lease_s: float,
    ) -> None:
        now = self._clock()
        lease_s = min(lease_s, MAX_LEASE_S)  # block servers refuse longer renewals
        with self._cond:
            self._claims[request_id] = _Claim(
                tuple(endpoints), remote_request_id, lease_s, claimed_at=now, next_due=now
            )
            self._cond.notify_all()

    def pulling(self, request_id: str) -> None:
        """The pull is planned: keep renewing until it is done, but a lease found gone from
        now on was most likely ended by the pull itself (a read releases), not lost."""
        with self._cond:
            claim = self._claims.get(request_id)
            if claim is not None:
                claim.pulling = True

    def drop(self, request_id: str) -> None:
        """Stop renewing (the pull is done: a read with release frees the blocks itself)."""
        with self._cond:
            self._claims.pop(request_id, None)
            self._lost.discard(request_id)

    def release(
        self, request_id: str, endpoints: Sequence[Endpoint], remote_request_id: str
    ) -> None:
        """Stop renewing and tell every prefill rank to free the blocks now."""
        with self._cond:
            self._claims.pop(request_id, None)
            self._lost.discard(request_id)
            self._releases.extend((endpoint, remote_request_id) for endpoint in endpoints)
            self._cond.notify_all()

    def lost(self, request_id: str) -> bool:
        """True once the prefill instance no longer holds this request's blocks."""
        with self._cond:
            return request_id in self._lost

    def claimed(self, request_id: str) -> bool:
        with self._cond:
            return request_id in self._claims

    # -- the keeper's thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                work = self._next_work()
                if work is None:
                    return
                self._do(work)
            except Exception:
                # Supervised: a bug here must not end renewals for every later request.
                logger.exception("KV claim keeper: unexpected error; continuing")
                time.sleep(0.1)

    def _next_work(self) -> _Work | None:
        with self._cond:
            while not self._stopping:
                now = self._clock()
                work = _Work(release=self._releases)
                self._releases = []
                next_due = float("inf")
                due = any(claim.next_due <= now for claim in self._claims.values())
                for request_id, claim in self._claims.items():
                    period = claim.lease_s / RENEWALS_PER_LEASE
                    # Once one claim is due, the ones due within half a period ride along:
                    # one renewal frame per prefill instance, not one per request.
                    if due and claim.next_due <= now + period / 2:
                        for endpoint in claim.endpoints:
                            work.renew[endpoint].append((request_id, claim))
                        claim.next_due = now + period
                    next_due = min(next_due, claim.next_due)
                if work.renew or work.release:
                    return work
                self._cond.wait(None if next_due == float("inf") else max(0.0, next_due - now))
            return None

    def _do(self, work: _Work) -> None:
        # One prefill instance that does not answer must not hold up renewals to the others
        # past their lease: each endpoint is served on its own thread.
        jobs = [self._pool.submit(self._release, *item) for item in work.release]
        jobs += [self._pool.submit(self._renew, *item) for item in work.renew.items()]
        for job in jobs:
            job.result()  # re-raises a bug in a job into the supervised loop

    def _release(self, endpoint: Endpoint, remote_request_id: str) -> None:
        try:
            self._client.release(endpoint, remote_request_id)
        except (wire.WireError, wire.RemoteError, OSError) as exc:
            logger.warning(
                "could not release prefill KV of request %s at %s:%d: %s",
                remote_request_id,
                *endpoint,
                exc,
            )

    def _renew(self, endpoint: Endpoint, claims: list[tuple[str, _Claim]]) -> None:
        lease_s = min(max(claim.lease_s for _, claim in claims), MAX_LEASE_S)
        states: Sequence[str | None]
        try:
            states = self._client.renew(endpoint, [c.remote_request_id for _, c in claims], lease_s)
        except (wire.WireError, wire.RemoteError, OSError) as exc:
            if endpoint not in self._failing:
                self._failing.add(endpoint)
                logger.warning(
                    "cannot renew %d KV lease(s) at %s:%d: %s", len(claims), *endpoint, exc
                )
            states = [None for _ in claims]
        else:
            if endpoint in self._failing:
                self._failing.discard(endpoint)
                logger.info("KV lease renewals at %s:%d work again", *endpoint)
        now = self._clock()
        with self._cond:
            for (request_id, claim), state in zip(claims, states, strict=True):
                if self._claims.get(request_id) is not claim:
                    continue  # dropped or released meanwhile
                if state == LeaseState.HELD:
                    claim.last_held = now
                    continue
                if state == LeaseState.GONE and claim.pulling:
                    del self._claims[request_id]  # the pull read and released them
                    continue
                since = claim.claimed_at if claim.last_held is None else claim.last_held
                # GONE is final. PENDING (the hold has not reached the prefill's worker yet) and
                # an unreachable server are given one lease period: past it the blocks are gone.
                if state == LeaseState.GONE or now - since > claim.lease_s:
                    logger.warning(
                        "request %s: the prefill instance at %s:%d no longer holds KV of %s (%s)",
                        request_id,
                        *endpoint,
                        claim.remote_request_id,
                        "lease ended" if state == LeaseState.GONE else "no renewal succeeded",
                    )
                    self._lost.add(request_id)
                    del self._claims[request_id]
