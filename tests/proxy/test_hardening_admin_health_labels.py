"""Hardening: instance URLs are validated everywhere they enter, background tasks survive
unexpected errors, and metric label values come only from bounded, known sets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import re
import string
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import MODEL, metric_value, wait_for
from pydantic import ValidationError

from benchmarks.fake_worker import FakeWorker
from deploy.cli import CliError
from proxy import cli
from proxy.config import ProxyConfig, describe_validation_error
from proxy.instances import Instance, Role
from proxy.metrics import FastHistogram, ProxyMetrics
from proxy.registry import InstanceRegistry, normalise_url

BODY = {"model": MODEL, "prompt": "some prompt text here", "max_tokens": 2}
FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 1.0, "failures_to_eject": 2}

BAD_URLS = [
    "http://h:abc",  # parses, but the port is not a number
    "http://h:0",
    "http://h:65536",
    "http://h:99999999999",
    "http://h:-1",
    "http://h:",
    "http://h:+80",
    "http://h:8_0",
    "http://h:\uff11\uff12",  # non-ASCII digits
    "ftp://h:1",
    "file:///etc/passwd",
    "http://:8000",
    "http://",
    "   ",
    "http://user:pw@h:8000",
    "http://@h:8000",
    "http://h:8000/v1",
    "http://h:8000/?",
    "http://h:8000?x=1",
    "http://h:8000#frag",
    "http://h h:8000",
    "http://h\n:8000",
    "http://h:1:2",
    "http://::1:8000",  # IPv6 needs brackets
    "http://[::1:8000",
    "http://[not-an-ip]:8000",
    "http://[::1]x:8000",
    "http://h%41:8000",
    "http://h:8000\\x",
    "http://" + "a" * 600 + ":8000",
]


# -- 3. instance URLs ---------------------------------------------------------------------


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_instance_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError) as info:
        normalise_url(url)
    message = str(info.value)
    assert "\n" not in message and len(message) < 200, message


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("127.0.0.1:8100", "http://127.0.0.1:8100"),
        (" http://127.0.0.1:8100/ ", "http://127.0.0.1:8100"),
        (
            "http://worker-3.pool.svc.cluster.local:8200",
            "http://worker-3.pool.svc.cluster.local:8200",
        ),
        ("https://worker_1:443", "https://worker_1:443"),
        ("HTTP://host:08000", "http://host:8000"),
        ("http://host", "http://host"),
        ("http://[::1]:8000/", "http://[::1]:8000"),
        ("http://[fe80::1]:65535", "http://[fe80::1]:65535"),
    ],
)
def test_good_instance_urls_are_normalised(url: str, normalised: str) -> None:
    assert normalise_url(url) == normalised


async def test_admin_refuses_urls_that_cannot_be_dialled(
    make_proxy: ProxyFactory, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    """Each bad URL gets a 400 in the proxy's OpenAI error shape and registers nothing."""
    server = await make_proxy([], [decode])
    assert server.admin_url is not None
    for url in BAD_URLS:
        async with http.post(
            server.admin_url + "/admin/instances", json={"url": url, "role": "decode"}
        ) as response:
            assert response.status == 400, url
            assert response.content_type == "application/json"
            error = (await response.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == 400 and error["type"] == "BadRequestError", url
        assert error["param"] == "url" and error["message"], url
    assert [i.url for i in server.registry.instances()] == [decode.url]
    # A good one in an unusual spelling is still accepted, normalised.
    spelled = decode.url.replace("http://", "HTTP://") + "/"
    async with http.post(
        server.admin_url + "/admin/instances", json={"url": spelled, "role": "prefill"}
    ) as response:
        assert response.status == 409  # the same instance: normalised to the same identity


def test_config_urls_get_the_same_validation() -> None:
    for field in ("prefill", "decode"):
        with pytest.raises(ValidationError) as info:
            ProxyConfig.model_validate({field: ["http://h:abc"]})
        message = describe_validation_error(info.value)
        assert message.startswith(field) and "port" in message, message
        assert "\n" not in message


@pytest.mark.timeout(20)
def test_cli_urls_get_the_same_validation() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for flag in ("--decode", "--prefill"):
        argv = ["--decode", "http://127.0.0.1:1", flag, "http://h:abc", "--port", "0"]
        args = parser.parse_args(argv)
        with pytest.raises(CliError, match="port") as info:
            cli.run(args)
        assert "\n" not in str(info.value)


# -- 5. supervised background tasks ---------------------------------------------------


async def test_health_loop_survives_an_unexpected_error(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = await make_worker("decode")
    server = await make_proxy([], [decode, flaky], health=FAST_HEALTH)
    checker = server.health_checker
    original = checker._check
    raised: list[str] = []

    async def check_raising_once(instance: Instance) -> None:
        if not raised and instance.url == decode.url:
            raised.append(instance.url)
            raise ValueError("Port could not be cast to integer value as 'abc'")
        await original(instance)

    monkeypatch.setattr(checker, "_check", check_raising_once)
    with caplog.at_level(logging.ERROR, logger="proxy.health"):
        await wait_for(lambda: bool(raised))
        await asyncio.sleep(0.2)  # several rounds after the error
        flaky.faults.unhealthy = True
        await wait_for(lambda: not server.registry.require(flaky.url).healthy)
    # Logged once, with a traceback and the instance it was checking.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert decode.url in errors[0].getMessage()
    assert server.registry.require(decode.url).healthy  # one error does not eject


async def test_health_round_error_is_logged_and_the_loop_goes_on(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = await make_worker("decode")
    server = await make_proxy([], [decode, flaky], health=FAST_HEALTH)
    checker = server.health_checker
    original = checker.check_all
    calls: list[int] = []

    async def check_all_raising_once() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        await original()

    monkeypatch.setattr(checker, "check_all", check_all_raising_once)
    with caplog.at_level(logging.ERROR, logger="proxy.health"):
        await wait_for(lambda: len(calls) >= 3)
        flaky.faults.unhealthy = True
        await wait_for(lambda: not server.registry.require(flaky.url).healthy)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "health" in errors[0].getMessage()
    assert errors[0].exc_info is not None


@pytest.fixture
async def health_500() -> AsyncIterator[str]:
    """A worker whose /health answers 500 (FakeWorker's fault switch answers 503)."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=500, text="internal error")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_health_answering_5xx_is_a_failure(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    health_500: str,
    http: aiohttp.ClientSession,
) -> None:
    answers_503 = await make_worker("decode")
    answers_503.faults.unhealthy = True
    server = await make_proxy([], [decode, answers_503, health_500], health=FAST_HEALTH)
    await wait_for(lambda: not server.registry.require(answers_503.url).healthy)
    await wait_for(lambda: not server.registry.require(health_500).healthy)
    assert server.registry.require(decode.url).healthy
    async with http.get(server.url + "/metrics") as response:
        text = await response.text()
    for url in (answers_503.url, health_500):
        labels = {"role": "decode", "instance": url}
        assert metric_value(text, "pdserve_ejections_total", **labels) == 1
        assert metric_value(text, "pdserve_instance_healthy", **labels) == 0


async def test_model_list_fetch_survives_an_unexpected_error(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    decode: FakeWorker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    http: aiohttp.ClientSession,
) -> None:
    """The catalog's background fetch skips an instance that raises, logs it, and
    answers from the next one (before: the error escaped into the request as a 500)."""
    broken = await make_worker("decode")
    server = await make_proxy([], [broken, decode])
    pool = server._pool
    original = pool.get

    async def get(base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        if base_url == broken.url:
            raise ValueError("Port could not be cast to integer value")
        return await original(base_url, path, timeout_s)

    monkeypatch.setattr(pool, "get", get)
    with caplog.at_level(logging.ERROR, logger="proxy.catalog"):
        async with http.get(server.url + "/v1/models") as response:
            assert response.status == 200
            assert (await response.json())["data"][0]["id"] == MODEL
        async with http.post(server.url + "/v1/completions", json=BODY) as response:
            assert response.status == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and broken.url in errors[0].getMessage()
    assert errors[0].exc_info is not None


# -- 6. bounded metric labels ---------------------------------------------------------

_MODEL_LABEL = re.compile(r'model="([^"]*)"')
_INSTANCE_LABEL = re.compile(r'instance="([^"]*)"')


def _random_model(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits + "-/", k=12))


async def _post_many(
    http: aiohttp.ClientSession, url: str, bodies: list[dict[str, object]]
) -> list[int]:
    statuses: list[int] = []
    for start in range(0, len(bodies), 50):

        async def post(body: dict[str, object]) -> int:
            async with http.post(url, json=body) as response:
                await response.read()
                return response.status

        statuses += await asyncio.gather(*(post(b) for b in bodies[start : start + 50]))
    return statuses


async def test_model_labels_come_from_the_served_models(
    make_proxy: ProxyFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    server = await make_proxy([prefill], [decode])
    catalog = server._catalog
    rng = random.Random(6)
    endpoint = server.url + "/v1/completions"

    def bodies(n: int) -> list[dict[str, object]]:
        return [{**BODY, "model": _random_model(rng), "stream": bool(i % 2)} for i in range(n)]

    # While the catalog is empty the workers judge the model (the fake answers 404).
    real_refresh = catalog.refresh

    async def no_refresh() -> None:
        return None

    monkeypatch.setattr(catalog, "refresh", no_refresh)
    statuses = await _post_many(http, endpoint, bodies(500))
    assert set(statuses) == {404}
    # Then the catalog answers and the proxy refuses unknown models itself.
    monkeypatch.setattr(catalog, "refresh", real_refresh)
    statuses = await _post_many(http, endpoint, bodies(500))
    assert set(statuses) == {404}
    # The served model keeps its own label, streamed or not.
    known = [BODY, {**BODY, "stream": True}, {**BODY, "model": None}]
    assert await _post_many(http, endpoint, known) == [200, 200, 200]

    async with http.get(server.url + "/metrics") as response:
        text = await response.text()
    assert set(_MODEL_LABEL.findall(text)) <= {MODEL, "unknown", ""}
    requests = {"endpoint": "completions", "model": "unknown", "status": "404"}
    # The worker's 404s (catalog empty) went through the flow; the proxy's own did not.
    assert metric_value(text, "pdserve_requests_total", path="disaggregated", **requests) == 500
    assert metric_value(text, "pdserve_requests_total", path="", **requests) == 500
    for name in ("pdserve_requests_total", "pdserve_e2e_latency_seconds_count"):
        assert metric_value(text, name, model=MODEL, path="disaggregated") == 2
    assert metric_value(text, "pdserve_ttft_seconds_count", model=MODEL) == 1
    assert len(server.metrics._request_children) <= 10


def test_model_label_maps_unknown_models() -> None:
    metrics = ProxyMetrics(list)
    assert metrics.model_label(MODEL) == "unknown"  # nothing served yet
    metrics.set_known_models(frozenset({MODEL}))
    assert metrics.model_label(MODEL) == MODEL
    assert metrics.model_label("other") == "unknown"
    assert metrics.model_label(None) == ""
    assert metrics.model_label("") == ""
    metrics.count_request("completions", "x" * 100, 404, "")
    metrics.count_request("completions", "y" * 100, 404, "")
    assert b'model="unknown"' in metrics.render()
    assert b"xxxx" not in metrics.render() and len(metrics._request_children) == 1


def test_fast_histogram_children_can_be_removed() -> None:
    histogram = FastHistogram("h_seconds", "doc", ["a", "b"], (0.1, 1.0))
    histogram.labels("x", "1").observe(0.5)
    histogram.labels("y", "2").observe(0.5)
    histogram.remove("x", "1")
    histogram.remove("never", "seen")  # no error
    [family] = list(histogram.collect())
    assert {s.labels["a"] for s in family.samples} == {"y"}
    assert histogram.labels("x", "1").counts == [0, 0, 0]  # a fresh child, not the old one


async def test_removed_instance_leaves_metrics(
    make_proxy: ProxyFactory,
    make_worker: WorkerFactory,
    prefill: FakeWorker,
    decode: FakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    other = await make_worker("decode")
    server = await make_proxy([prefill], [decode, other], health=FAST_HEALTH)
    admin = server.admin_url
    assert admin is not None
    assert await _post_many(http, server.url + "/v1/completions", [BODY] * 4) == [200] * 4
    # An ejection gives `other` a pdserve_ejections_total series too.
    other.faults.unhealthy = True
    await wait_for(lambda: not server.registry.require(other.url).healthy)

    async def scrape() -> str:
        async with http.get(server.url + "/metrics") as response:
            return await response.text()

    text = await scrape()
    assert other.url in _INSTANCE_LABEL.findall(text)
    labels = {"role": "decode", "instance": other.url}
    assert metric_value(text, "pdserve_routing_decisions_total", **labels) == 2
    assert metric_value(text, "pdserve_ejections_total", **labels) == 1

    async with http.delete(admin + "/admin/instances", params={"url": other.url}) as r:
        assert r.status == 200
    async with http.delete(admin + "/admin/instances", params={"url": prefill.url}) as r:
        assert r.status == 200
    text = await scrape()
    assert set(_INSTANCE_LABEL.findall(text)) == {decode.url}

    # Re-added under the same URL, it counts from zero on a live (not a stale cached) series.
    other.faults.unhealthy = False
    async with http.post(
        admin + "/admin/instances", json={"url": other.url, "role": "decode"}
    ) as r:
        assert r.status == 201
    assert await _post_many(http, server.url + "/v1/completions", [BODY] * 2) == [200] * 2
    text = await scrape()
    assert metric_value(text, "pdserve_routing_decisions_total", **labels) == 1
    assert metric_value(text, "pdserve_ejections_total", **labels) == 0


def test_late_failure_of_a_removed_instance_adds_no_series() -> None:
    """A health check that ends after its instance was removed must not revive its series."""
    from proxy.config import HealthConfig
    from proxy.health import HealthTracker

    registry = InstanceRegistry()
    metrics = ProxyMetrics(registry.instances)
    tracker = HealthTracker(registry, HealthConfig(failures_to_eject=1), metrics)
    instance = registry.add("http://127.0.0.1:9", Role.DECODE)
    registry.remove(instance.url)
    tracker.record_failure(instance, "late")
    assert b"127.0.0.1:9" not in metrics.render()
