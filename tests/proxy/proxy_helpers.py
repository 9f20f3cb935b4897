"""Helpers shared by the proxy tests (importable because tests/proxy is on sys.path)."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson

MODEL = "fake-model"
# `pdserve ...` as a child process, with this interpreter.
PDSERVE = [sys.executable, "-m", "deploy.cli"]


async def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Poll ``condition`` until true; fail the test with a clear message otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)


def sse_events(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = []
    for block in body.split(b"\n\n"):
        block = block.strip()
        if block:
            assert block.startswith(b"data: "), block
            events.append(block[len(b"data: ") :])
    return events


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
