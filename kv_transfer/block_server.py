"""Prefill-side block server: serves held requests' KV blocks to authenticated peers.

One thread accepts; each connection gets its own thread, so a slow, malformed
or hostile connection only ever affects itself. A peer must authenticate and
present a matching KV fingerprint before it may read; it may then read only
blocks held for the request it names. A control connection (a decode engine's
scheduler, which has no KV cache to fingerprint) authenticates the same way and
may only renew claims on leases and release them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kv_transfer import params, wire
from kv_transfer.device import KVCacheAccess
from kv_transfer.leases import LeaseError, LeaseTable

logger = logging.getLogger(__name__)

# Called with (nbytes, seconds) after each served read and () on each refused one.
TransferObserver = Callable[[int, float], None]


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    secret: bytes
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 600.0
    io_timeout_s: float = 30.0
    # A read for a request whose hold has not reached the lease table: how long to wait for it
    # when the read proves the hold was issued (a hold token), and when it does not.
    pending_hold_wait_s: float = 30.0
    unknown_request_wait_s: float = 0.0
    max_renewals_per_frame: int = wire.MAX_RENEWALS_PER_FRAME
    max_extend_s: float = params.MAX_LEASE_S
    socket_buffer_bytes: int = 4 * 1024 * 1024
    max_connections: int = 256


class InsecureServerError(ValueError):
    """The server was configured to accept remote peers without a shared secret."""


def is_loopback(host: str) -> bool:
    """True for addresses only this host can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name, "" or anything else may be reachable from elsewhere


