"""Wire framing and vectored block I/O, over real socket pairs."""

from __future__ import annotations

import socket
import struct
import threading

import msgpack
import pytest

from kv_transfer import wire


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


def test_fingerprint_differences_name_the_fields() -> None:
    ours = wire.KVFingerprint("m", "torch.bfloat16", 32, "LBHNC", 2, (2, 32, 64))
    theirs = wire.KVFingerprint("m", "torch.float32", 16, "LBHNC", 2, (2, 16, 64))
    diffs = ours.differences(theirs)
    assert any(d.startswith("dtype:") for d in diffs)
    assert any(d.startswith("block_size:") for d in diffs)
    assert wire.KVFingerprint.from_wire(ours.to_wire()) == ours
