"""The transfer wire format: msgpack control frames plus raw block bytes.

A connection starts with an authenticated handshake (HMAC-SHA256 over both
sides' nonces with the shared secret) that also compares the two engines' KV
fingerprints. Then the client sends ``read`` and ``release`` requests; a
``read`` is answered by a ``data`` frame announcing the byte count, followed by
that many raw bytes: for each layer, the requested blocks in request order.

Control frame: 4-byte big-endian length, then a msgpack map with an ``op`` key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024  # a control frame; 16 MiB holds ~2M block ids
# The most a peer may send before it has authenticated: its hello (nonce, MAC, KV
# fingerprint) is a few hundred bytes. An unauthenticated peer cannot make the server
# allocate, or wait for, more than this.
MAX_HANDSHAKE_FRAME_BYTES = 4 * 1024
NONCE_BYTES = 32
# Linux caps one sendmsg/recvmsg at IOV_MAX (1024) buffers.
IOV_MAX = 1024
_LEN = struct.Struct(">I")


class WireError(Exception):
    """The peer broke the protocol or the connection failed."""


class RemoteError(Exception):
    """The peer answered a request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# Connection modes, chosen by the client's hello: a data connection (a decode worker, with a
# KV fingerprint) may read blocks; a control connection (a decode engine's scheduler) may
# only renew and release leases.
MODE_DATA = "data"
MODE_CONTROL = "control"

# The most leases one ``renew`` frame may name.
MAX_RENEWALS_PER_FRAME = 4096

# Error codes sent in ``error`` frames.
ERR_AUTH = "auth_failed"
ERR_HANDSHAKE = "handshake_mismatch"
ERR_VERSION = "version_mismatch"
ERR_MALFORMED = "malformed"
ERR_UNKNOWN_REQUEST = "unknown_request"
ERR_OUT_OF_RANGE = "block_out_of_range"
ERR_UNOWNED = "block_not_owned"
ERR_INTERNAL = "internal"


