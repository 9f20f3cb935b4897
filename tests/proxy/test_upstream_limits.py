"""The upstream client's limits (issue 10 item 7), against raw servers that misbehave on cue:
a per-instance connection cap with a FIFO queue, no resend of a written request, no
pooling of a connection with bytes after its response, and a decode stall timer that a
slow-reading client does not trip."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import uvloop
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import metric_value

from proxy.server import ProxyServer
from proxy.upstream import UpstreamDisconnected, UpstreamPool


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Both loops: the proxy runs on uvloop, whose transports differ in the details."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- a raw HTTP/1.1 server on the test's loop ------------------------------------------


@dataclass
class Received:
    conn: int  # which connection (0, 1, ...) in accept order
    nth: int  # the request's position on that connection (0 = first)
    body: bytes


# Given the request, what to do: the bytes to answer (None: close without answering).
Script = Callable[[Received], Awaitable[bytes | None]]


@dataclass
class RawServer:
    script: Script
    port: int = 0
    accepted: int = 0
    open: int = 0
    max_open: int = 0
    requests: list[Received] = field(default_factory=list)
    got_request: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.accepted
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            for nth in range(1000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                received = Received(index, nth, await reader.readexactly(length))
                self.requests.append(received)
                self.got_request.set()
                answer = await self.script(received)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def make(script: Script) -> RawServer:
        server = RawServer(script)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(keepalive_s=30.0, connect_timeout_s=2.0)
    yield pool
    await pool.close()


async def post(pool: UpstreamPool, url: str, body: bytes = b"{}") -> bytes:
    response = await pool.request(url, b"POST", b"/v1/completions", body)
    try:
        return await response.read()
    finally:
        response.close()


# -- a) the per-instance connection cap ------------------------------------------------------


async def test_connections_per_instance_are_capped_and_the_rest_wait(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    async def slow(_: Received) -> bytes:
        await asyncio.sleep(0.1)
        return OK

    server = await raw_server(slow)
    pool = UpstreamPool(keepalive_s=30.0, connect_timeout_s=2.0, max_connections=2)
    try:
        bodies = await asyncio.gather(*(post(pool, server.url) for _ in range(5)))
        assert bodies == [b"ok"] * 5
        assert len(server.requests) == 5
        assert server.max_open == 2, "the cap let more connections open"
        assert server.accepted == 2, "a waiter opened a connection instead of reusing one"
        host = pool._host(server.url)
        assert host.open == 2 and not host.waiters and len(host.idle) == 2
    finally:
        await pool.close()


async def test_waiters_are_served_in_arrival_order(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    async def slow(_: Received) -> bytes:
        await asyncio.sleep(0.02)
        return OK

    server = await raw_server(slow)
    pool = UpstreamPool(keepalive_s=30.0, connect_timeout_s=2.0, max_connections=1)
    try:
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(post(pool, server.url, b"%d" % i)))
            await asyncio.sleep(0)  # each one queues before the next starts
        await asyncio.gather(*tasks)
        assert [r.body for r in server.requests] == [b"%d" % i for i in range(6)]
        assert server.accepted == 1
    finally:
        await pool.close()


async def test_a_wait_is_bounded_by_the_callers_deadline_and_leaks_nothing(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    release = asyncio.Event()

    async def held(_: Received) -> bytes:
        await release.wait()
        return OK

    server = await raw_server(held)
    pool = UpstreamPool(keepalive_s=30.0, connect_timeout_s=2.0, max_connections=1)
    try:
        first = asyncio.create_task(post(pool, server.url))
        await server.got_request.wait()
        for _ in range(3):  # the stage deadline runs out while waiting for the cap
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await post(pool, server.url)
        host = pool._host(server.url)
        assert not host.waiters and host.open == 1
        release.set()
        assert await first == b"ok"
        assert await post(pool, server.url) == b"ok"
        assert server.accepted == 1 and len(server.requests) == 2
    finally:
        await pool.close()


async def test_a_waiter_cancelled_after_being_handed_a_connection_passes_it_on(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    async def answer(_: Received) -> bytes:
        return OK

    server = await raw_server(answer)
    pool = UpstreamPool(keepalive_s=30.0, connect_timeout_s=2.0, max_connections=1)
    try:
        # Holds the one connection until its body is read.
        response = await pool.request(server.url, b"POST", b"/", b"{}")
        waiter = asyncio.create_task(post(pool, server.url))
        third = asyncio.create_task(post(pool, server.url))
        await asyncio.sleep(0.05)
        host = pool._host(server.url)
        assert len(host.waiters) == 2
        assert await response.read() == b"ok"  # hands the connection to `waiter` ...
        waiter.cancel()  # ... which is cancelled before it could run
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await third == b"ok"  # got the connection `waiter` never used
        assert server.accepted == 1 and len(server.requests) == 2
        assert host.open == 1 and not host.waiters
    finally:
        await pool.close()


async def test_a_failed_connect_frees_its_slot(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    pool = UpstreamPool(keepalive_s=30.0, connect_timeout_s=2.0, max_connections=1)
    try:
        for _ in range(3):
            with pytest.raises(Exception, match="cannot connect"):
                await post(pool, dead)
        assert pool._host(dead).open == 0
    finally:
        await pool.close()


async def test_health_checks_are_not_held_back_by_the_cap(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    release = asyncio.Event()

    async def held(received: Received) -> bytes:
        if received.body == b"{}":
            await release.wait()
        return OK

    server = await raw_server(held)
    pool = UpstreamPool(keepalive_s=30.0, connect_timeout_s=2.0, max_connections=1)
    try:
        busy = asyncio.create_task(post(pool, server.url))
        await server.got_request.wait()
        assert await pool.get(server.url, "/health", 1.0) == (200, b"ok")
        release.set()
        assert await busy == b"ok"
        host = pool._host(server.url)
        assert host.open == 1 and len(host.idle) == 1  # the extra one was not pooled
    finally:
        await pool.close()


def test_the_cap_is_configurable() -> None:
    from proxy.config import ProxyConfig

    assert ProxyConfig().upstream_max_connections_per_instance == 256
    config = ProxyConfig.model_validate({"upstream_max_connections_per_instance": 8})
    assert config.upstream_max_connections_per_instance == 8
    with pytest.raises(ValueError):
        ProxyConfig.model_validate({"upstream_max_connections_per_instance": 0})
    with pytest.raises(ValueError):
        UpstreamPool(4.0, 2.0, max_connections=0)


# -- b) a written request is never sent again ------------------------------------------------


async def _answer_first_then_drop(received: Received) -> bytes | None:
    # Answers the first request of each connection; reads the second in full, then
    # closes without a word (a worker crashing, or closing a keep-alive connection late).
    return OK if received.nth == 0 else None


async def test_a_post_the_server_read_is_not_resent_when_the_connection_drops(
    raw_server: Callable[[Script], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    server = await raw_server(_answer_first_then_drop)
    assert await post(pool, server.url, b"first") == b"ok"
    with pytest.raises(UpstreamDisconnected):
        await post(pool, server.url, b"prefill")
    await asyncio.sleep(0.05)
    assert [r.body for r in server.requests].count(b"prefill") == 1, server.requests
    assert server.accepted == 1


async def test_an_idempotent_get_is_retried_once_on_a_new_connection(
    raw_server: Callable[[Script], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    server = await raw_server(_answer_first_then_drop)
    assert await pool.get(server.url, "/health", 1.0) == (200, b"ok")
    assert await pool.get(server.url, "/health", 1.0) == (200, b"ok")
    assert len(server.requests) == 3 and server.accepted == 2


# -- a raw server on its own thread: it acts while the test's loop is blocked ----------------


@contextlib.contextmanager
def threaded_server(after_answer: bytes | None) -> Iterator[tuple[str, list[bytes], list[int]]]:
    """Answers each request with OK; after the first answer of a connection it sends
    ``after_answer`` 50 ms later (None: closes the connection instead). Yields the URL,
    the request bodies received and a one-item list with the connections accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    bodies: list[bytes] = []
    accepted = [0]
    stop = threading.Event()

    def serve_connection(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client may reset it
            serve_requests(conn)

    def serve_requests(conn: socket.socket) -> None:
        buffer = b""
        nth = 0
        while not stop.is_set():
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            bodies.append(buffer[:length])
            buffer = buffer[length:]
            conn.sendall(OK)
            if nth == 0:
                time.sleep(0.05)
                if after_answer is None:
                    return
                conn.sendall(after_answer)
            nth += 1

    def accept_loop() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted[0] += 1
            threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", bodies, accepted
    finally:
        stop.set()
        thread.join(2.0)
        listener.close()


async def test_a_pooled_connection_closed_unseen_is_replaced_before_writing(
    pool: UpstreamPool,
) -> None:
    with threaded_server(after_answer=None) as (url, bodies, accepted):
        assert await post(pool, url, b"first") == b"ok"
        time.sleep(0.3)  # noqa: ASYNC251 - the server's FIN arrives while the loop is busy
        assert await post(pool, url, b"second") == b"ok"
        assert bodies == [b"first", b"second"] and accepted[0] == 2


# -- c) bytes after a complete response --------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n", id="start-of-a-second-response"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", id="second-response"),
        pytest.param(b"garbage", id="garbage"),
    ],
)
async def test_bytes_after_a_complete_response_keep_the_connection_out_of_the_pool(
    raw_server: Callable[[Script], Awaitable[RawServer]], pool: UpstreamPool, extra: bytes
) -> None:
    async def chatty(received: Received) -> bytes:
        return OK + extra if received.nth == 0 else OK

    server = await raw_server(chatty)
    assert await post(pool, server.url) == b"ok"  # not b"okhello"
    assert await post(pool, server.url) == b"ok"
    assert server.accepted == 2, "the second request went on the out-of-step connection"


