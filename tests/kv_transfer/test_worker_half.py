"""Worker halves of a prefill and a decode engine wired together over TCP (no vLLM engine)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
import torch
from kv_helpers import blocks_equal, vllm_like_cpu_cache, wait_until

from kv_transfer.block_client import BlockClient, ClientSettings
from kv_transfer.config import TransferSettings
from kv_transfer.leases import EndReason, LeaseError, LeaseTable
from kv_transfer.metadata import HoldSpec, PullSpec, TcpPullMetadata, TcpPullWorkerMeta
from kv_transfer.params import hold_token
from kv_transfer.worker import TcpPullWorker, WorkerSettings, unique_layers

SECRET = b"worker-secret"


def worker(role: str, lease_s: float = 30.0) -> TcpPullWorker:
    return TcpPullWorker(
        WorkerSettings(
            engine_id=f"{role}-0",
            model="tiny",
            block_size=32,
            transfer=TransferSettings(host="127.0.0.1", port=0, secret=SECRET, lease_s=lease_s),
            is_producer=role == "prefill",
            is_consumer=role == "decode",
        )
    )


@contextlib.contextmanager
def pd_pair() -> Iterator[
    tuple[TcpPullWorker, TcpPullWorker, list[torch.Tensor], list[torch.Tensor]]
]:
    src = vllm_like_cpu_cache(seed=5)
    dst = vllm_like_cpu_cache(fill="zeros")
    p, d = worker("prefill"), worker("decode")
    p.register_kv_caches({f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(src)})
    d.register_kv_caches({f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(dst)})
    try:
        yield p, d, src, dst
    finally:
        p.shutdown()
        d.shutdown()


def wait_recv(d: TcpPullWorker, timeout_s: float = 10.0) -> tuple[set[str], set[str]]:
    deadline = time.monotonic() + timeout_s
    done: set[str] = set()
    failed: set[str] = set()
    while time.monotonic() < deadline:
        _, recv, fail = d.get_finished(set())
        done |= recv
        failed |= fail
        if done:
            return done, failed
        time.sleep(0.01)
    raise AssertionError("pull never reported")


def spec(p: TcpPullWorker, rid: str, remote: list[int], local: list[int], **kw: object) -> PullSpec:
    assert p.server_port is not None
    return PullSpec(
        request_id=f"d-{rid}",
        remote_host="127.0.0.1",
        remote_port=p.server_port,
        remote_request_id=rid,
        remote_engine_id="prefill-0",
        remote_block_ids=tuple(remote),
        local_block_ids=tuple(local),
        **kw,  # type: ignore[arg-type]
    )


def test_shared_layers_are_transferred_once() -> None:
    layers = vllm_like_cpu_cache(num_layers=2)
    caches = {"a": layers[0], "b": layers[1], "c": layers[1]}
    assert unique_layers(caches) == [layers[0], layers[1]]


def test_pull_then_release_frees_the_prefill_blocks() -> None:
    with pd_pair() as (p, d, src, dst):
        p.register_holds(TcpPullMetadata(holds=[HoldSpec("r1", (2, 3, 4), time.time() + 60)]))
        d.start_load_kv(TcpPullMetadata(pulls=[spec(p, "r1", [2, 3, 4], [10, 11, 12])]))
        done, failed = wait_recv(d)
        assert done == {"d-r1"} and not failed
        assert blocks_equal(src, [2, 3, 4], dst, [10, 11, 12])
        # A successful pull reports no load errors and no failed blocks.
        assert d.get_block_ids_with_load_errors() == set()
        assert d.build_worker_meta() is None
        # The read released the lease (the server's bookkeeping runs just after the last
        # byte left it).
        assert wait_until(lambda: len(p.leases) == 0, 5)
        # Only ids vLLM has reported finished may come back as finished_sending.
        assert p.get_finished(set())[0] == set()
        assert p.get_finished({"r1"})[0] == {"r1"}
        assert p.get_finished({"r1"})[0] == set()
        d_stats = d.get_kv_connector_stats()
        assert d_stats is not None and d_stats.data["transfer_bytes"][0] > 0
        # The server records its side just after the release.
        served: list[int] = []

        def recorded() -> bool:
            stats = p.get_kv_connector_stats()
            served.extend(stats.data["transfer_bytes"] if stats is not None else ())
            return bool(served)

        assert wait_until(recorded, 5)
        assert served == d_stats.data["transfer_bytes"]


def test_start_load_kv_no_longer_registers_holds() -> None:
    """Holds are registered when the step's metadata is bound (register_holds), before the
    forward pass; start_load_kv only starts pulls."""
    with pd_pair() as (p, _d, _src, _dst):
        meta = TcpPullMetadata(holds=[HoldSpec("r0", (1, 2), time.time() + 60)])
        p.start_load_kv(meta)
        assert len(p.leases) == 0
        p.register_holds(meta)
        assert len(p.leases) == 1 and p.leases.blocks_held() == 2
        p.register_holds(meta)  # bound twice (cannot happen): still one hold
        assert len(p.leases) == 1


def test_a_hold_registered_after_the_read_arrived_is_served() -> None:
    """The decode's read (with the prefill's hold token) may reach the block server before the
    prefill engine's next step registers the hold: the server waits for it."""
    with pd_pair() as (p, d, src, dst):
        token = hold_token(SECRET, "prefill-0", "r5")
        d.start_load_kv(TcpPullMetadata(pulls=[spec(p, "r5", [7, 8], [20, 21], hold_token=token)]))
        time.sleep(0.3)  # not needed for correctness: the read is most likely waiting by now
        assert d.get_finished(set())[1] == set()
        p.register_holds(TcpPullMetadata(holds=[HoldSpec("r5", (7, 8), time.time() + 60)]))
        done, failed = wait_recv(d)
        assert done == {"d-r5"} and not failed
        assert blocks_equal(src, [7, 8], dst, [20, 21])


