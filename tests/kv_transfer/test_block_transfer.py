"""Block server + client over real TCP, into torch tensors laid out like vLLM's CPU cache."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

import pytest
import torch
from kv_helpers import (
    ENGINE_ID,
    SECRET,
    ManualClock,
    blocks_equal,
    client_hello,
    far_future,
    fingerprint_for,
    hold_token,
    running_server,
    vllm_like_cpu_cache,
    wait_until,
)

from kv_transfer import wire
from kv_transfer.block_client import BlockClient, BlockConnection, ClientSettings
from kv_transfer.device import KVCacheAccess, block_runs
from kv_transfer.leases import EndReason, Lease, LeaseTable


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pull_is_byte_exact_into_scattered_local_blocks(dtype: torch.dtype) -> None:
    src = vllm_like_cpu_cache(dtype=dtype, seed=1)
    dst = vllm_like_cpu_cache(dtype=dtype, fill="zeros")
    remote_ids = [3, 4, 5, 9, 10, 40]
    local_ids = [7, 1, 2, 8, 63, 0]
    with running_server(src) as ends:
        ends.leases.add("req-a", remote_ids, far_future())
        client = ends.client()
        nbytes = client.pull(ends.address, "req-a", remote_ids, KVCacheAccess(dst), local_ids)
        client.close()
        # The server's bookkeeping runs just after the last byte left it.
        assert wait_until(lambda: len(ends.transfers) == 1 and len(ends.leases) == 0, 5)
    assert nbytes == len(remote_ids) * len(src) * src[0][0].numel() * src[0].element_size()
    assert blocks_equal(src, remote_ids, dst, local_ids)
    untouched = [b for b in range(64) if b not in local_ids]
    assert all(int(layer[untouched].view(torch.uint8).count_nonzero()) == 0 for layer in dst)
    # The pull released the lease.
    assert ends.leases.drain_done()[0][0] == "req-a"
    assert ends.transfers and ends.transfers[0][0] == nbytes


def test_staged_path_is_byte_exact() -> None:
    """The accelerator path (stage through host buffers), exercised with CPU tensors."""
    src = vllm_like_cpu_cache(seed=2)
    dst = vllm_like_cpu_cache(fill="zeros")
    remote_ids, local_ids = [0, 1, 2, 20], [30, 31, 5, 6]
    with running_server(src, force_staging=True) as ends:
        ends.leases.add("req-s", remote_ids, far_future())
        client = ends.client()
        access = KVCacheAccess(dst, force_staging=True)
        assert access.staged
        client.pull(ends.address, "req-s", remote_ids, access, local_ids)
        client.close()
    assert blocks_equal(src, remote_ids, dst, local_ids)


def test_block_runs_coalesce_adjacent_ids() -> None:
    assert block_runs([4, 5, 6, 9, 10, 2]) == [(4, 3), (9, 2), (2, 1)]
    assert block_runs([]) == []


def test_wrong_secret_is_refused_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    src = vllm_like_cpu_cache()
    dst = vllm_like_cpu_cache(fill="zeros")
    with running_server(src) as ends, caplog.at_level(logging.WARNING):
        ends.leases.add("req-w", [1], far_future())
        client = ends.client(secret=b"wrong")
        with pytest.raises(wire.RemoteError) as info:
            client.pull(ends.address, "req-w", [1], KVCacheAccess(dst), [1])
        client.close()
        assert info.value.code == wire.ERR_AUTH
        # Refused requests keep their lease: a legitimate decode can still pull.
        assert len(ends.leases) == 1
    assert any("refused KV connection" in r.message and "auth" in r.message for r in caplog.records)
    assert int(dst[0][1].view(torch.uint8).count_nonzero()) == 0


def test_handshake_mismatch_is_refused_with_a_clear_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = vllm_like_cpu_cache(block_size=32)
    other = vllm_like_cpu_cache(block_size=16, dtype=torch.float32, fill="zeros")
    with running_server(src) as ends, caplog.at_level(logging.WARNING):
        ends.leases.add("req-h", [1], far_future())
        client = ends.client(fingerprint=fingerprint_for(other, block_size=16))
        with pytest.raises(wire.RemoteError) as info:
            client.pull(ends.address, "req-h", [1], KVCacheAccess(other), [1])
        client.close()
    assert info.value.code == wire.ERR_HANDSHAKE
    lines = [r.message for r in caplog.records if "KV layout mismatch" in r.message]
    assert lines, caplog.text
    assert "block_size: 32 != 16" in lines[0] and "dtype" in lines[0]


def _garbage_connection(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        wire.recv_frame(sock)  # the challenge
        sock.sendall(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
        with pytest.raises((wire.WireError, OSError)):
            # The server drops us; at most an error frame comes first.
            while True:
                wire.recv_frame(sock)


def _unauthenticated_read(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        wire.recv_frame(sock)
        wire.send_frame(sock, {"op": "read", "req": "big", "blocks": [0]})
        reply = wire.recv_frame(sock)
        assert reply["op"] == "error" and reply["code"] == wire.ERR_MALFORMED


def test_bad_requests_are_refused_while_a_concurrent_transfer_finishes() -> None:
    # ~48 MiB in flight so the bad connections overlap the transfer.
    src = vllm_like_cpu_cache(num_layers=4, num_blocks=1536, head_size=64, seed=3)
    dst = vllm_like_cpu_cache(num_layers=4, num_blocks=1536, head_size=64, fill="zeros")
    big_remote = list(range(0, 1536, 2))[:700]
    big_local = list(range(1535, 0, -2))[:700]
    with running_server(src) as ends:
        ends.leases.add("big", big_remote, far_future())
        ends.leases.add("small", [1, 3, 5], far_future())
        result: dict[str, object] = {}

        def big_pull() -> None:
            client = ends.client()
            try:
                result["nbytes"] = client.pull(
                    ends.address, "big", big_remote, KVCacheAccess(dst), big_local
                )
            except Exception as exc:
                result["error"] = exc
            finally:
                client.close()

        transfer = threading.Thread(target=big_pull)
        transfer.start()
        bad = ends.client()
        scratch = KVCacheAccess(vllm_like_cpu_cache(4, 1536, head_size=64, fill="zeros"))
        cases = {
            wire.ERR_UNKNOWN_REQUEST: ("nobody", [1]),
            wire.ERR_OUT_OF_RANGE: ("small", [1536]),
            wire.ERR_UNOWNED: ("small", [2]),  # held by "big", not by "small"
        }
        for code, (request_id, blocks) in cases.items():
            with pytest.raises(wire.RemoteError) as info:
                bad.pull(ends.address, request_id, blocks, scratch, [0] * len(blocks))
            assert info.value.code == code
        with pytest.raises(wire.RemoteError) as negative:
            bad.pull(ends.address, "small", [-1], scratch, [0])
        assert negative.value.code == wire.ERR_OUT_OF_RANGE
        _garbage_connection(ends.address)
        _unauthenticated_read(ends.address)
        # The refused connection for "small" stays usable and the lease is intact.
        assert bad.pull(ends.address, "small", [1, 3], scratch, [10, 11]) > 0
        bad.close()
        transfer.join(timeout=60)
        assert "error" not in result, result
    assert blocks_equal(src, big_remote, dst, big_local)
    assert len(ends.refusals) >= 5


def test_unknown_request_waits_briefly_for_a_late_lease() -> None:
    """The prefill worker learns of a hold one engine step after the request finished."""
    src = vllm_like_cpu_cache()
    dst = vllm_like_cpu_cache(fill="zeros")
    with running_server(src, unknown_request_wait_s=3.0) as ends:
        timer = threading.Timer(0.3, ends.leases.add, args=("late", [4, 5], far_future()))
        timer.start()
        client = ends.client()
        client.pull(ends.address, "late", [4, 5], KVCacheAccess(dst), [6, 7])
        client.close()
        timer.join()
    assert blocks_equal(src, [4, 5], dst, [6, 7])


def test_released_request_cannot_be_read_again() -> None:
    src = vllm_like_cpu_cache()
    dst = KVCacheAccess(vllm_like_cpu_cache(fill="zeros"))
    with running_server(src) as ends:
        ends.leases.add("once", [1], far_future())
        client = ends.client()
        client.pull(ends.address, "once", [1], dst, [1])
        with pytest.raises(wire.RemoteError) as info:
            client.pull(ends.address, "once", [1], dst, [1])
        client.close()
    assert info.value.code == wire.ERR_UNKNOWN_REQUEST


def test_dead_server_fails_fast() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = vllm_like_cpu_cache()
    client = BlockClient(ClientSettings(secret=SECRET, connect_timeout_s=1.0), fingerprint_for(src))
    started = time.monotonic()
    with pytest.raises(wire.WireError, match="cannot connect"):
        client.pull(("127.0.0.1", port), "r", [1], KVCacheAccess(src), [1])
    assert time.monotonic() - started < 5


def test_silent_connection_is_dropped_without_blocking_others() -> None:
    src = vllm_like_cpu_cache()
    dst = vllm_like_cpu_cache(fill="zeros")
    with running_server(src) as ends:
        ends.leases.add("r", [2], far_future())
        silent = socket.create_connection(ends.address, timeout=10)
        client = ends.client()
        client.pull(ends.address, "r", [2], KVCacheAccess(dst), [3])
        client.close()
        # The server gives up on the silent peer after its handshake timeout (2 s here).
        started = time.monotonic()
        wire.recv_frame(silent)  # the challenge
        with pytest.raises((wire.WireError, OSError)):
            while True:
                wire.recv_frame(silent)
        assert time.monotonic() - started < 8
        silent.close()
    assert blocks_equal(src, [2], dst, [3])


# -- control connections, renewals and hold tokens ------------------------------------------------


def test_control_connection_renews_and_releases_but_cannot_read() -> None:
    clock = ManualClock(now=time.time())
    table = LeaseTable(clock=clock)
    src = vllm_like_cpu_cache()
    with running_server(src, leases=table, unknown_request_wait_s=0.0) as ends:
        table.add("held", [1, 2], expires_at=clock() + 1)
        table.add("done", [3], expires_at=clock() + 1)
        table.release("done")
        control = ends.control_client()
        states = control.renew(ends.address, ["held", "unknown", "done"], 50.0)
        assert states == ["held", "pending", "gone"]
        clock.advance(40)  # past the hold's own expiry, within the renewal
        assert table.reap_expired() == []
        # The pending renewal is applied when the hold arrives.
        table.add("unknown", [4], expires_at=clock() + 1)
        clock.advance(5)
        assert table.reap_expired() == []
        assert control.release(ends.address, "held") is True
        assert ("held", EndReason.RELEASED) in table.drain_done()
        assert control.release(ends.address, "never-held") is False
        control.close()
        # The control handshake needs no KV fingerprint, and grants no reads.
        conn = BlockConnection(ends.address, ClientSettings(secret=SECRET), None)
        assert conn.remote_engine_id == ENGINE_ID
        dst = KVCacheAccess(vllm_like_cpu_cache(fill="zeros"))
        with pytest.raises(wire.RemoteError) as info:
            conn.read_blocks("unknown", [4], dst, [4], hold_token=hold_token("unknown"))
        assert info.value.code == wire.ERR_MALFORMED
        with pytest.raises(wire.WireError):
            wire.recv_frame(conn.sock)  # and the connection is closed
        conn.sock.close()
        assert len(table) == 1  # "unknown" is untouched by the refused read
        # The same client secret with a wrong one is refused as on a data connection.
        bad = ends.control_client(secret=b"wrong")
        with pytest.raises(wire.RemoteError) as auth:
            bad.renew(ends.address, ["unknown"], 5.0)
        assert auth.value.code == wire.ERR_AUTH
        bad.close()


def test_unknown_connection_mode_is_refused() -> None:
    src = vllm_like_cpu_cache()
    with running_server(src) as ends, socket.create_connection(ends.address, timeout=5) as sock:
        challenge = wire.recv_frame(sock)
        wire.send_frame(sock, {**client_hello(challenge["nonce"], None), "mode": "admin"})
        reply = wire.recv_frame(sock)
        assert reply["op"] == "error" and reply["code"] == wire.ERR_MALFORMED


def _send_raw_renew(address: tuple[str, int], message: dict[str, object]) -> None:
    """Send one renew frame on a fresh control connection; the server must hang up."""
    conn = BlockConnection(address, ClientSettings(secret=SECRET, io_timeout_s=5.0), None)
    try:
        wire.send_frame(conn.sock, {"op": "renew", **message})
        with pytest.raises(wire.WireError):
            wire.recv_frame(conn.sock)
    finally:
        conn.sock.close()


class SignallingLeases(LeaseTable):
    """Sets ``acquiring`` when a read starts waiting for its lease."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self.acquiring = threading.Event()

    def acquire(self, request_id: str, block_ids: Sequence[int], wait_s: float) -> Lease:
        self.acquiring.set()
        return super().acquire(request_id, block_ids, wait_s)


