"""The controller takes instances out of service without losing requests (issue 11 item 4):
`scale` down and `restart` drain first, wait for in-flight requests and a prefill's held
KV blocks, and `restart` puts the instance back in rotation. No Ray: a real proxy (its
admin API) in-process, workers that only serve /health and /metrics, and a stand-in for
the instance actor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from deploy import controller as controller_module
from deploy import status_cli
from deploy.controller import Controller, ControllerError, InstanceRecord
from deploy.instance_actor import InstancePlan
from deploy.worker_launch import free_port
from proxy.config import ProxyConfig
from proxy.server import ProxyServer


class Worker:
    """A worker's /health and /metrics; ``blocks`` is its ``pdserve_kv_blocks_held``
    (None: the metric is not exported, as on a decode instance)."""

    def __init__(self, blocks: int | None) -> None:
        self.blocks = blocks
        self.delay_s = 0.0  # before /metrics answers
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", lambda _: web.Response())
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        lines = ["# TYPE vllm:num_requests_running gauge", "vllm:num_requests_running 0"]
        if self.blocks is not None:
            lines += [
                "# HELP pdserve_kv_blocks_held KV blocks a prefill instance holds.",
                "# TYPE pdserve_kv_blocks_held gauge",
                f'pdserve_kv_blocks_held{{engine="0",model_name="m"}} {self.blocks}.0',
            ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


class _Remote:
    """``actor.method.remote(...)`` of a Ray actor handle: an awaitable."""

    def __init__(self, method: Callable[..., Awaitable[Any]]) -> None:
        self._method = method

    def remote(self, *args: Any) -> Awaitable[Any]:
        return self._method(*args)


class FakeSupervisor:
    """The instance actor's restart_worker and wait_ready; records the calls in order."""

    def __init__(self, url: str, events: list[str]) -> None:
        self.url = url
        self.events = events
        self.release = asyncio.Event()  # restart_worker returns once set
        self.release.set()
        self.ready_error: Exception | None = None
        self.restart_worker = _Remote(self._restart_worker)
        self.wait_ready = _Remote(self._wait_ready)

    async def _restart_worker(self) -> dict[str, Any]:
        self.events.append("restart_worker")
        await self.release.wait()
        return {"url": self.url, "state": "starting"}

    async def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        self.events.append("wait_ready")
        if self.ready_error is not None:
            raise self.ready_error
        return {"url": self.url, "state": "ready", "planned_restarts": 1}


@pytest.fixture
async def proxy() -> AsyncIterator[ProxyServer]:
    config = {"port": 0, "admin": {"port": 0}, "health": {"interval_s": 60.0}}
    server = ProxyServer(ProxyConfig.model_validate(config))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def workers() -> AsyncIterator[Callable[[int | None], Awaitable[Worker]]]:
    started: list[Worker] = []

    async def make(blocks: int | None) -> Worker:
        worker = Worker(blocks)
        await worker.start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        await worker.stop()


@pytest.fixture
async def controller(tmp_path: Path, proxy: ProxyServer) -> AsyncIterator[Controller]:
    topology = {
        "proxy": {"admin": {"port": proxy.admin_port}},
        "controller": {"drain_timeout_s": 30.0},
    }
    made = Controller(topology, str(tmp_path))
    # start_proxy() makes these; it also starts a proxy actor, which needs Ray.
    made._sync_lock, made._scale_lock = asyncio.Lock(), asyncio.Lock()
    yield made
    if made._http is not None:
        await made._http.close()


def add_instance(
    controller: Controller, proxy: ProxyServer, name: str, url: str, events: list[str]
) -> InstanceRecord:
    role, _, index = name.partition("-")
    plan = InstancePlan(
        name=name,
        role=role,
        index=int(index),
        model="/m",
        host="127.0.0.1",
        api_port=int(url.rsplit(":", 1)[1]),
        kv_port=None,
        cpu_core=None,
        kv_cache_gib=1,
        accelerator="cpu",
        run_dir="/tmp",
        engine_id=name,
    )
    record = InstanceRecord(
        plan=plan,
        actor=FakeSupervisor(url, events),
        group="g",
        state="running",
        ever_ready=True,
        url=url,
    )
    controller._records[name] = record
    proxy.add_instance(url, role)
    return record


