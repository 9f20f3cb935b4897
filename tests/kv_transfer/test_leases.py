"""The prefill side's lease table: holds that live as long as a decode claims them."""

from __future__ import annotations

import threading
import time

import pytest
from kv_helpers import ManualClock

from kv_transfer.leases import EndReason, Lease, LeaseError, LeaseState, LeaseTable

HELD, PENDING, GONE = LeaseState.HELD, LeaseState.PENDING, LeaseState.GONE


def test_renew_says_held_pending_or_gone() -> None:
    clock = ManualClock()
    table = LeaseTable(clock=clock)
    table.add("held", [1, 2], expires_at=clock() + 10)
    table.add("released", [3], expires_at=clock() + 10)
    table.add("expired", [4], expires_at=clock() + 1)
    assert table.release("released") is True
    clock.advance(2)
    assert table.reap_expired() == ["expired"]
    assert table.renew(["held", "unknown", "released", "expired"], 5.0) == [
        HELD,
        PENDING,
        GONE,
        GONE,
    ]
    # Wire form: the block server sends str(state).
    assert [str(s) for s in table.renew(["held", "unknown"], 5.0)] == ["held", "pending"]


def test_renew_extends_from_now_and_never_shortens() -> None:
    clock = ManualClock()
    table = LeaseTable(clock=clock)
    table.add("r", [1], expires_at=clock() + 100)
    assert table.renew(["r"], 5.0) == [HELD]  # asks for less than it has: keeps 100
    clock.advance(50)
    assert table.reap_expired() == []
    assert table.renew(["r"], 80.0) == [HELD]  # now 130 from the start
    clock.advance(70)  # t = 120
    assert table.reap_expired() == []
    clock.advance(11)  # t = 131
    assert table.reap_expired() == ["r"]
    assert table.drain_done() == [("r", EndReason.EXPIRED)]


def test_a_lease_being_released_by_its_reader_is_gone_for_renewals() -> None:
    table = LeaseTable()
    table.add("r", [1], expires_at=time.time() + 60)
    lease = table.acquire("r", [1], wait_s=0)
    table.release("r")  # the read carried release: blocks free once the bytes are out
    assert table.renew(["r"], 5.0) == [GONE]
    table.finish_read(lease)
    assert table.renew(["r"], 5.0) == [GONE]
    assert table.drain_done() == [("r", EndReason.RELEASED)]


def test_an_early_renewal_extends_the_hold_that_arrives_later() -> None:
    """The decode claims as soon as it accepts the request, maybe before the prefill worker
    has registered the hold (one engine step after the answer left)."""
    clock = ManualClock()
    table = LeaseTable(clock=clock)
    assert table.renew(["r"], 50.0) == [PENDING]
    table.add("r", [1, 2], expires_at=clock() + 10)
    assert table.renew(["r"], 1.0) == [HELD]
    clock.advance(20)  # past the hold's own expiry, within the early renewal
    assert table.reap_expired() == []
    assert len(table) == 1
    clock.advance(31)
    assert table.reap_expired() == ["r"]


def test_an_early_renewal_never_shortens_the_hold() -> None:
    clock = ManualClock()
    table = LeaseTable(clock=clock)
    table.renew(["r"], 1.0)
    table.add("r", [1], expires_at=clock() + 30)
    clock.advance(2)
    assert table.reap_expired() == []
    clock.advance(29)
    assert table.reap_expired() == ["r"]


def test_an_early_release_beats_an_early_renewal() -> None:
    table = LeaseTable()
    assert table.renew(["r"], 50.0) == [PENDING]
    assert table.release("r") is False
    table.add("r", [1], expires_at=time.time() + 60)
    assert table.drain_done() == [("r", EndReason.RELEASED)]
    assert len(table) == 0 and table.blocks_held() == 0
    assert table.renew(["r"], 5.0) == [GONE]


def test_a_renewed_lease_outlives_its_first_expiry_and_ends_once_renewals_stop() -> None:
    clock = ManualClock()
    lease_s = 30.0
    table = LeaseTable(clock=clock)
    table.add("r", [1, 2, 3], expires_at=clock() + lease_s)
    # A decode keeps renewing every lease_s / 3 for five lease periods.
    for _ in range(15):
        clock.advance(lease_s / 3)
        assert table.reap_expired() == []
        assert table.renew(["r"], lease_s) == [HELD]
    assert table.blocks_held() == 3
    # The decode died: nobody renews. The lease ends lease_s after the last renewal.
    clock.advance(lease_s - 1)
    assert table.reap_expired() == []
    clock.advance(2)
    assert table.reap_expired() == ["r"]
    assert table.drain_done() == [("r", EndReason.EXPIRED)]
    assert table.renew(["r"], lease_s) == [GONE]