class BlockServer:
    def __init__(
        self,
        settings: ServerSettings,
        fingerprint: wire.KVFingerprint,
        cache: KVCacheAccess,
        leases: LeaseTable,
        engine_id: str = "",
        on_transfer: TransferObserver | None = None,
        on_refusal: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._fingerprint = fingerprint
        self._cache = cache
        self._leases = leases
        self._engine_id = engine_id
        self._on_transfer = on_transfer
        self._on_refusal = on_refusal
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        """The bound port (useful when configured with port 0)."""
        assert self._listener is not None, "server not started"
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        """Listen; raises InsecureServerError (before binding) when the server would accept
        connections from other hosts without a shared secret."""
        if not self._settings.secret and not is_loopback(self._settings.host):
            raise InsecureServerError(
                f"KV block server: refusing to listen on {self._settings.host!r} without a "
                "shared secret: any host that reaches it could read KV blocks. Set "
                "$PDSERVE_KV_SECRET or $PDSERVE_KV_SECRET_FILE on every prefill and decode "
                "worker (pdserve worker --kv-secret-file), or bind to 127.0.0.1"
            )
        listener = socket.create_server(
            (self._settings.host, self._settings.port), reuse_port=False, backlog=128
        )
        listener.settimeout(0.5)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="kv-block-server", daemon=True
        )
        self._accept_thread.start()
        logger.info(
            "KV block server listening on %s:%d (engine %s)",
            self._settings.host,
            self.port,
            self._engine_id,
        )

    def stop(self) -> None:
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    # -- accept / per-connection ----------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("KV block server accept failed")
                time.sleep(0.1)
                continue
            with self._lock:
                if len(self._connections) >= self._settings.max_connections:
                    logger.warning("refusing KV connection from %s: too many connections", addr)
                    conn.close()
                    continue
                self._connections.add(conn)
            threading.Thread(
                target=self._serve_connection,
                args=(conn, addr),
                name=f"kv-conn-{addr[0]}:{addr[1]}",
                daemon=True,
            ).start()

    def _serve_connection(self, conn: socket.socket, addr: Any) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            wire.tune_socket(conn, self._settings.socket_buffer_bytes)
            wire.set_timeout(conn, self._settings.handshake_timeout_s)
            mode = self._handshake(conn, peer)
            if mode is None:
                return
            while not self._stopping.is_set():
                wire.set_timeout(conn, self._settings.idle_timeout_s)
                message = wire.recv_frame(conn)
                wire.set_timeout(conn, self._settings.io_timeout_s)
                op = message["op"]
                if op == "read" and mode == wire.MODE_DATA:
                    self._serve_read(conn, peer, message)
                elif op == "renew":
                    self._serve_renew(conn, message)
                elif op == "release":
                    self._serve_release(conn, message)
                elif op == "bye":
                    return
                else:
                    self._refuse(conn, peer, wire.ERR_MALFORMED, f"unknown op {op!r}")
                    return
        except wire.WireError as exc:
            if not self._stopping.is_set():
                logger.info("dropping KV connection from %s: %s", peer, exc)
        except OSError as exc:
            if not self._stopping.is_set():
                logger.info("KV connection from %s failed: %s", peer, exc)
        except Exception:
            logger.exception("KV connection from %s failed unexpectedly", peer)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket, peer: str) -> str | None:
        """The connection's mode once the peer is authenticated; None if refused."""
        # The whole handshake, not each wait for a byte: a peer trickling its hello in must
        # not hold a connection slot for longer than a silent one.
        deadline = time.monotonic() + self._settings.handshake_timeout_s
        server_nonce = wire.new_nonce()
        wire.send_frame(
            conn,
            {
                "op": "challenge",
                "v": wire.PROTOCOL_VERSION,
                "nonce": server_nonce,
                "engine_id": self._engine_id,
            },
        )
        # Nothing is authenticated yet: a peer may not make us read more than a hello needs.
        hello = wire.recv_frame(conn, max_bytes=wire.MAX_HANDSHAKE_FRAME_BYTES, deadline=deadline)
        if hello["op"] != "hello":
            self._refuse(conn, peer, wire.ERR_MALFORMED, f"expected hello, got {hello['op']!r}")
            return None
        if hello.get("v") != wire.PROTOCOL_VERSION:
            self._refuse(
                conn,
                peer,
                wire.ERR_VERSION,
                f"protocol version {hello.get('v')!r} != {wire.PROTOCOL_VERSION}",
            )
            return None
        client_nonce = hello.get("nonce")
        if not isinstance(client_nonce, bytes) or len(client_nonce) != wire.NONCE_BYTES:
            self._refuse(conn, peer, wire.ERR_MALFORMED, "missing or short client nonce")
            return None
        expected = wire.client_mac(self._settings.secret, server_nonce, client_nonce)
        if not wire.macs_equal(hello.get("mac"), expected):
            self._refuse(conn, peer, wire.ERR_AUTH, "authentication failed (wrong shared secret)")
            return None
        mode = hello.get("mode", wire.MODE_DATA)
        if mode not in (wire.MODE_DATA, wire.MODE_CONTROL):
            self._refuse(conn, peer, wire.ERR_MALFORMED, f"unknown connection mode {mode!r}")
            return None
        if mode == wire.MODE_DATA:
            theirs = wire.KVFingerprint.from_wire(hello.get("fingerprint") or {})
            diffs = self._fingerprint.differences(theirs)
            if diffs:
                self._refuse(
                    conn,
                    peer,
                    wire.ERR_HANDSHAKE,
                    "KV layout mismatch (ours != theirs): " + "; ".join(diffs),
                )
                return None
        wire.send_frame(
            conn,
            {
                "op": "welcome",
                "mac": wire.server_mac(self._settings.secret, server_nonce, client_nonce),
                "fingerprint": self._fingerprint.to_wire(),
                "max_renewals": self._settings.max_renewals_per_frame,
            },
        )
        return str(mode)

    def _serve_read(self, conn: socket.socket, peer: str, message: dict[str, Any]) -> None:
        request_id = message.get("req")
        block_ids = message.get("blocks")
        if (
            not isinstance(request_id, str)
            or not isinstance(block_ids, list)
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block_ids)
        ):
            raise wire.WireError("malformed read: needs 'req' (str) and 'blocks' (list of int)")
        bad = self._cache.check_block_ids(block_ids)
        if bad:
            self._refuse_request(
                conn,
                peer,
                wire.ERR_OUT_OF_RANGE,
                f"request {request_id!r}: block ids {bad[:8]} outside "
                f"0..{self._cache.num_blocks - 1}",
            )
            return
        issued = params.hold_token_valid(
            self._settings.secret, self._engine_id, request_id, message.get("hold")
        )
        wait_s = (
            self._settings.pending_hold_wait_s if issued else self._settings.unknown_request_wait_s
        )
        try:
            lease = self._leases.acquire(request_id, block_ids, wait_s)
        except LeaseError as exc:
            self._refuse_request(conn, peer, exc.code, str(exc))
            return
        try:
            started = time.perf_counter()
            nbytes = self._cache.request_nbytes(len(block_ids))
            wire.send_frame(conn, {"op": "data", "nbytes": nbytes})
            for views in self._cache.iter_send_buffers(block_ids):
                wire.send_buffers(conn, views)
            elapsed = time.perf_counter() - started
            if message.get("release") is True:
                # Every byte is in the kernel's send buffer: the blocks may be reused.
                self._leases.release(request_id)
        finally:
            self._leases.finish_read(lease)
        if self._on_transfer is not None:
            self._on_transfer(nbytes, elapsed)

    def _serve_renew(self, conn: socket.socket, message: dict[str, Any]) -> None:
        request_ids = message.get("reqs")
        extend_s = message.get("extend_s")
        if (
            not isinstance(request_ids, list)
            or len(request_ids) > self._settings.max_renewals_per_frame
            or not all(isinstance(r, str) for r in request_ids)
            or not isinstance(extend_s, int | float)
            or isinstance(extend_s, bool)
            or not 0 < extend_s <= self._settings.max_extend_s
        ):
            raise wire.WireError(
                "malformed renew: needs 'reqs' (at most "
                f"{self._settings.max_renewals_per_frame} str) and 'extend_s' "
                f"(0 < s <= {self._settings.max_extend_s:g})"
            )
        states = self._leases.renew(request_ids, float(extend_s))
        wire.send_frame(conn, {"op": "renewed", "states": [str(s) for s in states]})

    def _serve_release(self, conn: socket.socket, message: dict[str, Any]) -> None:
        request_id = message.get("req")
        if not isinstance(request_id, str):
            raise wire.WireError("malformed release: needs 'req' (str)")
        known = self._leases.release(request_id)
        wire.send_frame(conn, {"op": "released", "known": known})

    def _refuse_request(self, conn: socket.socket, peer: str, code: str, detail: str) -> None:
        """Refuse one read; the connection stays usable."""
        logger.warning("refused KV read from %s: %s: %s", peer, code, detail)
        if self._on_refusal is not None:
            self._on_refusal()
        wire.send_frame(conn, wire.error_frame(code, detail))

    def _refuse(self, conn: socket.socket, peer: str, code: str, detail: str) -> None:
        """Refuse the connection: tell the peer why, then the caller closes it."""
        logger.warning("refused KV connection from %s: %s: %s", peer, code, detail)
        if self._on_refusal is not None:
            self._on_refusal()
        with contextlib.suppress(wire.WireError):
            wire.send_frame(conn, wire.error_frame(code, detail))