async def test_stray_bytes_unread_in_the_socket_keep_the_connection_out_of_the_pool(
    pool: UpstreamPool,
) -> None:
    with threaded_server(after_answer=b"HTTP/1.1 200 OK\r\n") as (url, bodies, accepted):
        assert await post(pool, url, b"first") == b"ok"
        time.sleep(0.3)  # noqa: ASYNC251 - stray bytes arrive while the loop is busy
        assert await post(pool, url, b"second") == b"ok"
        assert bodies == [b"first", b"second"] and accepted[0] == 2


# -- d) a slow-reading client is not a decode stall ------------------------------------------


async def metrics_text(server: ProxyServer, http: aiohttp.ClientSession) -> str:
    async with http.get(server.url + "/metrics") as response:
        return await response.text()


async def test_a_slow_reading_client_is_not_a_decode_stall(
    make_proxy: ProxyFactory, make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    # Every SSE event repeats the model name: a long one makes a stream of a few MB, more
    # than the socket buffers between the proxy and a client that stops reading hold.
    model = "m" * 16000
    tokens = 400
    decode = await make_worker("decode", model=model, record=False)
    server = await make_proxy([], [decode], timeouts={"stall_s": 0.3})
    body = b'{"model":"%s","prompt":"hello","max_tokens":%d,"stream":true}' % (
        model.encode(),
        tokens,
    )
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.setblocking(False)
    with sock:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        await loop.sock_sendall(
            sock,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body),
        )
        received = bytearray(await loop.sock_recv(sock, 4096))
        await asyncio.sleep(1.0)  # reads nothing for over three stall_s; the worker is fine
        while data := await loop.sock_recv(sock, 1 << 20):
            received += data
    text = bytes(received)
    assert text.startswith(b"HTTP/1.1 200"), text[:200]
    stalled = b"stalled" in text
    assert not stalled, text[-300:]
    assert text.count(b'"text"') == tokens and b"data: [DONE]" in text
    metrics = await metrics_text(server, http)
    assert metric_value(metrics, "pdserve_timeouts_total", stage="stall") == 0