def stop_recorder(controller: Controller, events: list[str]) -> None:
    async def stop_actor(record: InstanceRecord) -> None:
        events.append(f"stop {record.plan.name}")

    controller._stop_actor = stop_actor  # type: ignore[method-assign]


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_retiring_a_prefill_waits_for_its_requests_then_its_kv_blocks(
    controller: Controller,
    proxy: ProxyServer,
    workers: Callable[[int | None], Awaitable[Worker]],
) -> None:
    events: list[str] = []
    stop_recorder(controller, events)
    worker = await workers(3)
    record = add_instance(controller, proxy, "prefill-1", worker.url, events)
    instance = proxy.registry.require(worker.url)
    instance.in_flight_requests = 1
    retiring = asyncio.create_task(controller._retire(record))
    await until(lambda: instance.draining)
    assert proxy.registry.routable(instance.role) == []  # nothing new goes there
    assert record.state == "draining"

    await asyncio.sleep(0.5)
    assert not retiring.done() and events == []
    instance.in_flight_requests = 0  # the prefill leg answered; the decode has not pulled
    await asyncio.sleep(0.5)
    assert not retiring.done() and events == []
    assert proxy.registry.get(worker.url) is instance  # registered while it drains

    worker.blocks = 0  # pulled
    await asyncio.wait_for(retiring, 5)
    assert events == ["stop prefill-1"]
    assert proxy.registry.get(worker.url) is None
    assert "prefill-1" not in controller._records


async def test_a_decode_drain_ends_with_its_requests(
    controller: Controller,
    proxy: ProxyServer,
    workers: Callable[[int | None], Awaitable[Worker]],
) -> None:
    events: list[str] = []
    stop_recorder(controller, events)
    worker = await workers(None)
    record = add_instance(controller, proxy, "decode-1", worker.url, events)
    instance = proxy.registry.require(worker.url)
    instance.in_flight_requests = 2
    retiring = asyncio.create_task(controller._retire(record))
    await asyncio.sleep(0.5)
    assert not retiring.done()
    instance.in_flight_requests = 0
    await asyncio.wait_for(retiring, 5)
    assert events == ["stop decode-1"]


