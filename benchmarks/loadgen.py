"""A small async OpenAI load generator: fixed concurrency, for a duration or a request count.

Each of ``concurrency`` workers sends requests back to back over its own keep-alive
connection, so the offered load is closed-loop (like ``wrk -c N``). Measured per
request: TTFT (stream: first ``data:`` event with content; non-stream: not defined),
inter-token latency (gaps between content events), and end-to-end latency.

The client is deliberately cheap: it does not parse SSE payloads as JSON, it only
splits lines and looks at the ``data:`` prefix, because on a small box the load
generator shares the cores with what it measures.

A library (:func:`run_load`) for ``pdserve bench proxy``, which needs a client that costs
next to nothing on the cores it shares with the proxy it measures. Serving load against
real engines is vLLM's own benchmark (``vllm bench serve``, see
:mod:`benchmarks.vllm_bench`), which replaced this module's command line: same closed loop
with ``--max-concurrency N --request-rate inf``, open loop with ``--request-rate``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

Api = Literal["completions", "chat"]

_DATA = b"data:"
_DONE = b"[DONE]"
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog again and again today."
# Keep a handful of distinct error messages, not one per failed request.
_MAX_ERROR_SAMPLES = 5


@dataclass(slots=True)
class LoadSpec:
    """What to send, how hard, and for how long."""

    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1 suffix)
    api: Api = "completions"
    stream: bool = False
    concurrency: int = 1
    # Stop after duration_s seconds or after `requests` requests, whichever comes first;
    # at least one of them must be set.
    duration_s: float | None = 10.0
    requests: int | None = None
    # Requests per worker sent before measuring (connection set-up, caches, JIT-free warm path).
    warmup_per_worker: int = 2
    model: str = "pdserve-bench"
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 16
    # Extra body fields merged into every request (e.g. {"ignore_eos": true}).
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0
    # Include stream_options.include_usage on streamed requests.
    include_usage: bool = False

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.duration_s is None and self.requests is None:
            raise ValueError("set duration_s or requests (or both)")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {self.api!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")

    @property
    def path(self) -> str:
        return "/v1/completions" if self.api == "completions" else "/v1/chat/completions"

    def body(self) -> bytes:
        payload: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens}
        if self.api == "completions":
            payload["prompt"] = self.prompt
        else:
            payload["messages"] = [{"role": "user", "content": self.prompt}]
        if self.stream:
            payload["stream"] = True
            if self.include_usage:
                payload["stream_options"] = {"include_usage": True}
        payload.update(self.extra_body)
        return orjson.dumps(payload)


@dataclass(slots=True)
class Percentiles:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        if not values:
            return None
        ordered = sorted(values)
        return cls(
            count=len(ordered),
            mean=math.fsum(ordered) / len(ordered),
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            max=ordered[-1],
        )


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted, non-empty sequence."""
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass(slots=True)
class LoadResult:
    spec: dict[str, Any]
    requests: int  # measured requests (warm-up excluded)
    ok: int
    errors: int
    status_counts: dict[str, int]
    error_samples: list[str]
    wall_s: float
    requests_per_s: float
    # Seconds; None where not defined (TTFT/ITL for non-stream) or nothing succeeded.
    e2e: Percentiles | None
    ttft: Percentiles | None
    itl: Percentiles | None
    content_events_per_request: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Samples:
    e2e: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    events: int = 0
    ok: int = 0
    errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)

    def error(self, status: str, message: str) -> None:
        self.errors += 1
        self.statuses[status] += 1
        if len(self.error_samples) < _MAX_ERROR_SAMPLES and message not in self.error_samples:
            self.error_samples.append(message)


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run one closed-loop load test and summarise it. Never raises for request failures."""
    spec.validate()
    url = spec.base_url.rstrip("/") + spec.path
    body = spec.body()
    headers = {"Content-Type": "application/json", **spec.headers}
    connector = aiohttp.TCPConnector(
        limit=spec.concurrency, limit_per_host=spec.concurrency, force_close=False
    )
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    samples = _Samples()
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers, skip_auto_headers=("User-Agent",)
    ) as session:
        send = _send_stream if spec.stream else _send_plain
        warmup = _Samples()
        await asyncio.gather(
            *(
                _worker(session, send, url, body, warmup, None, spec.warmup_per_worker)
                for _ in range(spec.concurrency)
            )
        )
        budget = _Budget(spec.requests)
        start = time.perf_counter()
        deadline = start + spec.duration_s if spec.duration_s is not None else None
        await asyncio.gather(
            *(
                _worker(session, send, url, body, samples, deadline, None, budget)
                for _ in range(spec.concurrency)
            )
        )
        wall = time.perf_counter() - start
    measured = samples.ok + samples.errors
    return LoadResult(
        spec=_spec_summary(spec),
        requests=measured,
        ok=samples.ok,
        errors=samples.errors,
        status_counts=dict(samples.statuses),
        error_samples=samples.error_samples,
        wall_s=wall,
        requests_per_s=measured / wall if wall > 0 else 0.0,
        e2e=Percentiles.of(samples.e2e),
        ttft=Percentiles.of(samples.ttft),
        itl=Percentiles.of(samples.itl),
        content_events_per_request=samples.events / samples.ok if samples.ok else 0.0,
    )


def _spec_summary(spec: LoadSpec) -> dict[str, Any]:
    summary = asdict(spec)
    summary.pop("headers", None)  # may carry an API key
    return summary


class _Budget:
    """Shared request count across workers (None = unlimited)."""

    __slots__ = ("left",)

    def __init__(self, total: int | None) -> None:
        self.left = total

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def _worker(
    session: aiohttp.ClientSession,
    send: Any,
    url: str,
    body: bytes,
    samples: _Samples,
    deadline: float | None,
    count: int | None,
    budget: _Budget | None = None,
) -> None:
    sent = 0
    clock = time.perf_counter
    while True:
        if count is not None and sent >= count:
            return
        if deadline is not None and clock() >= deadline:
            return
        if budget is not None and not budget.take():
            return
        sent += 1
        await send(session, url, body, samples)


async def _send_plain(
    session: aiohttp.ClientSession, url: str, body: bytes, samples: _Samples
) -> None:
    clock = time.perf_counter
    started = clock()
    try:
        async with session.post(url, data=body) as response:
            payload = await response.read()
            elapsed = clock() - started
            if response.status != 200:
                samples.error(str(response.status), payload[:200].decode("utf-8", "replace"))
                return
    except (aiohttp.ClientError, TimeoutError) as exc:
        samples.error("client_error", f"{type(exc).__name__}: {exc}")
        return
    samples.ok += 1
    samples.statuses["200"] += 1
    samples.e2e.append(elapsed)


async def _send_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, samples: _Samples
) -> None:
    clock = time.perf_counter
    started = clock()
    first: float | None = None
    previous = 0.0
    gaps: list[float] = []
    events = 0
    saw_done = False
    error_event: bytes | None = None
    try:
        async with session.post(url, data=body) as response:
            if response.status != 200:
                payload = await response.read()
                samples.error(str(response.status), payload[:200].decode("utf-8", "replace"))
                return
            async for line in response.content:
                if not line.startswith(_DATA):
                    continue
                data = line[len(_DATA) :].strip()
                if data == _DONE:
                    saw_done = True
                    continue
                if data.startswith(b'{"error"'):
                    error_event = data
                    continue
                now = clock()
                if first is None:
                    first = now
                else:
                    gaps.append(now - previous)
                previous = now
                events += 1
            elapsed = clock() - started
    except (aiohttp.ClientError, TimeoutError) as exc:
        samples.error("client_error", f"{type(exc).__name__}: {exc}")
        return
    if error_event is not None:
        samples.error("sse_error", error_event[:200].decode("utf-8", "replace"))
        return
    if not saw_done or first is None:
        samples.error("truncated", "stream ended without content or without data: [DONE]")
        return
    samples.ok += 1
    samples.statuses["200"] += 1
    samples.e2e.append(elapsed)
    samples.ttft.append(first - started)
    samples.itl.extend(gaps)
    samples.events += events
