"""The public, OpenAI-compatible listener: completions, chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import logging
import os

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.catalog import ModelCatalog
from proxy.errors import ProxyError, UnreadableBody
from proxy.instances import Role
from proxy.metrics import ProxyMetrics
from proxy.pd_flow import PDFlow, error_response
from proxy.registry import InstanceRegistry
from proxy.request import Endpoint, parse_client_request

log = logging.getLogger(__name__)

# Client headers that travel on to both legs besides X-Request-Id.
_FORWARDED_HEADERS = ("Authorization", "traceparent", "tracestate")
_MAX_REQUEST_ID_LENGTH = 256
_GENERATE_PATHS = frozenset(endpoint.path for endpoint in Endpoint)


class PublicAPI:
    def __init__(
        self,
        *,
        flow: PDFlow,
        catalog: ModelCatalog,
        registry: InstanceRegistry,
        metrics: ProxyMetrics,
        max_body_bytes: int,
    ) -> None:
        self._flow = flow
        self._catalog = catalog
        self._registry = registry
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes

    def install(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)

    def install_fallback(self, app: web.Application) -> None:
        """OpenAI-shaped 404/405 for anything unrouted; add after every other route."""
        app.router.add_route("*", "/{tail:.*}", self.not_found)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Endpoint.COMPLETIONS)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Endpoint.CHAT)

    async def _generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started = asyncio.get_running_loop().time()
        request_id = request.headers.get("X-Request-Id")
        if (
            not request_id
            or len(request_id) > _MAX_REQUEST_ID_LENGTH
            or not request_id.isprintable()
        ):
            request_id = os.urandom(16).hex()
        model: str | None = None
        try:
            raw = await self._read_body(request)
            req = parse_client_request(endpoint, raw)
            model = req.model
            await self._catalog.check_model(model)
        except ProxyError as exc:
            self._metrics.count_request(endpoint.value, model, exc.status, "")
            return error_response(exc, request_id)
        headers = b"Content-Type: application/json\r\nX-Request-Id: %s\r\n" % request_id.encode()
        client_headers = request.headers
        for name in _FORWARDED_HEADERS:
            value = client_headers.get(name)
            if value is not None:
                headers += b"%s: %s\r\n" % (name.encode(), value.encode("latin-1", "replace"))
        try:
            return await self._flow.run(request, req, request_id, headers, started)
        except Exception:
            # A proxy bug must still answer in the API's shape, never with a traceback.
            log.exception("unexpected error serving request %s", request_id)
            return error_response(ProxyError(500, "internal proxy error"), request_id)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self._max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ProxyError(413, f"request body exceeds the proxy's limit of {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ProxyError(
                413, f"request body exceeds the proxy's limit of {limit} bytes"
            ) from None
        except web.RequestPayloadError as exc:
            raise UnreadableBody(exc) from None

    async def models(self, request: web.Request) -> web.Response:
        try:
            body = await self._catalog.models_body()
        except ProxyError as exc:
            return error_response(exc)
        return web.Response(body=body, content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        """200 while at least one decode instance is routable (the proxy can serve)."""
        decode = len(self._registry.routable(Role.DECODE))
        prefill = len(self._registry.routable(Role.PREFILL))
        body = {
            "status": "ok" if decode else "unavailable",
            "prefill_healthy": prefill,
            "decode_healthy": decode,
        }
        return web.Response(
            status=200 if decode else 503, body=orjson.dumps(body), content_type="application/json"
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def not_found(self, request: web.Request) -> web.Response:
        if request.path in _GENERATE_PATHS:
            error = ProxyError(405, f"method {request.method} is not allowed on {request.path}")
        else:
            error = ProxyError(404, f"no route for {request.method} {request.path}")
        return error_response(error)