async def test_drain_timeout_stops_it_anyway_and_says_what_was_left(
    tmp_path: Path,
    proxy: ProxyServer,
    workers: Callable[[int | None], Awaitable[Worker]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    topology = {
        "proxy": {"admin": {"port": proxy.admin_port}},
        "controller": {"drain_timeout_s": 0.5},
    }
    controller = Controller(topology, str(tmp_path))
    controller._sync_lock, controller._scale_lock = asyncio.Lock(), asyncio.Lock()
    events: list[str] = []
    stop_recorder(controller, events)
    try:
        stuck = await workers(4)
        record = add_instance(controller, proxy, "prefill-1", stuck.url, events)
        proxy.registry.require(stuck.url).in_flight_requests = 1
        with caplog.at_level(logging.WARNING, logger="deploy.controller"):
            await asyncio.wait_for(controller._retire(record), 5)
        assert events == ["stop prefill-1"]
        [warning] = [r for r in caplog.records if r.name == "deploy.controller"]
        assert warning.levelno == logging.WARNING
        text = warning.getMessage()
        assert "prefill-1" in text and stuck.url in text and "drain timed out" in text
        assert "1 request(s) in flight" in text and "4 KV block(s) held" in text
    finally:
        if controller._http is not None:
            await controller._http.close()


async def test_a_prefill_too_busy_to_answer_is_waited_for_and_a_dead_one_is_not(
    tmp_path: Path,
    proxy: ProxyServer,
    workers: Callable[[int | None], Awaitable[Worker]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(controller_module, "_METRICS_TIMEOUT_S", 0.1)
    topology = {
        "proxy": {"admin": {"port": proxy.admin_port}},
        "controller": {"drain_timeout_s": 0.6},
    }
    controller = Controller(topology, str(tmp_path))
    try:
        busy = await workers(0)
        busy.delay_s = 1.0
        record = add_instance(controller, proxy, "prefill-1", busy.url, [])
        with caplog.at_level(logging.WARNING, logger="deploy.controller"):
            result = await controller._wait_drained(record, "retiring it")
        assert result.timed_out and result.seconds >= 0.6
        assert result.kv_blocks_held is None
        [warning] = [r for r in caplog.records if r.name == "deploy.controller"]
        assert "0 request(s) in flight, unknown KV block(s) held" in warning.getMessage()

        dead_port = free_port()  # nothing listens: a stopped worker holds nothing
        record = add_instance(controller, proxy, "prefill-2", f"http://127.0.0.1:{dead_port}", [])
        result = await controller._wait_drained(record, "retiring it")
        assert not result.timed_out and result.seconds < 0.5
    finally:
        if controller._http is not None:
            await controller._http.close()


async def test_restart_drains_waits_restarts_and_puts_it_back(
    controller: Controller,
    proxy: ProxyServer,
    workers: Callable[[int | None], Awaitable[Worker]],
) -> None:
    events: list[str] = []
    worker = await workers(None)
    other = await workers(None)
    record = add_instance(controller, proxy, "decode-0", worker.url, events)
    add_instance(controller, proxy, "decode-1", other.url, events)
    actor: FakeSupervisor = record.actor
    actor.release.clear()
    instance = proxy.registry.require(worker.url)
    instance.in_flight_requests = 1
    restarting = asyncio.create_task(controller.restart("decode-0"))
    await until(lambda: instance.draining)
    assert record.state == "restarting"
    assert [i.url for i in proxy.registry.routable(instance.role)] == [other.url]
    await asyncio.sleep(0.5)
    assert events == []  # not stopped while a request is on it

    # The reconcile loop leaves it alone: not removed, not undrained.
    await controller._sync_proxy()
    assert proxy.registry.get(worker.url) is instance and instance.draining

    instance.in_flight_requests = 0
    await until(lambda: events == ["restart_worker"])
    # The proxy restarted meanwhile and lost it: it is not registered again while the
    # worker restarts.
    proxy.remove_instance(worker.url)
    await controller._sync_proxy()
    assert proxy.registry.get(worker.url) is None
    assert proxy.registry.get(other.url) is not None

    actor.release.set()
    result = await asyncio.wait_for(restarting, 5)
    assert events == ["restart_worker", "wait_ready"]
    assert record.state == "running" and record.info["planned_restarts"] == 1
    back = proxy.registry.require(worker.url)  # registered again, in rotation
    assert not back.draining and back in proxy.registry.routable(back.role)
    assert result["name"] == "decode-0" and result["url"] == worker.url
    assert result["drain_timed_out"] is False and result["in_flight_at_stop"] == 0
    assert result["drain_seconds"] >= 0.5 and result["seconds"] >= result["drain_seconds"]
    assert result["readmitted"] is True and result["undrained"] is True
    line = status_cli_line(result)
    assert line.startswith(f"pdserve restart: decode-0 restarted on {worker.url} in 7.5 s (")
    assert "back in rotation" in line and "\n" not in line


def status_cli_line(result: dict[str, Any]) -> str:
    from deploy.restart_cli import summary

    return summary(result, 7.5)


async def test_restarting_a_prefill_waits_for_its_kv_blocks(
    controller: Controller,
    proxy: ProxyServer,
    workers: Callable[[int | None], Awaitable[Worker]],
) -> None:
    events: list[str] = []
    worker = await workers(2)
    add_instance(controller, proxy, "prefill-0", worker.url, events)
    restarting = asyncio.create_task(controller.restart("prefill-0"))
    await until(lambda: proxy.registry.require(worker.url).draining)
    await asyncio.sleep(0.5)
    assert events == []
    worker.blocks = 0
    result = await asyncio.wait_for(restarting, 5)
    assert events == ["restart_worker", "wait_ready"]
    assert result["kv_blocks_at_stop"] == 0


async def test_restart_that_does_not_come_back_is_an_error_and_leaves_it_in_rotation(
    controller: Controller,
    proxy: ProxyServer,
    workers: Callable[[int | None], Awaitable[Worker]],
) -> None:
    worker = await workers(None)
    record = add_instance(controller, proxy, "decode-0", worker.url, [])
    record.actor.ready_error = TimeoutError("decode-0: worker not ready after 600 s")
    with pytest.raises(ControllerError) as caught:
        await controller.restart("decode-0")
    message = str(caught.value)
    assert message.startswith("decode-0 did not come back after its restart: ")
    assert "worker not ready after 600 s" in message and "\n" not in message
    # Its supervisor keeps trying; the proxy's health checks decide when it serves again.
    assert record.state == "running"
    assert proxy.registry.require(worker.url).draining is False


async def test_restart_of_an_unknown_or_leaving_instance_is_refused(
    controller: Controller,
    proxy: ProxyServer,
    workers: Callable[[int | None], Awaitable[Worker]],
) -> None:
    worker = await workers(None)
    record = add_instance(controller, proxy, "decode-0", worker.url, [])
    with pytest.raises(ControllerError, match=r"^no instance 'decode-7' \(instances: decode-0\)$"):
        await controller.restart("decode-7")
    record.state = "draining"
    with pytest.raises(ControllerError, match="decode-0 is draining; only a running instance"):
        await controller.restart("decode-0")
    assert record.actor.events == []
    assert proxy.registry.require(worker.url).draining is False


def test_status_shows_restarting_and_draining(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_cli, "kv_blocks_held", lambda url: None)
    instance = {
        "name": "decode-0",
        "role": "decode",
        "url": "http://127.0.0.1:8200",
        "controller_state": "restarting",
        "state": "starting",
        "restarts": 0,
        "planned_restarts": 1,
    }
    proxy_view = {"healthy": False, "draining": True, "in_flight_requests": 0}
    row = status_cli._row(instance, proxy_view)
    assert (row["state"], row["health"]) == ("restarting/starting", "ejected,draining")
    assert (row["restarts"], row["planned_restarts"]) == (0, 1)
    table = status_cli.format_table([row])
    assert "restarting/starting" in table and "0 (+1 planned)" in table
    retiring = {**instance, "controller_state": "draining", "state": "ready", "planned_restarts": 0}
    row = status_cli._row(retiring, {**proxy_view, "healthy": True})
    assert (row["state"], row["health"]) == ("draining", "healthy,draining")
    assert status_cli.format_table([row]).splitlines()[1].endswith("  0")
