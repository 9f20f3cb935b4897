"""The admin API: its own listener, bearer token, list/add/remove/drain/undrain."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import MODEL, wait_for

from benchmarks.fake_worker import FakeWorker
from proxy.instances import Role

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"model": MODEL, "prompt": "some prompt text here", "max_tokens": 2}


async def test_admin_requires_the_token(
    make_proxy: ProxyFactory, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    server = await make_proxy([], [decode], admin={"port": 0, "token": TOKEN})
    assert server.admin_url is not None
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        async with http.get(server.admin_url + "/admin/instances", headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == 401
    async with http.get(server.admin_url + "/admin/instances", headers=AUTH) as response:
        assert response.status == 200


async def test_drain_and_undrain_require_the_token(
    make_proxy: ProxyFactory, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    server = await make_proxy([], [decode], admin={"port": 0, "token": TOKEN})
    assert server.admin_url is not None
    for action in ("drain", "undrain"):
        url = f"{server.admin_url}/admin/instances/{action}"
        async with http.post(url, json={"url": decode.url}) as response:
            assert response.status == 401
        assert server.registry.require(decode.url).draining is False  # untouched
    async with http.post(
        server.admin_url + "/admin/instances/drain", json={"url": decode.url}, headers=AUTH
    ) as response:
        assert response.status == 200
    async with http.post(
        server.admin_url + "/admin/instances/undrain", json={"url": decode.url}
    ) as response:
        assert response.status == 401
    assert server.registry.require(decode.url).draining is True
    async with http.post(
        server.admin_url + "/admin/instances/undrain", json={"url": decode.url}, headers=AUTH
    ) as response:
        assert response.status == 200
        assert (await response.json())["draining"] is False
    assert server.registry.routable(Role.DECODE) == [server.registry.require(decode.url)]


async def test_admin_is_not_on_the_public_listener(
    make_proxy: ProxyFactory, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    server = await make_proxy([], [decode], admin={"port": 0, "token": TOKEN})
    async with http.get(server.url + "/admin/instances", headers=AUTH) as response:
        assert response.status == 404


async def test_admin_on_the_public_listener_only_with_a_token(
    make_proxy: ProxyFactory, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    with_token = await make_proxy([], [decode], admin={"port": None, "token": TOKEN})
    assert with_token.admin_url is None
    async with http.get(with_token.url + "/admin/instances") as response:
        assert response.status == 401
    async with http.get(with_token.url + "/admin/instances", headers=AUTH) as response:
        assert response.status == 200
    without = await make_proxy([], [decode], admin={"port": None, "token": None})
    async with http.get(without.url + "/admin/instances") as response:
        assert response.status == 404


async def test_list_add_drain_remove(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    server = await make_proxy([prefill], [decode])
    admin = server.admin_url
    assert admin is not None
    async with http.get(admin + "/admin/instances") as response:
        listing = (await response.json())["instances"]
    assert {(i["url"], i["role"]) for i in listing} == {
        (prefill.url, "prefill"),
        (decode.url, "decode"),
    }
    assert set(listing[0]) == {
        "url", "role", "kv_events", "healthy", "draining", "in_flight_requests",
        "in_flight_tokens", "consecutive_failures",
    }  # fmt: skip

    extra = await make_worker("decode")
    async with http.post(
        admin + "/admin/instances", json={"url": extra.url, "role": "decode"}
    ) as r:
        assert r.status == 201
        assert (await r.json())["url"] == extra.url
    async with http.post(
        admin + "/admin/instances", json={"url": extra.url, "role": "decode"}
    ) as r:
        assert r.status == 409
    for _ in range(4):
        async with http.post(server.url + "/v1/completions", json=BODY) as response:
            assert response.status == 200
    assert len(extra.generate_requests()) == 2  # round robin over both decode instances

    # Drain: no new requests, and in-flight ones are visible until they finish.
    slow_extra = extra
    slow_extra.token_delay_s = 0.05
    stream_body = {**BODY, "stream": True, "max_tokens": 8}
    async with http.post(server.url + "/v1/completions", json=stream_body) as streaming:
        # Round robin sends this one to `decode`; make the next one land on `extra`.
        await streaming.read()
    async with http.post(server.url + "/v1/completions", json=stream_body) as streaming:
        await streaming.content.readany()
        async with http.post(admin + "/admin/instances/drain", json={"url": extra.url}) as r:
            assert r.status == 200
            view = await r.json()
        assert view["draining"] is True and view["in_flight_requests"] == 1
        await streaming.read()
    async with http.get(admin + "/admin/instances") as response:
        views = {i["url"]: i for i in (await response.json())["instances"]}
    assert views[extra.url]["draining"] is True
    assert views[extra.url]["in_flight_requests"] == 0
    before = len(extra.generate_requests())
    for _ in range(3):
        async with http.post(server.url + "/v1/completions", json=BODY) as response:
            assert response.status == 200
    assert len(extra.generate_requests()) == before

    async with http.delete(admin + "/admin/instances", params={"url": extra.url}) as r:
        assert r.status == 200
    async with http.delete(admin + "/admin/instances", params={"url": extra.url}) as r:
        assert r.status == 404
    assert server.registry.get(extra.url) is None


@pytest.mark.parametrize(
    ("method", "path", "payload", "status"),
    [
        ("POST", "/admin/instances", {"url": "http://127.0.0.1:1", "role": "router"}, 400),
        ("POST", "/admin/instances", {"role": "decode"}, 400),
        ("POST", "/admin/instances", ["not", "an", "object"], 400),
        ("POST", "/admin/instances/drain", {"url": "http://127.0.0.1:1"}, 404),
        ("POST", "/admin/instances/undrain", {"url": "http://127.0.0.1:1"}, 404),
        ("POST", "/admin/instances/undrain", {}, 400),
        ("POST", "/admin/instances/undrain", {"url": 7}, 400),
        ("POST", "/admin/instances/undrain", ["not", "an", "object"], 400),
        ("DELETE", "/admin/instances", None, 400),
    ],
)
async def test_admin_bad_requests(
    make_proxy: ProxyFactory,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    payload: object,
    status: int,
) -> None:
    server = await make_proxy([], [decode])
    assert server.admin_url is not None
    async with http.request(method, server.admin_url + path, json=payload) as response:
        assert response.status == status
        error = (await response.json())["error"]
    assert error["code"] == status and error["message"]


async def test_embedder_registry_feeds_routing(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
) -> None:
    """What the Ray deployment does: start empty, add instances in-process."""
    server = await make_proxy([], [])
    async with http.post(server.url + "/v1/completions", json=BODY) as response:
        assert response.status == 503
    prefill, decode = await make_worker("prefill"), await make_worker("decode")
    server.add_instance(prefill.url, "prefill")
    server.add_instance(decode.url, "decode")
    async with http.post(server.url + "/v1/completions", json=BODY) as response:
        assert response.status == 200
    assert len(prefill.generate_requests()) == 1
    server.remove_instance(prefill.url)
    async with http.post(server.url + "/v1/completions", json=BODY) as response:
        assert response.status == 200
    await wait_for(lambda: len(decode.generate_requests()) == 2)
    assert "kv_transfer_params" not in decode.generate_requests()[1].body
