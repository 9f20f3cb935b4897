"""The admin API: list, add, remove, drain and undrain upstream instances (JSON, optional
bearer token).

It runs on its own listener (``admin.port``); it is mounted on the public listener
only when ``admin.port`` is null *and* a token is set, so it is never open to API
clients by default.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import ProxyError, UnreadableBody
from proxy.instances import Instance, Role
from proxy.pd_flow import error_response
from proxy.registry import (
    InstanceExistsError,
    InstanceRegistry,
    KvEventsError,
    UnknownInstanceError,
)

Handler = Callable[[web.Request], Awaitable[web.Response]]


def instance_view(instance: Instance) -> dict[str, Any]:
    return {
        "url": instance.url,
        "role": instance.role.value,
        "kv_events": None if instance.kv_events is None else instance.kv_events.to_json(),
        "healthy": instance.healthy,
        "draining": instance.draining,
        "in_flight_requests": instance.in_flight_requests,
        "in_flight_tokens": instance.in_flight_tokens,
        "consecutive_failures": instance.consecutive_failures,
    }


class AdminAPI:
    def __init__(self, registry: InstanceRegistry, token: str | None) -> None:
        self._registry = registry
        self._token = token.encode() if token else None

    def install(self, app: web.Application) -> None:
        app.router.add_get("/admin/instances", self._guard(self.list_instances))
        app.router.add_post("/admin/instances", self._guard(self.add_instance))
        app.router.add_delete("/admin/instances", self._guard(self.remove_instance))
        app.router.add_post("/admin/instances/drain", self._guard(self.drain_instance))
        app.router.add_post("/admin/instances/undrain", self._guard(self.undrain_instance))

    async def list_instances(self, request: web.Request) -> web.Response:
        views = [instance_view(i) for i in self._registry.instances()]
        return _json({"instances": views})

    async def add_instance(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        url = _string_field(body, "url")
        role_name = _string_field(body, "role")
        try:
            role = Role(role_name)
        except ValueError:
            raise ProxyError(400, "`role` must be 'prefill' or 'decode'", "role") from None
        kv_events = body.get("kv_events")  # optional; null or absent: none
        try:
            instance = self._registry.add(url, role, kv_events)
        except InstanceExistsError as exc:
            raise ProxyError(409, str(exc), "url") from None
        except KvEventsError as exc:
            raise ProxyError(400, str(exc), "kv_events") from None
        except ValueError as exc:
            raise ProxyError(400, str(exc), "url") from None
        return _json(instance_view(instance), status=201)

    async def remove_instance(self, request: web.Request) -> web.Response:
        url = request.query.get("url")
        if not url:
            raise ProxyError(400, "query parameter `url` is required", "url")
        try:
            instance = self._registry.remove(url)
        except UnknownInstanceError as exc:
            raise ProxyError(404, str(exc), "url") from None
        return _json(instance_view(instance))

    async def drain_instance(self, request: web.Request) -> web.Response:
        url = _string_field(await _json_body(request), "url")
        try:
            instance = self._registry.drain(url)
        except UnknownInstanceError as exc:
            raise ProxyError(404, str(exc), "url") from None
        return _json(instance_view(instance))

    async def undrain_instance(self, request: web.Request) -> web.Response:
        url = _string_field(await _json_body(request), "url")
        try:
            instance = self._registry.undrain(url)
        except UnknownInstanceError as exc:
            raise ProxyError(404, str(exc), "url") from None
        return _json(instance_view(instance))

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.Response:
            if self._token is not None:
                supplied = request.headers.get("Authorization", "")
                scheme, _, credential = supplied.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    credential.strip().encode(), self._token
                ):
                    return error_response(
                        ProxyError(401, "admin API requires `Authorization: Bearer <token>`")
                    )
            try:
                return await handler(request)
            except ProxyError as exc:
                return error_response(exc)

        return guarded


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}") from None
    except web.RequestPayloadError as exc:
        raise UnreadableBody(exc) from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object")
    return body


def _string_field(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ProxyError(400, f"`{field}` is required and must be a string", field)
    return value
