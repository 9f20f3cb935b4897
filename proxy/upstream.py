"""A lean HTTP/1.1 client for the proxy's upstream legs: keep-alive pool, one request
per connection at a time, responses parsed by httptools (llhttp, the parser uvloop's
authors ship).

Why not aiohttp's client: it is correct and general, but its per-request machinery
(request/response objects, tracing hooks, cookie and redirect handling, a payload
writer) is the largest single CPU cost of a PD request, and a PD request makes two
upstream calls. The proxy needs only POST/GET of bytes it already holds to a few
known hosts, so this client does that and nothing else.

Limits, as a mature client has them:

* At most ``max_connections`` connections per instance (base URL). A request that
  finds none idle and the cap reached waits in a FIFO queue; a finishing request hands
  its connection straight to the first waiter, and a closed one frees a slot for it.
  The wait is bounded only by the caller's deadline (the stage timeout), not by the
  connect timeout: a busy instance is not an unreachable one. ``get()`` (health
  checks, the model list) is not held back: over the cap it uses a connection of its
  own, closed afterwards, so a saturated instance does not look dead.
* A request is sent at most once. A pooled connection is checked just before the
  write (closed, closing, or readable: the server closed it or sent stray bytes) and
  replaced if unusable; once a byte of the request is written, a reset or EOF is the
  caller's error, never a silent resend (a second prefill would strand the first's
  KV). Only an idempotent GET is retried, once, when a reused connection dropped
  before any answer byte.
* Bytes after a complete response (a second response, garbage) mean the connection
  is out of step: it is closed, not pooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools
from yarl import URL

# Stop reading from an upstream while this many relayed bytes wait for the client.
_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18
DEFAULT_MAX_CONNECTIONS = 256  # per instance
_IDEMPOTENT = frozenset({b"GET", b"HEAD"})


class UpstreamError(Exception):
    """Any failure talking to an upstream instance."""


class UpstreamConnectError(UpstreamError):
    """The TCP connection could not be made."""


class UpstreamConnectTimeout(UpstreamConnectError):
    """The TCP connection was not made within the connect timeout."""


class UpstreamDisconnected(UpstreamError):
    """The upstream closed the connection before the response ended."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int
    tls: bool
    host_header: bytes

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) base URL: {base_url!r}")
        port = url.port or (443 if url.scheme == "https" else 80)
        host_header = (
            url.host if url.port is None or url.is_default_port() else f"{url.host}:{port}"
        )
        return cls(url.host, port, url.scheme == "https", host_header.encode("idna"))


class UpstreamResponse:
    """Status and content type once headers arrived; the body is read incrementally."""

    __slots__ = ("_conn", "at_end", "content_type", "status")

    def __init__(self, conn: _Connection, status: int, content_type: str) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.content_type = content_type
        # True once the chunk last returned was the end of the body: a relay can send
        # it together with its own end-of-stream marker, one write instead of two.
        self.at_end = False

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        parts: list[bytes] = []
        while True:
            chunk = await self.next_chunk()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    async def next_chunk(self) -> bytes:
        """Everything received since the last call, or b"" once the body is complete."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            buffered = conn.buffered
            if buffered:
                data = b"".join(buffered) if len(buffered) > 1 else buffered[0]
                buffered.clear()
                conn.buffered_bytes = 0
                if conn.complete:
                    self._finish(conn)
                elif conn.reading_paused:
                    conn.resume_reading()
                return data
            if conn.complete:
                self._finish(conn)
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait()

    def _finish(self, conn: _Connection) -> None:
        # Detach first: once back in the pool the connection serves other requests.
        self._conn = None
        self.at_end = True
        conn.finish()

    def close(self) -> None:
        """Drop the connection unless the body was read to the end (then a no-op)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abandon()


class _TrailingBytes(Exception):
    """Raised from the parser callback when a byte follows a complete response."""


