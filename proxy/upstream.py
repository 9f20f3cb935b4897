"""Pooled keep-alive HTTP connections to every upstream instance.

One aiohttp session for all instances: connections are kept per host and closed
after ``keepalive_s`` idle, below vLLM's 5 s, so a request is never written onto a
connection the worker is about to close. aiohttp sets TCP_NODELAY on every
connection it makes (tests/proxy/test_sockets.py checks it).
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from yarl import URL


class UpstreamPool:
    def __init__(self, keepalive_s: float, connect_timeout_s: float) -> None:
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], URL] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # the proxy's own admission control, not the pool, bounds concurrency
            keepalive_timeout=self._keepalive_s,
            ttl_dns_cache=None,
            use_dns_cache=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s),
            trust_env=False,
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamPool is not started")
        return self._session

    def url(self, base: str, path: str) -> URL:
        """A parsed URL, cached: yarl parsing is a visible share of a request's CPU."""
        key = (base, path)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) > 4096:
                self._urls.clear()
            url = self._urls[key] = URL(base + path)
        return url

    async def post(
        self, base: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send the request and return once the response headers arrived.

        The caller must ``release()`` (body fully read) or ``close()`` the response.
        """
        return await self.session.request(
            "POST", self.url(base, path), data=body, headers=headers, allow_redirects=False
        )

    async def get(self, base: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_timeout_s)
        async with self.session.get(
            self.url(base, path), timeout=timeout, allow_redirects=False
        ) as response:
            return response.status, await response.read()