MALFORMED_RENEWALS: list[dict[str, object]] = [
    {"reqs": ["a", "b", "c", "d", "e"], "extend_s": 5.0},  # more than the frame bound (4)
    {"reqs": ["other"], "extend_s": 0},
    {"reqs": ["other"], "extend_s": -5.0},
    {"reqs": ["other"], "extend_s": 3601.0},
    {"reqs": ["other"], "extend_s": float("inf")},
    {"reqs": ["other"], "extend_s": float("nan")},
    {"reqs": ["other"], "extend_s": True},
    {"reqs": ["other"], "extend_s": "5"},
    {"reqs": ["other"]},
    {"reqs": "other", "extend_s": 5.0},
    {"reqs": ["other", 7], "extend_s": 5.0},
]


def test_malformed_renew_closes_its_connection_while_a_pull_completes() -> None:
    src = vllm_like_cpu_cache(seed=4)
    dst = vllm_like_cpu_cache(fill="zeros")
    clock = ManualClock(now=time.time())
    table = SignallingLeases(clock=clock)
    with running_server(src, leases=table, max_renewals_per_frame=4) as ends:
        table.add("other", [9], expires_at=clock() + 1)
        result: dict[str, object] = {}

        def pull() -> None:
            client = ends.client()
            try:
                result["nbytes"] = client.pull(
                    ends.address,
                    "big",
                    [1, 2, 3],
                    KVCacheAccess(dst),
                    [4, 5, 6],
                    hold_token=hold_token("big"),
                )
            except Exception as exc:
                result["error"] = exc
            finally:
                client.close()

        transfer = threading.Thread(target=pull)
        transfer.start()
        # Forced overlap: the pull's connection waits at the lease table for its hold while
        # every malformed renewal arrives on a connection of its own.
        assert table.acquiring.wait(timeout=10)
        for message in MALFORMED_RENEWALS:
            _send_raw_renew(ends.address, message)
        assert transfer.is_alive(), result
        table.add("big", [1, 2, 3], far_future())
        transfer.join(timeout=30)
        assert "error" not in result, result
        # The malformed frames changed nothing: "other" still ends at its own expiry.
        clock.advance(2)
        assert table.reap_expired() == ["other"]
        # The server still answers well-formed renewals (at the bounds) on a new connection.
        control = ends.control_client()
        assert control.renew(ends.address, ["a", "b", "c", "d"], 3600.0) == ["pending"] * 4
        control.close()
    assert blocks_equal(src, [1, 2, 3], dst, [4, 5, 6])


