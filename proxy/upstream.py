"""A lean HTTP/1.1 client for the proxy's upstream legs: keep-alive pool, one request
per connection at a time, responses parsed by httptools (llhttp, the parser uvloop's
authors ship).

Why not aiohttp's client: it is correct and general, but its per-request machinery
(request/response objects, tracing hooks, cookie and redirect handling, a payload
writer) is the largest single CPU cost of a PD request, and a PD request makes two
upstream calls. The proxy needs only POST/GET of bytes it already holds to a few
known hosts, so this client does that and nothing else.
"""

from __future__ import annotations

import asyncio
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


class _Connection(asyncio.Protocol):
    """One keep-alive connection; httptools calls the on_* methods while parsing."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self.buffered: list[bytes] = []
        self.buffered_bytes = 0
        self.reading_paused = False
        self.headers_done = False
        self.complete = False
        self.closed = False
        self.in_use = False
        self.received_any = False
        self.error: UpstreamError | None = None
        self.idle_since = 0.0
        self._content_type = b""
        self._delimited = False  # Content-Length or chunked: the end is in the stream
        self._keep_alive = False

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
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
            self._fail(UpstreamProtocolError(f"invalid HTTP response: {exc}"))
            self._close_transport()

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

    def begin(self, request: bytes | list[bytes]) -> None:
        assert self.transport is not None
        self.in_use = True
        self.headers_done = self.complete = False
        self.error = None
        self.received_any = False
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
        if self.closed or not self._keep_alive:
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
    """Idle keep-alive connections per origin, closed after ``keepalive_s`` idle."""

    def __init__(self, keepalive_s: float, connect_timeout_s: float) -> None:
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None

    def origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            if len(self._origins) > 4096:
                self._origins.clear()
            origin = self._origins[base_url] = Origin.parse(base_url)
        return origin

    async def request(
        self,
        base_url: str,
        method: bytes,
        path: bytes,
        body: bytes | None,
        extra_headers: bytes = b"",
    ) -> UpstreamResponse:
        """Send one request and return once the response headers arrived.

        ``extra_headers`` are complete ``Name: value\\r\\n`` lines. The caller must
        read the body to the end or ``close()`` the response.
        """
        origin = self.origin(base_url)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (
            method,
            path,
            origin.host_header,
            extra_headers,
        )
        if body is not None:
            head += b"Content-Length: %d\r\n\r\n" % len(body)
            request: bytes | list[bytes] = head + body if len(body) < 65536 else [head, body]
        else:
            request = head + b"\r\n"
        conn = self._take_idle(origin)
        if conn is not None:
            try:
                return await self._exchange(conn, request)
            except UpstreamDisconnected:
                if conn.received_any:
                    raise
                # The server closed the idle connection as we reused it: it never saw
                # the request, so sending it on a fresh connection is safe.
        return await self._exchange(await self._connect(origin), request)

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

    def release(self, conn: _Connection) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(conn.origin, deque()).append(conn)
        if self._sweeper is None:
            self._schedule_sweep()

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)

    async def get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        """A small GET (health checks, the model list): status and whole body."""
        async with asyncio.timeout(timeout_s):
            response = await self.request(base_url, b"GET", path.encode(), None)
            try:
                return response.status, await response.read()
            finally:
                response.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn._close_transport()
        self._idle.clear()
        await asyncio.sleep(0)  # let transports run connection_lost

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        deadline = asyncio.get_running_loop().time() - self._keepalive_s
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely closed
            if not conn.closed and conn.idle_since > deadline:
                return conn
            conn._close_transport()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        factory: Callable[[], _Connection] = lambda: _Connection(self, origin)  # noqa: E731
        ssl_context = self._ssl_context() if origin.tls else None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    factory, origin.host, origin.port, ssl=ssl_context
                )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connect to {origin.host}:{origin.port} timed out "
                f"after {self._connect_timeout_s:g}s"
            ) from None
        except OSError as exc:
            raise UpstreamConnectError(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
            ) from None
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
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= deadline:
                idle.popleft()._close_transport()
            remaining += len(idle)
        if remaining:
            self._schedule_sweep()
