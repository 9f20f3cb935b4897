"""Fast tests of the load generator against in-process fake workers (no vLLM).

The fake worker's pacing knobs give known delays (time to the first chunk, gap between
tokens), so the measured TTFT, ITL and E2E can be checked against them, not only for
presence. Failures of every kind must be counted in the result, never raised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from benchmarks.fake_worker import FakeWorker
from benchmarks.loadgen import LoadResult, LoadSpec, Percentiles, percentile, run_load
from deploy.worker_launch import free_port

WorkerFactory = Callable[..., Awaitable[FakeWorker]]


@pytest.fixture
async def make_worker() -> AsyncIterator[WorkerFactory]:
    started: list[FakeWorker] = []

    async def make(role: str = "decode", **kwargs: Any) -> FakeWorker:
        worker = FakeWorker(role, model="pdserve-bench", **kwargs)
        await worker.start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        await worker.stop()


def _spec(url: str, **overrides: Any) -> LoadSpec:
    settings: dict[str, Any] = {
        "base_url": url,
        "duration_s": None,
        "requests": 6,
        "warmup_per_worker": 0,
        "max_tokens": 4,
        "timeout_s": 10.0,
    }
    settings.update(overrides)
    return LoadSpec(**settings)


def _assert_ordered(stats: Percentiles) -> None:
    assert 0.0 < stats.p50 <= stats.p90 <= stats.p99 <= stats.max
    assert stats.mean <= stats.max


# -- counting -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_request_count_excludes_warmup(
    make_worker: WorkerFactory, api: str, stream: bool
) -> None:
    worker = await make_worker("decode")
    result = await run_load(
        _spec(worker.url, api=api, stream=stream, requests=7, concurrency=2, warmup_per_worker=3)
    )
    assert (result.requests, result.ok, result.errors) == (7, 7, 0)
    assert result.status_counts == {"200": 7}
    # The worker saw warm-up (3 per worker) plus measured requests, at the API's path.
    sent = worker.generate_requests()
    assert len(sent) == 7 + 2 * 3
    path = "/v1/completions" if api == "completions" else "/v1/chat/completions"
    assert {r.path for r in sent} == {path}
    body = sent[-1].body
    assert body["max_tokens"] == 4
    assert bool(body.get("stream")) is stream
    if api == "chat":
        assert body["messages"][0]["role"] == "user"
    else:
        assert isinstance(body["prompt"], str)
    assert result.e2e is not None and result.e2e.count == 7
    _assert_ordered(result.e2e)
    if stream:
        # 4 tokens, one event each; chat streams open with vLLM's role chunk.
        events = 4 + (api == "chat")
        assert result.ttft is not None and result.ttft.count == 7
        assert result.itl is not None and result.itl.count == 7 * (events - 1)
        assert result.content_events_per_request == events
    else:
        assert result.ttft is None and result.itl is None


async def test_duration_bounds_the_run(make_worker: WorkerFactory) -> None:
    worker = await make_worker("decode")
    worker.faults.delay_s = 0.02
    result = await run_load(_spec(worker.url, duration_s=0.4, requests=None, concurrency=2))
    assert result.errors == 0
    # Each worker sends back to back until the deadline: ~0.4 / 0.02 requests each.
    assert 10 <= result.requests <= 2 * 0.4 / 0.02 + 2
    assert 0.4 <= result.wall_s < 1.5
    assert result.requests_per_s == pytest.approx(result.requests / result.wall_s)


async def test_request_budget_is_shared_and_concurrency_holds(make_worker: WorkerFactory) -> None:
    worker = await make_worker("decode")
    worker.faults.delay_s = 0.1
    # Warm-up opens the connections, so connection set-up stays out of the measured rate.
    c1 = await run_load(_spec(worker.url, requests=6, concurrency=1, warmup_per_worker=1))
    worker.requests.clear()
    c4 = await run_load(_spec(worker.url, requests=16, concurrency=4, warmup_per_worker=1))
    assert (c1.ok, c4.ok) == (6, 16)
    # Four workers, each on its own keep-alive connection.
    assert len({r.peer for r in worker.generate_requests()}) == 4
    # The delay dominates, so four in flight give about four times the rate.
    assert c4.requests_per_s > 2.0 * c1.requests_per_s


# -- timing plausibility ----------------------------------------------------------------------


async def test_itl_matches_the_token_delay(make_worker: WorkerFactory) -> None:
    delay = 0.03
    worker = await make_worker("decode", token_delay_s=delay)
    result = await run_load(_spec(worker.url, stream=True, requests=5, max_tokens=8))
    assert result.ok == 5
    assert result.itl is not None and result.itl.count == 5 * 7
    _assert_ordered(result.itl)
    assert delay * 0.8 <= result.itl.p50 <= delay + max(0.015, 0.5 * delay)
    assert result.e2e is not None
    # Eight tokens with a pause after each: E2E covers at least the seven gaps.
    assert result.e2e.p50 >= 7 * delay


async def test_ttft_includes_the_first_chunk_delay(make_worker: WorkerFactory) -> None:
    worker = await make_worker("decode", token_delay_s=0.01)
    worker.faults.first_chunk_delay_s = 0.1
    result = await run_load(_spec(worker.url, stream=True, requests=4, max_tokens=5))
    assert result.ok == 4
    assert result.ttft is not None and result.e2e is not None
    _assert_ordered(result.ttft)
    assert result.ttft.p50 >= 0.1
    assert result.ttft.max < 0.1 + 0.5  # and not something unrelated, like the whole stream
    assert result.e2e.p50 >= result.ttft.p50 + 4 * 0.01 * 0.8


async def test_non_stream_e2e_includes_the_server_delay(make_worker: WorkerFactory) -> None:
    worker = await make_worker("decode")
    worker.faults.delay_s = 0.06
    result = await run_load(_spec(worker.url, stream=False, requests=4))
    assert result.ok == 4
    assert result.e2e is not None
    assert 0.06 <= result.e2e.p50 < 0.06 + 0.5


# -- failures are counted, not raised ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_http_500_is_counted(make_worker: WorkerFactory, stream: bool) -> None:
    worker = await make_worker("decode")
    worker.faults.fail_requests = 3
    result = await run_load(_spec(worker.url, stream=stream, requests=10))
    assert (result.requests, result.ok, result.errors) == (10, 7, 3)
    assert result.status_counts == {"500": 3, "200": 7}
    assert any("injected failure 500" in sample for sample in result.error_samples)
    assert result.e2e is not None and result.e2e.count == 7


async def test_all_failed_has_no_latency(make_worker: WorkerFactory) -> None:
    worker = await make_worker("decode")
    worker.faults.fail_requests = 100
    worker.faults.fail_status = 503
    result = await run_load(_spec(worker.url, stream=True, requests=4))
    assert (result.ok, result.errors) == (0, 4)
    assert result.status_counts == {"503": 4}
    assert result.e2e is None and result.ttft is None and result.itl is None
    assert result.content_events_per_request == 0.0


@pytest.mark.parametrize("stream", [False, True])
async def test_refused_connection_is_counted(stream: bool) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = await run_load(_spec(url, stream=stream, requests=3, concurrency=2))
    assert (result.requests, result.ok, result.errors) == (3, 0, 3)
    assert result.status_counts == {"client_error": 3}
    assert any("Connect" in sample for sample in result.error_samples)


async def test_stream_cut_mid_body_is_counted(make_worker: WorkerFactory) -> None:
    worker = await make_worker("decode")
    worker.faults.drop_after_chunks = 2
    result = await run_load(_spec(worker.url, stream=True, requests=3, max_tokens=6))
    assert (result.ok, result.errors) == (0, 3)
    assert result.status_counts == {"client_error": 3}
    assert result.ttft is None


async def test_hang_times_out_and_is_counted(make_worker: WorkerFactory) -> None:
    worker = await make_worker("decode")
    worker.faults.hang = True
    result = await run_load(_spec(worker.url, stream=True, requests=2, timeout_s=0.3))
    assert (result.ok, result.errors) == (0, 2)
    assert result.status_counts == {"client_error": 2}
    assert any("Timeout" in sample for sample in result.error_samples)


async def _sse_server(events: list[bytes]) -> web.AppRunner:
    """A server that sends exactly ``events`` as an SSE body and ends it cleanly."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.mark.parametrize(
    ("events", "status"),
    [
        # Content, then the body ends without data: [DONE].
        ([b'data: {"choices":[{"text":"a"}]}\n\n'], "truncated"),
        # [DONE] but never any content.
        ([b"data: [DONE]\n\n"], "truncated"),
        # An error event in the stream (what vLLM sends when generation fails midway).
        (
            [b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"error":{"message":"boom"}}\n\n'],
            "sse_error",
        ),
    ],
)
async def test_incomplete_streams_are_counted(events: list[bytes], status: str) -> None:
    runner = await _sse_server(events)
    try:
        port = runner.addresses[0][1]
        result = await run_load(_spec(f"http://127.0.0.1:{port}", stream=True, requests=3))
    finally:
        await runner.cleanup()
    assert (result.ok, result.errors) == (0, 3)
    assert result.status_counts == {status: 3}
    assert result.error_samples


# -- the summary ------------------------------------------------------------------------------


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    stats = Percentiles.of([3.0, 1.0, 2.0])
    assert stats is not None
    assert (stats.count, stats.p50, stats.max, stats.mean) == (3, 2.0, 3.0, 2.0)
    assert Percentiles.of([]) is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"concurrency": 0},
        {"duration_s": None, "requests": None},
        {"requests": 0},
        {"max_tokens": 0},
        {"base_url": "127.0.0.1:8000"},
    ],
)
async def test_bad_spec_is_rejected_before_sending(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        await run_load(_spec("http://127.0.0.1:9", **overrides))


async def test_result_serialises(make_worker: WorkerFactory) -> None:
    worker = await make_worker("decode")
    spec = _spec(worker.url, stream=True, requests=2, headers={"Authorization": "Bearer s3cret"})
    result: LoadResult = await run_load(spec)
    data = result.to_dict()
    assert data["ok"] == 2
    assert set(data["ttft"]) == {"count", "mean", "p50", "p90", "p99", "max"}
    # The API key stays out of the report.
    assert "headers" not in data["spec"]
    assert "s3cret" not in repr(data)
