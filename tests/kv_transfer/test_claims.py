"""The decode side's ClaimKeeper against a real block server and lease table (real TCP)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from kv_helpers import SECRET, Endpoints, running_server, vllm_like_cpu_cache, wait_until

from kv_transfer.block_client import BlockClient, ClientSettings, Endpoint
from kv_transfer.claims import ClaimKeeper
from kv_transfer.leases import EndReason, LeaseTable

LEASE_S = 0.5  # renewals every ~0.17 s; two in a row may be late before the lease ends


@pytest.fixture
def ends() -> Iterator[Endpoints]:
    with running_server(vllm_like_cpu_cache(num_blocks=16), unknown_request_wait_s=0.0) as e:
        yield e


def keeper_for(client: BlockClient | None = None) -> ClaimKeeper:
    client = client or BlockClient(
        ClientSettings(secret=SECRET, connect_timeout_s=1.0, io_timeout_s=2.0), None
    )
    keeper = ClaimKeeper(client)
    keeper.start()
    return keeper


def reap_for(table: LeaseTable, seconds: float) -> list[str]:
    """Call reap_expired as the prefill worker does every step, for ``seconds``."""
    expired: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        expired += table.reap_expired()
        time.sleep(0.02)
    return expired


def test_a_claim_keeps_the_lease_alive_until_dropped(ends: Endpoints) -> None:
    ends.leases.add("p-1", [1, 2], expires_at=time.time() + LEASE_S)
    keeper = keeper_for()
    try:
        keeper.claim("d-1", [ends.address], "p-1", LEASE_S)
        assert reap_for(ends.leases, 5 * LEASE_S) == []  # five lease periods
        assert len(ends.leases) == 1 and keeper.claimed("d-1") and not keeper.lost("d-1")
        keeper.drop("d-1")
        assert not keeper.claimed("d-1")
        # Nobody renews any more: the lease ends within about one period.
        started = time.monotonic()
        expired: list[str] = []

        def reaped() -> bool:
            expired.extend(ends.leases.reap_expired())
            return bool(expired)

        assert wait_until(reaped, 5)
        assert expired == ["p-1"]
        assert time.monotonic() - started < 3 * LEASE_S
        assert ends.leases.drain_done() == [("p-1", EndReason.EXPIRED)]
    finally:
        keeper.stop()


def test_a_claim_made_before_the_hold_arrives_keeps_it(ends: Endpoints) -> None:
    """The decode accepts the request before the prefill worker registered the hold."""
    keeper = keeper_for()
    try:
        keeper.claim("d-1", [ends.address], "p-1", LEASE_S)
        time.sleep(LEASE_S / 2)  # renewals answered PENDING meanwhile
        ends.leases.add("p-1", [1], expires_at=time.time() + LEASE_S)
        assert reap_for(ends.leases, 3 * LEASE_S) == []
        assert not keeper.lost("d-1")
    finally:
        keeper.stop()


def test_release_frees_the_lease_at_once(ends: Endpoints) -> None:
    ends.leases.add("p-1", [1], expires_at=time.time() + 60)
    keeper = keeper_for()
    try:
        keeper.claim("d-1", [ends.address], "p-1", 60.0)
        keeper.release("d-1", [ends.address], "p-1")
        assert not keeper.claimed("d-1")
        done: list[tuple[str, EndReason]] = []

        def drained() -> bool:
            done.extend(ends.leases.drain_done())
            return bool(done)

        assert wait_until(drained, 5)
        assert done == [("p-1", EndReason.RELEASED)]
        assert not keeper.lost("d-1")
    finally:
        keeper.stop()


def test_a_claim_on_a_lease_that_ended_is_lost(
    ends: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    ends.leases.add("p-1", [1], expires_at=time.time() + 60)
    ends.leases.release("p-1")
    keeper = keeper_for()
    try:
        with caplog.at_level(logging.WARNING, logger="kv_transfer.claims"):
            keeper.claim("d-1", [ends.address], "p-1", 60.0)
            # GONE is final: lost at the first renewal, not a lease period later.
            assert wait_until(lambda: keeper.lost("d-1"), 5)
        assert not keeper.claimed("d-1")
        assert any("no longer holds KV of p-1" in r.getMessage() for r in caplog.records)
        keeper.drop("d-1")  # the scheduler forgets it once it has acted
        assert not keeper.lost("d-1")
    finally:
        keeper.stop()


def test_a_lease_that_ends_while_claimed_is_lost(ends: Endpoints) -> None:
    """The prefill ended a lease the decode was renewing (a release from elsewhere, an
    expiry after missed renewals): the decode learns it at the next renewal."""
    ends.leases.add("p-1", [1], expires_at=time.time() + LEASE_S)
    keeper = keeper_for()
    try:
        keeper.claim("d-1", [ends.address], "p-1", LEASE_S)
        assert reap_for(ends.leases, 2 * LEASE_S) == []  # held and renewed meanwhile
        assert not keeper.lost("d-1")
        ends.leases.release("p-1")
        assert wait_until(lambda: keeper.lost("d-1"), 5)
    finally:
        keeper.stop()


def _dead_endpoint() -> Endpoint:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return ("127.0.0.1", probe.getsockname()[1])


def test_an_unreachable_prefill_is_lost_after_one_lease_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = _dead_endpoint()
    keeper = keeper_for()
    try:
        with caplog.at_level(logging.WARNING, logger="kv_transfer.claims"):
            keeper.claim("d-1", [dead], "p-1", LEASE_S)
            keeper.claim("d-2", [dead], "p-2", LEASE_S)
            started = time.monotonic()
            time.sleep(LEASE_S / 2)
            assert not keeper.lost("d-1")  # one failed renewal is not a lost lease
            assert wait_until(lambda: keeper.lost("d-1") and keeper.lost("d-2"), 10)
            assert time.monotonic() - started >= LEASE_S
        cannot = [r for r in caplog.records if "cannot renew" in r.getMessage()]
        assert len(cannot) == 1, [r.getMessage() for r in cannot]  # not one per renewal
        lost = [r for r in caplog.records if "no longer holds KV" in r.getMessage()]
        assert {("d-1" in r.getMessage(), "d-2" in r.getMessage()) for r in lost} == {
            (True, False),
            (False, True),
        }
    finally:
        keeper.stop()


def test_a_claim_on_several_ranks_renews_every_rank(ends: Endpoints) -> None:
    src = vllm_like_cpu_cache(num_blocks=16)
    with running_server(src) as rank1:
        ends.leases.add("p-1", [1], expires_at=time.time() + LEASE_S)
        rank1.leases.add("p-1", [1], expires_at=time.time() + LEASE_S)
        keeper = keeper_for()
        try:
            keeper.claim("d-1", [ends.address, rank1.address], "p-1", LEASE_S)
            deadline = time.monotonic() + 3 * LEASE_S
            while time.monotonic() < deadline:
                assert ends.leases.reap_expired() == []
                assert rank1.leases.reap_expired() == []
                time.sleep(0.02)
            keeper.release("d-1", [ends.address, rank1.address], "p-1")
            assert wait_until(lambda: len(ends.leases) == 0 and len(rank1.leases) == 0, 5)
        finally:
            keeper.stop()


class FlakyClient(BlockClient):
    """A client whose first renewal hits a bug (not a network error)."""

    def __init__(self) -> None:
        super().__init__(ClientSettings(secret=SECRET, connect_timeout_s=1.0), None)
        self.renewals = 0
        self._lock = threading.Lock()

    def renew(self, endpoint: Endpoint, request_ids: Sequence[str], extend_s: float) -> list[str]:
        with self._lock:
            self.renewals += 1
            first = self.renewals == 1
        if first:
            raise RuntimeError("bug in renew")
        return super().renew(endpoint, request_ids, extend_s)


def test_a_bug_in_one_renewal_is_logged_and_renewals_go_on(
    ends: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    ends.leases.add("p-1", [1], expires_at=time.time() + LEASE_S)
    client = FlakyClient()
    keeper = keeper_for(client)
    try:
        with caplog.at_level(logging.ERROR, logger="kv_transfer.claims"):
            keeper.claim("d-1", [ends.address], "p-1", LEASE_S)
            assert reap_for(ends.leases, 4 * LEASE_S) == []
        assert client.renewals >= 4
        assert not keeper.lost("d-1") and keeper.claimed("d-1")
        errors = [r for r in caplog.records if r.exc_info and "bug in renew" in str(r.exc_info[1])]
        assert len(errors) == 1, caplog.text
        # Claims made after the bug are served too.
        ends.leases.add("p-2", [2], expires_at=time.time() + LEASE_S)
        keeper.claim("d-2", [ends.address], "p-2", LEASE_S)
        assert reap_for(ends.leases, 2 * LEASE_S) == []
    finally:
        keeper.stop()


def test_more_claims_than_one_renew_frame_holds_are_all_renewed() -> None:
    """A busy decode may claim thousands of leases on one prefill instance; the block server
    bounds one renew frame (max_renewals_per_frame). The keeper must split, not lose them."""
    src = vllm_like_cpu_cache(num_blocks=16)
    with running_server(src, max_renewals_per_frame=2) as small:
        for i in range(3):
            small.leases.add(f"p-{i}", [i], expires_at=time.time() + LEASE_S)
        keeper = ClaimKeeper(
            BlockClient(ClientSettings(secret=SECRET, connect_timeout_s=1.0), None)
        )
        for i in range(3):  # all due at once: one batch for the endpoint
            keeper.claim(f"d-{i}", [small.address], f"p-{i}", LEASE_S)
        keeper.start()
        try:
            assert reap_for(small.leases, 3 * LEASE_S) == []
            assert not any(keeper.lost(f"d-{i}") for i in range(3))
        finally:
            keeper.stop()


def test_a_lease_longer_than_the_servers_max_extend_is_still_renewed(ends: Endpoints) -> None:
    """A block server accepts 0 < extend_s <= max_extend_s (3600 s by default), while the
    claim's lease_s comes from the prefill's config (any positive value) or its params:
    renewing with more than the server accepts gets the control connection closed, so the
    lease is never extended. The keeper must stay within what a server accepts."""
    ends.leases.add("p-1", [1], expires_at=time.time() + 0.5)
    keeper = keeper_for()
    try:
        keeper.claim("d-1", [ends.address], "p-1", 4000.0)
        assert reap_for(ends.leases, 1.5) == []
    finally:
        keeper.stop()


def test_a_lease_the_pull_itself_released_is_not_reported_lost(
    ends: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    """Between the pull (a read that releases) and the scheduler dropping the claim, a renewal
    finds the lease gone: that is the pull's doing, not a lost lease."""
    ends.leases.add("p-1", [1], expires_at=time.time() + 60)
    keeper = keeper_for()
    try:
        keeper.claim("d-1", [ends.address], "p-1", 0.3)
        keeper.pulling("d-1")
        with caplog.at_level(logging.WARNING, logger="kv_transfer.claims"):
            ends.leases.release("p-1")
            assert wait_until(lambda: not keeper.claimed("d-1"), 5)
        assert not keeper.lost("d-1")
        assert not [r for r in caplog.records if "no longer holds" in r.getMessage()]
    finally:
        keeper.stop()