def test_control_release_frees_without_reading() -> None:
    """What the decode's claim keeper does for a request it will not pull."""
    with pd_pair() as (p, _d, _src, dst):
        p.register_holds(TcpPullMetadata(holds=[HoldSpec("r2", (5,), time.time() + 60)]))
        assert p.server_port is not None
        control = BlockClient(ClientSettings(secret=SECRET), None)
        assert control.release(("127.0.0.1", p.server_port), "r2") is True
        control.close()
        deadline = time.monotonic() + 10
        sent: set[str] = set()
        while not sent and time.monotonic() < deadline:
            sent = p.get_finished({"r2"})[0]
            time.sleep(0.01)
        assert sent == {"r2"}
        assert int(dst[0].view(torch.uint8).count_nonzero()) == 0


def test_failed_pull_reports_its_blocks_as_load_errors() -> None:
    with pd_pair() as (p, d, _src, _dst):
        # The prefill never held "ghost" and the read carries no hold token: refused at once.
        d.start_load_kv(TcpPullMetadata(pulls=[spec(p, "ghost", [1, 2], [11, 12])]))
        done, failed = wait_recv(d)
        # Reported received (vLLM stops waiting) but not as a request-level failure: the
        # blocks that did not arrive are named, so vLLM recomputes exactly those.
        assert done == {"d-ghost"} and failed == set()
        assert d.get_block_ids_with_load_errors() == {11, 12}
        assert d.get_block_ids_with_load_errors() == set()  # drained per step
        meta = d.build_worker_meta()
        assert isinstance(meta, TcpPullWorkerMeta) and meta.failed_blocks == {"d-ghost": 2}
        assert d.build_worker_meta() is None
        stats = d.get_kv_connector_stats()
        assert stats is not None and stats.data["failures"] == 1


def test_pull_from_dead_prefill_instance_fails_cleanly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with pd_pair() as (_p, d, _src, _dst):
        dead = PullSpec("d-x", "127.0.0.1", dead_port, "x", "gone", (1,), (1,))
        d.start_load_kv(TcpPullMetadata(pulls=[dead]))
        done, failed = wait_recv(d)
        assert done == {"d-x"} and failed == set()
        assert d.get_block_ids_with_load_errors() == {1}
        meta = d.build_worker_meta()
        assert meta is not None and meta.failed_blocks == {"d-x": 1}


def test_failures_of_one_step_are_reported_together() -> None:
    with pd_pair() as (p, d, _src, _dst):
        d.start_load_kv(
            TcpPullMetadata(pulls=[spec(p, "g1", [1], [30]), spec(p, "g2", [2, 3], [31, 32])])
        )
        done: set[str] = set()
        deadline = time.monotonic() + 10
        while done != {"d-g1", "d-g2"} and time.monotonic() < deadline:
            done |= d.get_finished(set())[1]
            time.sleep(0.01)
        assert done == {"d-g1", "d-g2"}
        assert d.get_block_ids_with_load_errors() == {30, 31, 32}
        meta = d.build_worker_meta()
        assert meta is not None and meta.failed_blocks == {"d-g1": 1, "d-g2": 2}


def test_abandoned_pull_is_reported_failed_and_still_releases() -> None:
    """The scheduler could not map blocks: release, and let vLLM apply its policy."""
    with pd_pair() as (p, d, _src, _dst):
        p.register_holds(TcpPullMetadata(holds=[HoldSpec("r3", (1,), time.time() + 60)]))
        d.start_load_kv(TcpPullMetadata(pulls=[spec(p, "r3", [], [])]))
        done, failed = wait_recv(d)
        # No local blocks to name: a request-level failure.
        assert done == failed == {"d-r3"}
        assert d.get_block_ids_with_load_errors() == set()
        meta = d.build_worker_meta()
        assert meta is not None and meta.failed_blocks == {"d-r3": 0}
        deadline = time.monotonic() + 5
        sent: set[str] = set()
        while not sent and time.monotonic() < deadline:
            sent = p.get_finished({"r3"})[0]
        assert sent == {"r3"}