def test_ended_requests_are_remembered_for_ten_minutes() -> None:
    clock = ManualClock()
    table = LeaseTable(clock=clock)
    table.add("r", [1], expires_at=clock() + 1)
    table.release("r")
    clock.advance(599)
    table.reap_expired()
    assert table.renew(["r"], 5.0) == [GONE]
    clock.advance(2)
    table.reap_expired()
    assert table.renew(["r"], 5.0) == [PENDING]  # forgotten: indistinguishable from new


def test_a_release_after_the_end_is_not_remembered_as_early() -> None:
    table = LeaseTable()
    table.add("r", [1], expires_at=time.time() + 60)
    table.release("r")
    table.drain_done()
    assert table.release("r") is False  # late duplicate release
    # The same id held again (a retried prefill) is not released by that stale release.
    table.add("r", [1], expires_at=time.time() + 60)
    assert table.drain_done() == []
    assert len(table) == 1


def _acquire_in_thread(
    table: LeaseTable, request_id: str, blocks: list[int], wait_s: float
) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            result["lease"] = table.acquire(request_id, blocks, wait_s)
        except LeaseError as exc:
            result["error"] = exc
        result["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_acquire_of_an_ended_request_is_refused_at_once() -> None:
    table = LeaseTable()
    table.add("done", [1], expires_at=time.time() + 60)
    table.release("done")
    started = time.monotonic()
    with pytest.raises(LeaseError) as info:
        table.acquire("done", [1], wait_s=30.0)
    assert info.value.code == "unknown_request"
    assert time.monotonic() - started < 1.0  # not the 30 s wait for a hold on its way


def test_acquire_of_an_unknown_request_waits_for_the_hold() -> None:
    table = LeaseTable()
    thread, result = _acquire_in_thread(table, "late", [2], wait_s=30.0)
    # Forced order: the read is waiting before the hold is registered.
    thread.join(timeout=0.2)
    assert thread.is_alive(), result
    table.add("late", [1, 2], expires_at=time.time() + 60)
    thread.join(timeout=10)
    assert not thread.is_alive()
    lease = result.get("lease")
    assert isinstance(lease, Lease), result
    assert lease.request_id == "late" and lease.readers == 1
    # The reader pins the lease: a release waits for it.
    table.release("late")
    assert table.drain_done() == []
    table.finish_read(lease)
    assert table.drain_done() == [("late", EndReason.RELEASED)]


def test_a_waiting_acquire_is_refused_as_soon_as_the_lease_ends() -> None:
    """Released before the hold arrived: the waiting read learns it when the hold lands."""
    table = LeaseTable()
    assert table.release("r") is False
    thread, result = _acquire_in_thread(table, "r", [1], wait_s=30.0)
    thread.join(timeout=0.2)
    assert thread.is_alive(), result
    table.add("r", [1], expires_at=time.time() + 60)
    thread.join(timeout=10)
    error = result.get("error")
    assert isinstance(error, LeaseError) and error.code == "unknown_request", result
    elapsed = result["elapsed"]
    assert isinstance(elapsed, float) and elapsed < 10


def test_acquire_of_an_unknown_request_gives_up_after_its_wait() -> None:
    table = LeaseTable()
    started = time.monotonic()
    with pytest.raises(LeaseError) as info:
        table.acquire("nobody", [1], wait_s=0.2)
    assert info.value.code == "unknown_request"
    assert 0.15 <= time.monotonic() - started < 5


def test_a_lease_stays_unreported_from_its_hold_until_its_end_is_drained() -> None:
    table = LeaseTable()
    assert not table.unreported("r")
    table.renew(["r"], 30.0)  # a claim that arrived before the hold: the hold is coming
    assert table.unreported("r") and table.holds("r")
    table.add("r", [1], expires_at=time.time() + 30)
    assert table.unreported("r")
    table.release("r")
    assert not table.holds("r")
    assert table.unreported("r"), "ended but not drained: its end is still to be reported"
    assert table.drain_done() == [("r", EndReason.RELEASED)]
    assert not table.unreported("r")
