"""Wire framing and vectored block I/O, over real socket pairs."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import msgpack
import pytest

from kv_transfer import wire
from kv_transfer.block_client import BlockConnection, ClientSettings


def test_frame_roundtrip_preserves_types() -> None:
    a, b = socket.socketpair()
    with a, b:
        message = {"op": "read", "req": "r-1", "blocks": [0, 7, 2**31], "nonce": b"\x00\xff"}
        wire.send_frame(a, message)
        assert wire.recv_frame(b) == message


def test_oversized_frame_header_is_refused_before_reading_body() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", wire.MAX_FRAME_BYTES + 1))
        with pytest.raises(wire.WireError, match="exceeds"):
            wire.recv_frame(b)


def test_frame_cap_is_per_call() -> None:
    """A caller (the block server before a peer authenticated) may allow far less."""
    a, b = socket.socketpair()
    with a, b:
        wire.send_frame(a, {"op": "hello", "pad": b"x" * 100})
        assert wire.recv_frame(b, max_bytes=200)["op"] == "hello"
        a.sendall(struct.pack(">I", wire.MAX_HANDSHAKE_FRAME_BYTES + 1))
        with pytest.raises(wire.WireError, match=f"exceeds {wire.MAX_HANDSHAKE_FRAME_BYTES}"):
            wire.recv_frame(b, max_bytes=wire.MAX_HANDSHAKE_FRAME_BYTES)
    assert wire.MAX_HANDSHAKE_FRAME_BYTES <= 4096 < wire.MAX_FRAME_BYTES


@pytest.mark.parametrize(
    "body",
    [b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"no_op": 1})],
    ids=["undecodable", "not-a-map", "no-op-key"],
)
def test_malformed_frames_raise_wire_error(body: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", len(body)) + body)
        with pytest.raises(wire.WireError):
            wire.recv_frame(b)


def test_truncated_frame_raises_wire_error() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(struct.pack(">I", 100) + b"x" * 10)
        a.close()
        with pytest.raises(wire.WireError, match="closed"):
            wire.recv_frame(b)


def test_error_frame_becomes_remote_error() -> None:
    with pytest.raises(wire.RemoteError) as info:
        wire.expect(wire.error_frame(wire.ERR_UNOWNED, "nope"), "data")
    assert info.value.code == wire.ERR_UNOWNED


def test_vectored_send_and_receive_more_buffers_than_iov_max() -> None:
    # 3000 scattered buffers of odd sizes: exercises IOV_MAX batching and partial writes.
    sizes = [(i * 7919) % 5000 + 1 for i in range(3000)]
    payload = bytes((i * 31) % 251 for i in range(sum(sizes)))
    src, offset = [], 0
    for n in sizes:
        src.append(memoryview(payload)[offset : offset + n])
        offset += n
    dst_store = bytearray(sum(sizes))
    dst, offset = [], 0
    for n in sizes:
        dst.append(memoryview(dst_store)[offset : offset + n])
        offset += n
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sender = threading.Thread(target=wire.send_buffers, args=(a, src))
        sender.start()
        assert wire.recv_buffers(b, dst) == len(payload)
        sender.join()
    assert bytes(dst_store) == payload


def test_recv_buffers_reports_short_stream() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(b"x" * 10)
        a.close()
        dst = bytearray(20)
        with pytest.raises(wire.WireError, match="cut short: 10 of 20"):
            wire.recv_buffers(b, [memoryview(dst)[:5], memoryview(dst)[5:]])


def test_recv_frame_deadline_bounds_a_frame_trickled_in() -> None:
    """Each byte comes well within the socket's timeout; the deadline still ends the wait."""
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        for byte in wire.encode_frame({"op": "hello", "pad": b"x" * 100}):
            if stop.wait(0.05):
                return
            a.sendall(bytes([byte]))

    sender = threading.Thread(target=trickle)
    with a, b:
        wire.set_timeout(b, 5.0)
        sender.start()
        started = time.monotonic()
        with pytest.raises(wire.WireError, match="timed out"):
            wire.recv_frame(b, deadline=started + 0.5)
        assert time.monotonic() - started < 2.0
        stop.set()
        sender.join(timeout=5)


_GOOD_FINGERPRINT = wire.KVFingerprint("m", "d", 16, "L", 2, (2, 16, 64)).to_wire()


@pytest.mark.parametrize(
    "data",
    [
        [1, 2],
        "abc",
        7,
        b"model",
        {"model": "m"},
        {**_GOOD_FINGERPRINT, "block_shape": 3},
        {**_GOOD_FINGERPRINT, "block_size": float("inf")},
    ],
    ids=["list", "str", "int", "bytes", "missing-fields", "shape-not-a-list", "infinite"],
)
def test_fingerprint_from_any_peer_value_is_a_wire_error(data: Any) -> None:
    """A hello's fingerprint is whatever msgpack value the peer sent."""
    with pytest.raises(wire.WireError, match="malformed KV fingerprint"):
        wire.KVFingerprint.from_wire(data)


def test_fingerprint_differences_name_the_fields() -> None:
    ours = wire.KVFingerprint("m", "torch.bfloat16", 32, "LBHNC", 2, (2, 32, 64))
    theirs = wire.KVFingerprint("m", "torch.float32", 16, "LBHNC", 2, (2, 16, 64))
    diffs = ours.differences(theirs)
    assert any(d.startswith("dtype:") for d in diffs)
    assert any(d.startswith("block_size:") for d in diffs)
    assert wire.KVFingerprint.from_wire(ours.to_wire()) == ours


def _hello_sent_by(fingerprint: wire.KVFingerprint | None) -> dict[str, object]:
    """Run a client handshake against a minimal server; return the hello it sent."""
    secret = b"s"
    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                server_nonce = wire.new_nonce()
                wire.send_frame(
                    conn, {"op": "challenge", "v": 1, "nonce": server_nonce, "engine_id": "p"}
                )
                hello = wire.recv_frame(conn)
                seen.update(hello)
                mac = wire.server_mac(secret, server_nonce, hello["nonce"])
                wire.send_frame(conn, {"op": "welcome", "mac": mac, "fingerprint": {}})
                wire.recv_frame(conn)  # bye

        server = threading.Thread(target=serve)
        server.start()
        client = BlockConnection(listener.getsockname(), ClientSettings(secret=secret), fingerprint)
        assert client.remote_engine_id == "p"
        client.close()
        server.join(timeout=10)
    return seen


def test_control_hello_names_its_mode_and_data_hello_its_fingerprint() -> None:
    fingerprint = wire.KVFingerprint("m", "torch.float32", 16, "LBHNC", 2, (2, 16, 64))
    control = _hello_sent_by(None)
    assert control["mode"] == wire.MODE_CONTROL and "fingerprint" not in control
    data = _hello_sent_by(fingerprint)
    # A data hello looks as it did before control connections existed (older servers).
    assert "mode" not in data
    assert data["fingerprint"] == fingerprint.to_wire()
    assert wire.MODE_DATA != wire.MODE_CONTROL


def test_renew_frame_roundtrip_keeps_float_and_id_list() -> None:
    a, b = socket.socketpair()
    with a, b:
        message = {"op": "renew", "reqs": ["r-1", "r-2"], "extend_s": 0.5}
        wire.send_frame(a, message)
        got = wire.recv_frame(b)
        assert got == message and isinstance(got["extend_s"], float)
