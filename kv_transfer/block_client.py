"""Decode-side block client: pulls a request's blocks into the local KV cache.

Authenticated connections are pooled per prefill endpoint so a pull costs one
round trip plus the bytes. Any error closes the connection it happened on;
the caller decides what a failed pull means (vLLM's kv_load_failure_policy).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from kv_transfer import wire

if TYPE_CHECKING:  # a control-only client (the proxy's) must not import torch
    from kv_transfer.device import KVCacheAccess

logger = logging.getLogger(__name__)

Endpoint = tuple[str, int]
T = TypeVar("T")


@dataclass(frozen=True)
class ClientSettings:
    secret: bytes
    connect_timeout_s: float = 5.0
    io_timeout_s: float = 30.0
    socket_buffer_bytes: int = 4 * 1024 * 1024
    max_idle_per_endpoint: int = 4


class NoBytesReceived(wire.WireError):
    """The read failed before any block byte arrived, so retrying is safe."""


class BlockConnection:
    """One authenticated connection to a block server.

    With a KV fingerprint it is a data connection (reads blocks); without one it is a control
    connection, which may only renew and release leases.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        settings: ClientSettings,
        fingerprint: wire.KVFingerprint | None,
    ) -> None:
        self.endpoint = endpoint
        self._settings = settings
        host, port = endpoint
        try:
            sock = socket.create_connection((host, port), timeout=settings.connect_timeout_s)
        except OSError as exc:
            raise wire.WireError(f"cannot connect to KV server {host}:{port}: {exc}") from exc
        self.sock = sock
        # The server's bound on leases per renew frame (it says so in its welcome).
        self.max_renewals = wire.MAX_RENEWALS_PER_FRAME
        try:
            wire.tune_socket(sock, settings.socket_buffer_bytes)
            wire.set_timeout(sock, settings.io_timeout_s)
            self.remote_engine_id = self._handshake(fingerprint)
        except BaseException:
            sock.close()
            raise

    def _handshake(self, fingerprint: wire.KVFingerprint | None) -> str:
        challenge = wire.expect(wire.recv_frame(self.sock), "challenge")
        server_nonce = challenge.get("nonce")
        if not isinstance(server_nonce, bytes):
            raise wire.WireError("server challenge carries no nonce")
        client_nonce = wire.new_nonce()
        hello: dict[str, object] = {
            "op": "hello",
            "v": wire.PROTOCOL_VERSION,
            "nonce": client_nonce,
            "mac": wire.client_mac(self._settings.secret, server_nonce, client_nonce),
        }
        if fingerprint is None:
            hello["mode"] = wire.MODE_CONTROL
        else:
            hello["fingerprint"] = fingerprint.to_wire()
        wire.send_frame(self.sock, hello)
        welcome = wire.expect(wire.recv_frame(self.sock), "welcome")
        limit = welcome.get("max_renewals")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            self.max_renewals = limit
        expected = wire.server_mac(self._settings.secret, server_nonce, client_nonce)
        if not wire.macs_equal(welcome.get("mac"), expected):
            raise wire.RemoteError(wire.ERR_AUTH, "server failed to prove the shared secret")
        return str(challenge.get("engine_id", ""))

    def read_blocks(
        self,
        request_id: str,
        remote_block_ids: Sequence[int],
        cache: KVCacheAccess,
        local_block_ids: Sequence[int],
        *,
        release: bool = False,
        hold_token: str = "",
    ) -> int:
        """Read ``remote_block_ids`` of ``request_id`` into ``local_block_ids``; return bytes.

        With ``release`` the server frees the blocks once it has sent them, which
        saves the separate release round trip. ``hold_token`` (from the prefill's
        kv_transfer_params) lets the server wait for a hold it has not registered yet.
        """
        if len(remote_block_ids) != len(local_block_ids):
            raise ValueError(
                f"{len(remote_block_ids)} remote blocks for {len(local_block_ids)} local blocks"
            )
        try:
            wire.send_frame(
                self.sock,
                {
                    "op": "read",
                    "req": request_id,
                    "blocks": list(remote_block_ids),
                    "release": release,
                    "hold": hold_token,
                },
            )
            header = wire.expect(wire.recv_frame(self.sock), "data")
        except wire.WireError as exc:
            raise NoBytesReceived(str(exc)) from exc
        expected = cache.request_nbytes(len(local_block_ids))
        if header.get("nbytes") != expected:
            raise wire.WireError(
                f"server announced {header.get('nbytes')} bytes, expected {expected}"
            )
        views = cache.request_recv_views(local_block_ids)
        if views is not None:
            wire.recv_buffers(self.sock, views)
            return expected
        for layer in range(cache.num_layers):
            wire.recv_buffers(self.sock, cache.recv_views(layer, local_block_ids))
            cache.commit_recv(layer, local_block_ids)
        return expected

    def release(self, request_id: str) -> bool:
        wire.send_frame(self.sock, {"op": "release", "req": request_id})
        reply = wire.expect(wire.recv_frame(self.sock), "released")
        return bool(reply.get("known"))

    def renew(self, request_ids: Sequence[str], extend_s: float) -> list[str]:
        """Extend the leases of ``request_ids``; the server's state for each (LeaseState)."""
        states: list[str] = []
        step = self.max_renewals
        for first in range(0, len(request_ids), step):
            chunk = list(request_ids[first : first + step])
            wire.send_frame(self.sock, {"op": "renew", "reqs": chunk, "extend_s": extend_s})
            reply = wire.expect(wire.recv_frame(self.sock), "renewed")
            answered = reply.get("states")
            if not isinstance(answered, list) or len(answered) != len(chunk):
                raise wire.WireError(f"renew answered {answered!r:.200} for {len(chunk)} leases")
            states += [str(state) for state in answered]
        return states

    def close(self) -> None:
        with contextlib.suppress(wire.WireError):
            wire.send_frame(self.sock, {"op": "bye"})
        self.sock.close()