class _Host:
    """Per-instance pool state: idle connections, the open count, the FIFO of waiters."""

    __slots__ = ("idle", "open", "origin", "waiters")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.idle: deque[_Connection] = deque()
        # Connections open or being opened under the cap, plus slots granted to waiters.
        self.open = 0
        # Each resolves to a connection handed over, or None: a free slot to connect in.
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; httptools calls the on_* methods while parsing."""

    def __init__(self, pool: UpstreamPool, host: _Host, counted: bool) -> None:
        self._pool = pool
        self.host = host
        # Holds one of the host's slots (False: over the cap, never pooled; or released).
        self.counted = counted
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._poll: select.poll | None = None
        self.buffered: list[bytes] = []
        self.buffered_bytes = 0
        self.reading_paused = False
        self.headers_done = False
        self.complete = False
        self.closed = False
        self.in_use = False
        self.received_any = False
        self.served = 0  # requests written on this connection
        self.error: UpstreamError | None = None
        self.idle_since = 0.0
        self._content_type = b""
        self._delimited = False  # Content-Length or chunked: the end is in the stream
        self._keep_alive = False

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # For the check before reuse; registering makes no system call.
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # Small request heads must not wait for an ACK (Nagle + delayed ACK = 40 ms).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if not self.in_use:
            # Bytes on an idle connection: the server is misbehaving; do not reuse it.
            self._close_transport()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._close_transport()
            if not self.complete:
                self._fail(UpstreamProtocolError(f"invalid HTTP response: {exc}"))
            # else: bytes after a complete response (on_message_begin refused them); the
            # response stands, the connection is closed instead of pooled.

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.in_use and not self.complete:
            if self.headers_done and not self._delimited:
                self.complete = True  # body delimited by connection close
                self._wake()
            else:
                reason = f": {exc}" if exc else ""
                self._fail(UpstreamDisconnected(f"connection closed mid-response{reason}"))

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A byte after the end of the response: not ours to parse (a second response
            # would be appended to this body). Stops the parser; see data_received.
            raise _TrailingBytes

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-type":
            self._content_type = value
        elif lower == b"content-length" or (
            lower == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.buffered.append(body)
        self.buffered_bytes += len(body)
        if self.buffered_bytes > _HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Asked here: llhttp resets its state once this callback returns.
        self._keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._wake()

    # -- used by the pool and the response -------------------------------------------

    def unusable(self) -> bool:
        """For a pooled connection, just before a request is written on it: closed, or
        readable while idle (EOF: the server closed it; data: stray bytes)."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return True
        return self._poll is not None and bool(self._poll.poll(0))

    def begin(self, request: bytes | list[bytes]) -> None:
        assert self.transport is not None
        self.in_use = True
        self.headers_done = self.complete = False
        self.error = None
        self.received_any = False
        self.served += 1
        self._content_type = b""
        self._delimited = False
        self._keep_alive = False
        if isinstance(request, list):
            self.transport.writelines(request)
        else:
            self.transport.write(request)

    async def wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def response(self) -> UpstreamResponse:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self.wait()
        status = self._parser.get_status_code()
        content_type = self._content_type.decode("latin-1") or "application/json"
        return UpstreamResponse(self, status, content_type)

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def finish(self) -> None:
        """The response was read to the end: reuse the connection if it allows."""
        if not self.in_use:
            return
        self.in_use = False
        if self.closed or not self._keep_alive or not self.counted:
            self._close_transport()
        else:
            self._pool.release(self)

    def abandon(self) -> None:
        if self.in_use:
            if self.complete and not self.buffered:
                self.finish()
                return
            self.in_use = False
            self._close_transport()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close_transport(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections per instance: at most ``max_connections`` open, requests
    over the cap wait in FIFO order; idle ones are closed after ``keepalive_s``."""

    def __init__(
        self,
        keepalive_s: float,
        connect_timeout_s: float,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._hosts: dict[str, _Host] = {}
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def origin(self, base_url: str) -> Origin:
        return self._host(base_url).origin

    def _host(self, base_url: str) -> _Host:
        host = self._hosts.get(base_url)
        if host is None:
            if len(self._hosts) > 4096:
                # Forget instances with nothing open; the others' counts must stay.
                for url, old in list(self._hosts.items()):
                    if not old.open and not old.waiters:
                        del self._hosts[url]
            host = self._hosts[base_url] = _Host(Origin.parse(base_url))
        return host

    async def request(
        self,
        base_url: str,
        method: bytes,
        path: bytes,
        body: bytes | None,
        extra_headers: bytes = b"",
        *,
        limited: bool = True,
    ) -> UpstreamResponse:
        """Send one request and return once the response headers arrived.

        ``extra_headers`` are complete ``Name: value\\r\\n`` lines. The caller must
        read the body to the end or ``close()`` the response. ``limited=False`` (small
        control requests: health checks) does not wait for the cap: over it, it uses a
        connection of its own, closed afterwards.
        """
        host = self._host(base_url)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (
            method,
            path,
            host.origin.host_header,
            extra_headers,
        )
        if body is not None:
            head += b"Content-Length: %d\r\n\r\n" % len(body)
            request: bytes | list[bytes] = head + body if len(body) < 65536 else [head, body]
        else:
            request = head + b"\r\n"
        conn = self._take_idle(host) or await self._checkout(host, limited)
        if conn.served and method in _IDEMPOTENT:
            try:
                return await self._exchange(conn, request)
            except UpstreamDisconnected:
                if conn.received_any:
                    raise
                # A reused connection dropped before any answer byte (the server closed
                # it as we wrote): an idempotent request may go once more, on a new one.
            conn = await self._checkout(host, limited, fresh=True)
        # Never resent from here on: once written, the server may have acted on it.
        return await self._exchange(conn, request)

    @staticmethod
    async def _exchange(conn: _Connection, request: bytes | list[bytes]) -> UpstreamResponse:
        conn.begin(request)
        try:
            return await conn.response()
        except BaseException:
            # Failed or cancelled (the client left) before headers: drop the connection,
            # which also tells the upstream to abort the request.
            conn.abandon()
            raise

    async def _checkout(self, host: _Host, limited: bool, fresh: bool = False) -> _Connection:
        """A connection nothing has been written on since it was checked: a pooled one
        (checked just now), a new one, or one handed over after waiting for the cap."""
        while True:
            if not fresh:
                conn = self._take_idle(host)
                if conn is not None:
                    return conn
            if host.open < self._max_connections:
                host.open += 1
                return await self._connect(host, counted=True)
            if not limited:
                return await self._connect(host, counted=False)
            granted = await self._wait(host)
            if granted is None:  # a slot: host.open already counts it
                return await self._connect(host, counted=True)
            if not granted.unusable():
                return granted
            granted._close_transport()  # nothing written on it yet: wait again

    async def _wait(self, host: _Host) -> _Connection | None:
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        host.waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted, but cancelled before it could run: pass the grant on.
                granted = waiter.result()
                if granted is None:
                    host.open -= 1
                    self._grant(host)
                else:
                    self.release(granted)
            else:
                with contextlib.suppress(ValueError):
                    host.waiters.remove(waiter)
            raise

    def _grant(self, host: _Host) -> None:
        """A slot came free: the first waiter may connect in it."""
        waiters = host.waiters
        while waiters and host.open < self._max_connections:
            waiter = waiters.popleft()
            if not waiter.done():
                host.open += 1
                waiter.set_result(None)

    def release(self, conn: _Connection) -> None:
        host = conn.host
        waiters = host.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)  # straight to the first waiter, in FIFO order
                return
        conn.idle_since = asyncio.get_running_loop().time()
        host.idle.append(conn)
        if self._sweeper is None:
            self._schedule_sweep()

    def forget(self, conn: _Connection) -> None:
        """The connection is closed: out of the pool, and its slot goes to a waiter."""
        self._all.discard(conn)
        host = conn.host
        if conn in host.idle:
            host.idle.remove(conn)
        self._drop_slot(conn)

    def _drop_slot(self, conn: _Connection) -> None:
        if conn.counted:  # at most once per connection
            conn.counted = False
            conn.host.open -= 1
            if not self._closed:
                self._grant(conn.host)

    async def get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        """A small GET (health checks, the model list): status and whole body."""
        async with asyncio.timeout(timeout_s):
            response = await self.request(base_url, b"GET", path.encode(), None, limited=False)
            try:
                return response.status, await response.read()
            finally:
                response.close()

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for host in self._hosts.values():
            host.idle.clear()
            while host.waiters:
                waiter = host.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(UpstreamError("the upstream pool is closed"))
        for conn in list(self._all):
            conn._close_transport()
        await asyncio.sleep(0)  # let transports run connection_lost

    def _take_idle(self, host: _Host) -> _Connection | None:
        idle = host.idle
        if not idle:
            return None
        deadline = asyncio.get_running_loop().time() - self._keepalive_s
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely closed
            if conn.idle_since > deadline and not conn.unusable():
                return conn
            conn._close_transport()
        return None

    async def _connect(self, host: _Host, counted: bool) -> _Connection:
        """``counted``: the caller reserved a slot for it in ``host.open``."""
        loop = asyncio.get_running_loop()
        origin = host.origin
        conn = _Connection(self, host, counted)
        factory: Callable[[], _Connection] = lambda: conn  # noqa: E731
        ssl_context = self._ssl_context() if origin.tls else None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await loop.create_connection(factory, origin.host, origin.port, ssl=ssl_context)
        except BaseException as exc:
            if conn.transport is not None:
                conn.transport.close()
            self._drop_slot(conn)
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectTimeout(
                    f"connect to {origin.host}:{origin.port} timed out "
                    f"after {self._connect_timeout_s:g}s"
                ) from None
            if isinstance(exc, OSError):
                raise UpstreamConnectError(
                    f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
                ) from None
            raise
        self._all.add(conn)
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self._keepalive_s / 2, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle too long, before the server closes them under us."""
        self._sweeper = None
        deadline = asyncio.get_running_loop().time() - self._keepalive_s
        remaining = 0
        for host in self._hosts.values():
            idle = host.idle
            while idle and idle[0].idle_since <= deadline:
                idle.popleft()._close_transport()
            remaining += len(idle)
        if remaining:
            self._schedule_sweep()