def test_read_with_a_hold_token_waits_for_a_hold_registered_after_it() -> None:
    """The core race: the prefill's answer (and the decode's read) is faster than the next
    prefill engine step, which registers the hold."""
    src = vllm_like_cpu_cache(seed=6)
    dst = vllm_like_cpu_cache(fill="zeros")
    table = SignallingLeases()
    with running_server(
        src, leases=table, unknown_request_wait_s=0.0, pending_hold_wait_s=30.0
    ) as ends:
        result: dict[str, object] = {}

        def pull() -> None:
            client = ends.client()
            try:
                result["nbytes"] = client.pull(
                    ends.address,
                    "early",
                    [4, 5],
                    KVCacheAccess(dst),
                    [6, 7],
                    hold_token=hold_token("early"),
                )
            except Exception as exc:
                result["error"] = exc
            finally:
                client.close()

        reader = threading.Thread(target=pull)
        reader.start()
        # Forced order: the read is at the lease table before the hold exists.
        assert table.acquiring.wait(timeout=10)
        reader.join(timeout=0.2)
        assert reader.is_alive(), result
        assert len(table) == 0
        table.add("early", [4, 5], far_future())
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert "error" not in result, result
        # The server finishes its bookkeeping just after the last byte left.
        assert wait_until(lambda: len(ends.transfers) == 1, 5)
        assert result["nbytes"] == ends.transfers[0][0]
        # The read released the lease.
        assert wait_until(lambda: len(table) == 0, 5)
        assert table.drain_done() == [("early", EndReason.RELEASED)]
    assert blocks_equal(src, [4, 5], dst, [6, 7])


