"""Helpers shared by the proxy tests (importable because tests/proxy is on sys.path)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

MODEL = "fake-model"


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