def test_lease_expiry_releases_and_is_counted() -> None:
    with pd_pair() as (p, d, _src, _dst):
        p.register_holds(TcpPullMetadata(holds=[HoldSpec("late", (1, 2), time.time() + 0.3)]))
        assert p.get_finished({"late"})[0] == set()
        time.sleep(0.5)
        assert p.get_finished(set())[0] == {"late"}
        stats = p.get_kv_connector_stats()
        assert stats is not None and stats.data["leases_expired"] == 1
        # A decode arriving after the expiry is refused at once, hold token or not (the
        # server remembers ended leases; it does not wait the lease_s for a pending hold).
        token = hold_token(SECRET, "prefill-0", "late")
        started = time.monotonic()
        d.start_load_kv(TcpPullMetadata(pulls=[spec(p, "late", [1, 2], [1, 2], hold_token=token)]))
        done, _failed = wait_recv(d)
        assert done == {"d-late"} and time.monotonic() - started < 10
        assert d.get_block_ids_with_load_errors() == {1, 2}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lease_is_not_expired_while_a_read_is_in_progress() -> None:
    clock = FakeClock()
    table = LeaseTable(clock=clock)
    table.add("r", [1, 2], expires_at=105.0)
    lease = table.acquire("r", [1], wait_s=0)
    clock.now = 200.0
    assert table.reap_expired() == []  # pinned by the reader
    table.finish_read(lease)
    assert table.reap_expired() == ["r"]
    assert table.drain_done() == [("r", EndReason.EXPIRED)]
    with pytest.raises(LeaseError) as info:
        table.acquire("r", [1], wait_s=0)
    assert info.value.code == "unknown_request"


def test_release_during_read_waits_for_the_reader() -> None:
    table = LeaseTable()
    table.add("r", [1], expires_at=time.time() + 60)
    lease = table.acquire("r", [1], wait_s=0)
    assert table.release("r") is True
    assert table.drain_done() == []
    table.finish_read(lease)
    assert table.drain_done() == [("r", EndReason.RELEASED)]


def test_release_before_the_hold_arrives_is_remembered() -> None:
    table = LeaseTable()
    assert table.release("early") is False
    table.add("early", [1, 2], expires_at=time.time() + 60)
    assert table.drain_done() == [("early", EndReason.RELEASED)]
    assert table.blocks_held() == 0


def test_unowned_block_is_refused() -> None:
    table = LeaseTable()
    table.add("r", [1, 2], expires_at=time.time() + 60)
    with pytest.raises(LeaseError) as info:
        table.acquire("r", [2, 3], wait_s=0)
    assert info.value.code == "block_not_owned"
    assert table.blocks_held() == 2


def test_a_lease_claimed_past_the_forget_horizon_is_still_reported_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claimed lease can outlive the horizon after which finished request ids are forgotten
    (2 * lease_s + 60 s). Forgetting it would make its end unreportable: vLLM would never
    free the blocks and the prefill engine would step forever. Forced with a fake clock."""
    import kv_transfer.worker as worker_module

    clock = FakeClock()
    monkeypatch.setattr(worker_module.time, "monotonic", clock)
    p = worker("prefill", lease_s=1.0)
    p.register_layers(vllm_like_cpu_cache())
    try:
        p.register_holds(TcpPullMetadata(holds=[HoldSpec("long", (1, 2), time.time() + 3600)]))
        assert p.get_finished({"long"})[0] == set()
        clock.now += 1000.0  # far past the horizon, still held (claims kept renewing it)
        assert p.get_finished(set())[0] == set()
        p.leases.release("long")  # the decode finally pulled
        assert p.get_finished(set())[0] == {"long"}
    finally:
        p.shutdown()


def test_a_lease_that_ends_just_as_its_request_id_turns_old_is_still_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The faults benchmark's leak: a lease claimed for longer than the forget horizon, released
    by a block-server thread between two engine steps, just before the step in which its
    finished id turned old. That step saw the id neither held (the lease had ended) nor
    unreported (its end was not drained yet) and forgot it: the end was never reported, vLLM
    never freed the blocks and the engine stepped forever. Forced with a fake clock."""
    import kv_transfer.worker as worker_module

    clock = FakeClock()
    monkeypatch.setattr(worker_module.time, "monotonic", clock)
    p = worker("prefill", lease_s=1.0)
    p.register_layers(vllm_like_cpu_cache())
    try:
        p.register_holds(TcpPullMetadata(holds=[HoldSpec("long", (1, 2), time.time() + 3600)]))
        assert p.get_finished({"long"})[0] == set()
        clock.now += 1000.0  # past the horizon, no step in between
        p.leases.release("long")  # a block-server thread, between two steps
        assert p.get_finished(set())[0] == {"long"}
        assert p.get_finished(set())[0] == set()  # reported once
    finally:
        p.shutdown()