class BlockClient:
    """Thread-safe pool of connections, one checkout per concurrent pull or control call."""

    def __init__(self, settings: ClientSettings, fingerprint: wire.KVFingerprint | None) -> None:
        """``fingerprint`` None makes a control-only client (renew and release, no reads)."""
        self._settings = settings
        self._fingerprint = fingerprint
        self._idle: dict[Endpoint, list[BlockConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _checkout(self, endpoint: Endpoint) -> tuple[BlockConnection, bool]:
        """A connection to ``endpoint`` and whether it came from the idle pool."""
        with self._lock:
            idle = self._idle.get(endpoint)
            if idle:
                return idle.pop(), True
        return BlockConnection(endpoint, self._settings, self._fingerprint), False

    def _checkin(self, conn: BlockConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.endpoint, [])
            if not self._closed and len(idle) < self._settings.max_idle_per_endpoint:
                idle.append(conn)
                return
        conn.close()

    def pull(
        self,
        endpoint: Endpoint,
        request_id: str,
        remote_block_ids: Sequence[int],
        cache: KVCacheAccess,
        local_block_ids: Sequence[int],
        *,
        release: bool = True,
        hold_token: str = "",
    ) -> int:
        """Read the blocks; with ``release`` the server frees them once sent.

        Raises WireError / RemoteError on failure. A pooled connection that has
        gone stale (server restarted) is retried once on a fresh connection
        before any byte of the transfer has been received.
        """
        conn, pooled = self._checkout(endpoint)
        try:
            try:
                nbytes = conn.read_blocks(
                    request_id, remote_block_ids, cache, local_block_ids,
                    release=release, hold_token=hold_token,
                )  # fmt: skip
            except NoBytesReceived:
                if not pooled:
                    raise
                # The idle connection went stale (server closed or restarted it).
                conn.sock.close()
                conn = BlockConnection(endpoint, self._settings, self._fingerprint)
                nbytes = conn.read_blocks(
                    request_id, remote_block_ids, cache, local_block_ids,
                    release=release, hold_token=hold_token,
                )  # fmt: skip
        except wire.RemoteError:
            # An error frame after the handshake leaves the connection in sync; keep it.
            if conn.sock.fileno() >= 0:
                self._checkin(conn)
            raise
        except BaseException:
            conn.sock.close()
            raise
        self._checkin(conn)
        return nbytes

    def release(self, endpoint: Endpoint, request_id: str) -> bool:
        """Tell the server to free ``request_id``'s blocks without reading them."""
        return self._control(endpoint, lambda conn: conn.release(request_id))

    def renew(self, endpoint: Endpoint, request_ids: Sequence[str], extend_s: float) -> list[str]:
        """Extend the leases of ``request_ids`` by ``extend_s`` from now; their states."""
        return self._control(endpoint, lambda conn: conn.renew(request_ids, extend_s))

    def _control(self, endpoint: Endpoint, call: Callable[[BlockConnection], T]) -> T:
        """Run one small request/answer exchange, once more on a fresh connection if a
        pooled one turned out stale (the exchange is idempotent)."""
        conn, pooled = self._checkout(endpoint)
        try:
            try:
                result = call(conn)
            except wire.WireError:
                if not pooled:
                    raise
                conn.sock.close()
                conn = BlockConnection(endpoint, self._settings, self._fingerprint)
                result = call(conn)
        except wire.RemoteError:
            if conn.sock.fileno() >= 0:
                self._checkin(conn)
            raise
        except BaseException:
            conn.sock.close()
            raise
        self._checkin(conn)
        return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in connections:
            conn.close()
