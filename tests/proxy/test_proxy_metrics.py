"""/metrics: the contract's names and labels, and values that follow the traffic."""

from __future__ import annotations

import aiohttp
from proxy_helpers import MODEL, metric_value

from benchmarks.fake_worker import FakeWorker
from proxy.server import ProxyServer


async def test_metrics_follow_a_streamed_pd_request(
    proxy: ProxyServer, prefill: FakeWorker, decode: FakeWorker, http: aiohttp.ClientSession
) -> None:
    decode.token_delay_s = 0.01  # tokens arrive as separate chunks
    body = {"model": MODEL, "prompt": "count me in", "max_tokens": 4, "stream": True}
    async with http.post(proxy.url + "/v1/completions", json=body) as response:
        await response.read()
    async with http.get(proxy.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()

    def value(name: str, **labels: str) -> float:
        return metric_value(text, name, **labels)

    request = {"endpoint": "completions", "model": MODEL}
    assert value("pdserve_requests_total", status="200", path="disaggregated", **request) == 1
    assert value("pdserve_ttft_seconds_count", path="disaggregated", **request) == 1
    assert value("pdserve_e2e_latency_seconds_count", path="disaggregated", **request) == 1
    # Four paced tokens: at least three gaps after the first chunk.
    assert value("pdserve_inter_token_latency_seconds_count", **request) >= 3
    for stage in ("prefill", "handoff", "decode_first_token"):
        assert value("pdserve_stage_latency_seconds_count", stage=stage) == 1
    for role, worker in (("prefill", prefill), ("decode", decode)):
        labels = {"role": role, "instance": worker.url}
        assert value("pdserve_routing_decisions_total", policy="round_robin", **labels) == 1
        assert value("pdserve_instance_healthy", **labels) == 1
        assert value("pdserve_instance_in_flight_requests", **labels) == 0
        assert value("pdserve_instance_in_flight_tokens", **labels) == 0
    # Counters with known label values are exported from the start, at zero.
    for stage in ("prefill", "decode"):
        assert f'pdserve_retries_total{{stage="{stage}"}} 0.0' in text
    for stage in ("before_first_byte", "mid_stream"):
        for outcome in ("succeeded", "failed"):
            labels = f'outcome="{outcome}",stage="{stage}"'
            assert f"pdserve_migrations_total{{{labels}}} 0.0" in text
    for stage in ("connect", "prefill", "first_byte", "stall"):
        assert f'pdserve_timeouts_total{{stage="{stage}"}} 0.0' in text
    # No request ids as labels.
    assert "request_id" not in text


async def test_rejected_requests_are_counted(
    proxy: ProxyServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(proxy.url + "/v1/chat/completions", data=b"nope") as response:
        assert response.status == 400
    async with http.get(proxy.url + "/metrics") as response:
        text = await response.text()
    labels = {"endpoint": "chat_completions", "model": "", "status": "400", "path": ""}
    assert metric_value(text, "pdserve_requests_total", **labels) == 1
