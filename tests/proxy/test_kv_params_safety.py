"""Only the proxy sets kv_transfer_params, and it says what the decode did with the KV."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import ProxyFactory, WorkerFactory
from proxy_helpers import MODEL, metric_value

from benchmarks.fake_worker import FakeWorker
from proxy.server import ProxyServer

FORGED = {
    "do_remote_prefill": True,
    "remote_host": "198.51.100.7",
    "remote_port": 6666,
    "remote_request_id": "victim",
    "remote_block_ids": [1, 2, 3],
}
LONG_PROMPT = "tell me a story about a cat " * 8


def _body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 3, **extra}


@pytest.mark.parametrize(
    "case",
    ["disaggregated", "n>1", "short-prompt", "no-prefill"],
)
async def test_client_kv_transfer_params_never_reach_a_worker(
    make_worker: WorkerFactory,
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    case: str,
) -> None:
    prefill = await make_worker("prefill")
    decode = await make_worker("decode", tokens=4)
    overrides: dict[str, object] = {}
    extra: dict[str, object] = {}
    if case == "n>1":
        extra["n"] = 2
    elif case == "short-prompt":
        overrides["disagg_min_prompt_tokens"] = 10_000
    proxy = await make_proxy([] if case == "no-prefill" else [prefill], [decode], **overrides)
    body = _body(kv_transfer_params=FORGED, ec_transfer_params={"x": 1}, **extra)
    async with http.post(proxy.url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
    legs = prefill.generate_requests() + decode.generate_requests()
    assert legs
    for leg in legs:
        assert "ec_transfer_params" not in leg.body
        params = leg.body.get("kv_transfer_params")
        assert params != FORGED
        if params is not None:  # only what the proxy itself put there
            assert params in ({"do_remote_decode": True}, *prefill.kv_issued)


@pytest.mark.parametrize(
    ("reported", "outcome"),
    [("transferred", "transferred"), ("recomputed", "recomputed"), (None, "unreported")],
)
async def test_non_streamed_handoff_outcome_is_counted(
    make_worker: WorkerFactory,
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    prefill: FakeWorker,
    reported: str | None,
    outcome: str,
) -> None:
    decode = await make_worker("decode", tokens=4, kv_outcome=reported)
    proxy = await make_proxy([prefill], [decode])
    async with http.post(proxy.url + "/v1/completions", json=_body()) as response:
        assert response.status == 200
    text = proxy.metrics.render().decode()
    assert metric_value(text, "pdserve_kv_handoffs_total", outcome=outcome) == 1
    others = {"transferred", "local_cache", "recomputed", "unreported"} - {outcome}
    assert all(metric_value(text, "pdserve_kv_handoffs_total", outcome=o) == 0 for o in others)


async def test_streamed_handoff_counts_as_unreported(
    proxy: ProxyServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(proxy.url + "/v1/completions", json=_body(stream=True)) as response:
        assert response.status == 200
        await response.read()
    text = proxy.metrics.render().decode()
    assert metric_value(text, "pdserve_kv_handoffs_total", outcome="unreported") == 1
