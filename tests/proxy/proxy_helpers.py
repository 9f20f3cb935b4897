"""Helpers shared by the proxy tests (importable because tests/proxy is on sys.path)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from kv_transfer import params as kvp

if TYPE_CHECKING:
    from kv_transfer.leases import LeaseTable
    from proxy.server import ProxyServer

MODEL = "fake-model"
# The KV secret of the tests' real block servers (conftest's kv_server) and their proxies.
KV_SECRET = b"proxy-test-secret"
# `pdserve ...` as a child process, with this interpreter.
PDSERVE = [sys.executable, "-m", "deploy.cli"]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def openai_body(path: str, stream: bool, content: str, **extra: Any) -> dict[str, Any]:
    """A client's request to ``path``: ``content`` as the chat message or the prompt;
    ``extra`` adds or overrides fields."""
    body: dict[str, Any] = {"model": MODEL, "stream": stream}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = content
    return {**body, **extra}


async def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Poll ``condition`` until true; fail the test with a clear message otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)


async def assert_no_load_left(server: ProxyServer) -> None:
    """Every attempt gave back the in-flight counts it took."""
    instances = server.registry.instances()
    await wait_for(
        lambda: all(
            (i.in_flight_requests, i.in_flight_tokens, i.queued_prompt_tokens) == (0, 0, 0)
            for i in instances
        )
    )


def sse_events(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = []
    for block in body.split(b"\n\n"):
        block = block.strip()
        if block:
            assert block.startswith(b"data: "), block
            events.append(block[len(b"data: ") :])
    return events


_TOKEN_ID_LISTS = re.compile(rb'"(prompt_)?token_ids":\[[^\]]*\]')


def without_token_ids(stream: bytes) -> bytes:
    """A vLLM SSE body sent for ``return_token_ids: true`` as it would have been without:
    both id fields ``null`` (vLLM always writes them in completions chunks)."""
    return _TOKEN_ID_LISTS.sub(rb'"\1token_ids":null', stream)


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text; 0.0 when absent (counters not yet touched)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        pairs = dict(
            item.split("=", 1) for item in label_text.rstrip("}").split(",") if "=" in item
        )
        if all(pairs.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return 0.0


def fetch(url: str, body: Any = None) -> tuple[int, Any]:
    """Blocking GET (or POST of ``body`` as JSON): the status and the parsed JSON answer."""
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, orjson.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"null")


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    """Block until ``url`` answers HTTP at all (any status)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            fetch(url)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up within {timeout_s}s")


def kv_params_at(kv_port: int) -> dict[str, Any]:
    """kv_transfer_params fields that point a fake prefill's answers at a real KV block
    server (conftest's ``kv_server``), so the proxy's releases of them reach it. Each
    answer keeps its own ``remote_request_id``."""
    return {
        "transfer_mode": kvp.TRANSFER_MODE,
        "remote_host": "127.0.0.1",
        "remote_port": kv_port,
    }


def kv_releases(server: ProxyServer, outcome: str) -> float:
    """pdserve_kv_releases_total{outcome} of a proxy."""
    text = server.metrics.render().decode()
    return metric_value(text, "pdserve_kv_releases_total", outcome=outcome)


def was_released(leases: LeaseTable, params: dict[str, Any]) -> bool:
    """Whether the block server behind ``leases`` was told to release ``params``' blocks.

    Fake prefills hold nothing, so the release of an id is remembered until its hold
    arrives and then ends that hold at once; this adds the hold and looks."""
    request_id = str(params["remote_request_id"])
    leases.add(request_id, [1], time.time() + 60)
    return not leases.holds(request_id)