@dataclass(frozen=True)
class KVFingerprint:
    """What must match for raw block bytes to mean the same on both sides."""

    model: str
    dtype: str
    block_size: int
    layout: str
    num_layers: int
    block_shape: tuple[int, ...]  # one layer's block, e.g. (heads, block_size, 2*head_size)
    tp_size: int = 1
    tp_rank: int = 0

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        data["block_shape"] = list(self.block_shape)
        return data

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> KVFingerprint:
        # ``data`` comes from a peer's hello: it may be any msgpack value.
        if not isinstance(data, Mapping):
            raise WireError(f"malformed KV fingerprint: a {type(data).__name__}, not a map")
        try:
            return cls(
                model=str(data["model"]),
                dtype=str(data["dtype"]),
                block_size=int(data["block_size"]),
                layout=str(data["layout"]),
                num_layers=int(data["num_layers"]),
                block_shape=tuple(int(x) for x in data["block_shape"]),
                tp_size=int(data.get("tp_size", 1)),
                tp_rank=int(data.get("tp_rank", 0)),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(inf) overflows
            raise WireError(f"malformed KV fingerprint {dict(data)!r}: {exc}") from exc

    def differences(self, other: KVFingerprint) -> list[str]:
        """Human-readable ``field: ours != theirs`` for every mismatched field."""
        ours, theirs = asdict(self), asdict(other)
        return [f"{k}: {ours[k]!r} != {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def client_mac(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(
        secret, b"pdserve-kv/1 client" + server_nonce + client_nonce, hashlib.sha256
    ).digest()


def server_mac(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(
        secret, b"pdserve-kv/1 server" + client_nonce + server_nonce, hashlib.sha256
    ).digest()


def macs_equal(a: object, b: bytes) -> bool:
    return isinstance(a, bytes) and hmac.compare_digest(a, b)


# -- control frames ---------------------------------------------------------------------------


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"control frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LEN.pack(len(body)) + body


def send_frame(sock: socket.socket, message: Mapping[str, Any]) -> None:
    try:
        sock.sendall(encode_frame(message))
    except OSError as exc:
        raise WireError(f"send failed: {_describe(exc)}") from exc


def recv_exact(sock: socket.socket, nbytes: int, deadline: float | None = None) -> bytearray:
    buf = bytearray(nbytes)
    recv_into_exact(sock, memoryview(buf), deadline)
    return buf


def _describe(exc: OSError) -> str:
    # A kernel SO_RCVTIMEO/SO_SNDTIMEO expiry surfaces as EAGAIN.
    if isinstance(exc, TimeoutError | BlockingIOError):
        return "timed out"
    return str(exc)


def recv_into_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` completely from ``sock`` or raise WireError.

    The socket's receive timeout bounds each wait for more bytes; a ``deadline``
    (``time.monotonic()``) bounds them all, however slowly the bytes trickle in.
    """
    got, total = 0, view.nbytes
    try:
        while got < total:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WireError(f"receive timed out after {got} of {total} bytes")
                set_timeout(sock, max(remaining, 1e-3))  # a zero timeout would mean none
            # MSG_WAITALL: the kernel fills the buffer in one call on a blocking socket.
            n = sock.recv_into(view[got:], total - got, socket.MSG_WAITALL)
            if n == 0:
                raise WireError(f"connection closed after {got} of {total} bytes")
            got += n
    except OSError as exc:
        raise WireError(f"receive failed after {got} of {total} bytes: {_describe(exc)}") from exc


def decode_frame_body(body: bytes | bytearray) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(f"undecodable control frame: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise WireError(f"control frame is not a map with an 'op': {message!r:.200}")
    return message


def recv_frame(
    sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES, deadline: float | None = None
) -> dict[str, Any]:
    """Receive one control frame; a header announcing more than ``max_bytes`` is refused
    before any of the body is read (or buffered). With a ``deadline`` the whole frame must
    have arrived by then."""
    (length,) = _LEN.unpack(recv_exact(sock, _LEN.size, deadline))
    if length > max_bytes:
        raise WireError(f"control frame of {length} bytes exceeds {max_bytes}")
    return decode_frame_body(recv_exact(sock, length, deadline))


def expect(message: Mapping[str, Any], op: str) -> Mapping[str, Any]:
    """Return ``message`` if its op is ``op``; raise RemoteError for error frames."""
    if message["op"] == "error":
        raise RemoteError(str(message.get("code", "")), str(message.get("message", "")))
    if message["op"] != op:
        raise WireError(f"expected {op!r} frame, got {message['op']!r}")
    return message


def error_frame(code: str, message: str) -> dict[str, Any]:
    return {"op": "error", "code": code, "message": message}


# -- raw block bytes --------------------------------------------------------------------------


def send_buffers(sock: socket.socket, buffers: Sequence[memoryview]) -> int:
    """Send every byte of ``buffers`` in order with vectored writes; return the total.

    ``buffers`` must be flat byte memoryviews. No bytes are copied: a single
    sendmsg hands up to IOV_MAX separate block runs to the kernel.
    """
    pending = list(buffers)
    total = sum(b.nbytes for b in pending)
    i = 0
    try:
        while i < len(pending):
            if len(pending) - i == 1:
                sock.sendall(pending[i])
                break
            sent = sock.sendmsg(pending[i : i + IOV_MAX])
            while sent > 0:
                head = pending[i]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    i += 1
                else:
                    pending[i] = head[sent:]
                    sent = 0
    except OSError as exc:
        raise WireError(f"sending block data failed: {_describe(exc)}") from exc
    return total


def recv_buffers(sock: socket.socket, buffers: Sequence[memoryview]) -> int:
    """Fill ``buffers`` in order straight from the socket (vectored reads, no copies)."""
    # Skip empty buffers so a zero-byte read always means the peer closed.
    pending = [b for b in buffers if b.nbytes]
    total = sum(b.nbytes for b in pending)
    got = 0
    i = 0
    try:
        while i < len(pending):
            if len(pending) - i == 1:
                try:
                    recv_into_exact(sock, pending[i])
                except WireError as exc:
                    raise WireError(
                        f"block data cut short: {got} of {total} bytes arrived "
                        f"before the last run failed: {exc}"
                    ) from exc
                got += pending[i].nbytes
                break
            n = sock.recvmsg_into(pending[i : i + IOV_MAX], 0, socket.MSG_WAITALL)[0]
            if n == 0:
                raise WireError(f"connection closed after {got} of {total} block bytes")
            got += n
            while n > 0:
                head = pending[i]
                if n >= head.nbytes:
                    n -= head.nbytes
                    i += 1
                else:
                    pending[i] = head[n:]
                    n = 0
    except OSError as exc:
        raise WireError(
            f"receiving block data failed after {got} of {total}: {_describe(exc)}"
        ) from exc
    return total


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound every blocking send/recv on ``sock`` by ``seconds``, in the kernel.

    Python's own socket timeout makes the socket non-blocking and polls before
    every call; kernel timeouts keep it blocking, so MSG_WAITALL receives and
    sendall run as few, large system calls.
    """
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def tune_socket(sock: socket.socket, buffer_bytes: int) -> None:
    """Small control messages must not wait for Nagle; big buffers keep loopback at ~3 GB/s."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