@pytest.mark.parametrize(
    "token",
    [
        "",
        hold_token("other-request"),
        hold_token("early", secret=b"other-secret"),
        hold_token("early", engine_id="other-engine"),
        "0" * 64,
    ],
    ids=["none", "other-request", "other-secret", "other-engine", "forged"],
)
def test_read_without_a_valid_hold_token_is_refused_at_once(token: str) -> None:
    src = vllm_like_cpu_cache()
    dst = KVCacheAccess(vllm_like_cpu_cache(fill="zeros"))
    with running_server(src, unknown_request_wait_s=0.0, pending_hold_wait_s=30.0) as ends:
        client = ends.client()
        started = time.monotonic()
        with pytest.raises(wire.RemoteError) as info:
            client.pull(ends.address, "early", [4, 5], dst, [6, 7], hold_token=token)
        assert info.value.code == wire.ERR_UNKNOWN_REQUEST
        assert time.monotonic() - started < 5  # not the 30 s wait for an issued hold
        # The connection stays usable for the next read.
        ends.leases.add("ok", [1], far_future())
        assert client.pull(ends.address, "ok", [1], dst, [1]) > 0
        client.close()
        assert ends.refusals


def test_read_with_a_valid_hold_token_for_an_ended_lease_is_refused_at_once() -> None:
    src = vllm_like_cpu_cache()
    dst = KVCacheAccess(vllm_like_cpu_cache(fill="zeros"))
    with running_server(src, pending_hold_wait_s=30.0) as ends:
        ends.leases.add("once", [1], far_future())
        ends.leases.release("once")
        client = ends.client()
        started = time.monotonic()
        with pytest.raises(wire.RemoteError) as info:
            client.pull(ends.address, "once", [1], dst, [1], hold_token=hold_token("once"))
        client.close()
        assert info.value.code == wire.ERR_UNKNOWN_REQUEST
        assert time.monotonic() - started < 5


def test_read_with_a_non_ascii_hold_token_is_refused_cleanly() -> None:
    """The hold token comes from a request's kv_transfer_params: whatever string it is, the
    read is refused with unknown_request and the connection stays usable (a TypeError in
    the token check would drop the connection as an unexpected server failure)."""
    src = vllm_like_cpu_cache()
    dst = KVCacheAccess(vllm_like_cpu_cache(fill="zeros"))
    with running_server(src, unknown_request_wait_s=0.0) as ends:
        ends.leases.add("ok", [1], far_future())
        client = ends.client()
        with pytest.raises(wire.RemoteError) as info:
            client.pull(ends.address, "early", [4], dst, [6], hold_token="é" * 64)
        assert info.value.code == wire.ERR_UNKNOWN_REQUEST
        assert client.pull(ends.address, "ok", [1], dst, [1]) > 0
        client.close()
