"""Real vLLM CPU engines hand off KV through the connector (direct HTTP, no proxy).

The request bodies are the ones the proxy sends: a prefill leg with max_tokens 1,
stream false and ``kv_transfer_params: {"do_remote_decode": true}``, then the
original request to the decode engine with the params the prefill returned.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kv_engines import BLOCK_SIZE, LEASE_S, MODEL_NAME, Engine, PDEngines

from kv_transfer import wire

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

MAX_TOKENS = 12
# Tiny model: 2 layers x [2 kv heads, 32 tokens, 2*32] float32 per block.
BLOCK_BYTES_ALL_LAYERS = 2 * (2 * BLOCK_SIZE * 64 * 4)
METRICS = (
    "pdserve_kv_transfer_bytes_total",
    "pdserve_kv_transfer_seconds_count",
    "pdserve_kv_transfer_failures_total",
    "pdserve_kv_blocks_held",
    "pdserve_kv_leases_expired_total",
)


def prompt_of(num_tokens: int, salt: int) -> list[int]:
    # Ids inside the tiny vocabulary (~580 tokens); the salt keeps tests' prefixes apart.
    return [5 + (salt * 131 + i * 17) % 480 for i in range(num_tokens)]


def completion(prompt: list[int], max_tokens: int = MAX_TOKENS, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": False,
        **extra,
    }


def prefill_leg(prefill: Engine, body: dict[str, Any]) -> dict[str, Any]:
    leg = dict(body, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    if "messages" in body:
        leg["max_completion_tokens"] = 1
    response = prefill.post(
        "/v1/chat/completions" if "messages" in body else "/v1/completions", leg
    )
    params = response.get("kv_transfer_params")
    assert params and params["do_remote_prefill"] is True, response
    return dict(params)


def decode_leg(decode: Engine, body: dict[str, Any], params: dict[str, Any]) -> str:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = decode.post(path, dict(body, kv_transfer_params=params))
    return text_of(response)


def text_of(response: dict[str, Any]) -> str:
    choice = response["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def aggregated(engines: PDEngines, body: dict[str, Any]) -> str:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    return text_of(engines.aggregated.post(path, body))


def disaggregated(engines: PDEngines, body: dict[str, Any]) -> str:
    return decode_leg(engines.decode, body, prefill_leg(engines.prefill, body))


def wait_blocks_released(prefill: Engine, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if prefill.metric("pdserve_kv_blocks_held") == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"prefill still holds {prefill.metric('pdserve_kv_blocks_held')} blocks")


@pytest.mark.parametrize(
    "num_tokens",
    [20, BLOCK_SIZE, BLOCK_SIZE + 1, 8 * BLOCK_SIZE + 5],
    ids=["inside-first-block", "on-block-boundary", "one-past-boundary", "nine-blocks"],
)
def test_pd_output_is_token_identical_to_aggregated(pd_engines: PDEngines, num_tokens: int) -> None:
    body = completion(prompt_of(num_tokens, salt=num_tokens))
    expected = aggregated(pd_engines, body)
    bytes_before = pd_engines.decode.metric("pdserve_kv_transfer_bytes_total")
    assert disaggregated(pd_engines, body) == expected
    blocks = -(-num_tokens // BLOCK_SIZE)
    wait_blocks_released(pd_engines.prefill)
    # Stats reach /metrics with the engine's next stats update; poll briefly.
    deadline = time.monotonic() + 10
    pulled = 0.0
    while time.monotonic() < deadline:
        pulled = pd_engines.decode.metric("pdserve_kv_transfer_bytes_total") - bytes_before
        if pulled:
            break
        time.sleep(0.2)
    assert pulled == blocks * BLOCK_BYTES_ALL_LAYERS


def test_sixteen_concurrent_requests(pd_engines: PDEngines) -> None:
    bodies = [completion(prompt_of(30 + 23 * i, salt=1000 + i)) for i in range(16)]
    expected = [aggregated(pd_engines, b) for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda b: disaggregated(pd_engines, b), bodies))
    assert got == expected
    wait_blocks_released(pd_engines.prefill)


def test_chat_completion(pd_engines: PDEngines) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {
                "role": "user",
                "content": "Explain prefill and decode in simple words, step by step.",
            },
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    assert disaggregated(pd_engines, body) == aggregated(pd_engines, body)
    wait_blocks_released(pd_engines.prefill)


def test_decode_with_a_cached_prefix_pulls_only_the_rest(pd_engines: PDEngines) -> None:
    shared = prompt_of(4 * BLOCK_SIZE, salt=77)
    # Warm the decode engine's prefix cache with the first four blocks.
    pd_engines.decode.post("/v1/completions", completion(shared, max_tokens=1))
    body = completion(shared + prompt_of(100, salt=78))
    expected = aggregated(pd_engines, body)
    bytes_before = pd_engines.decode.metric("pdserve_kv_transfer_bytes_total")
    assert disaggregated(pd_engines, body) == expected
    wait_blocks_released(pd_engines.prefill)
    deadline = time.monotonic() + 10
    pulled = 0.0
    while time.monotonic() < deadline and not pulled:
        pulled = pd_engines.decode.metric("pdserve_kv_transfer_bytes_total") - bytes_before
        time.sleep(0.2)
    total_blocks = -(-(4 * BLOCK_SIZE + 100) // BLOCK_SIZE)
    assert pulled == (total_blocks - 4) * BLOCK_BYTES_ALL_LAYERS


def test_unpulled_prefill_is_released_at_lease_expiry(pd_engines: PDEngines) -> None:
    prefill = pd_engines.prefill
    expired_before = prefill.metric("pdserve_kv_leases_expired_total")
    params = prefill_leg(prefill, completion(prompt_of(70, salt=5)))
    assert params["remote_blocks_expiry_time"] > time.time()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and prefill.metric("pdserve_kv_blocks_held") < 3:
        time.sleep(0.2)
    assert prefill.metric("pdserve_kv_blocks_held") >= 3
    wait_blocks_released(prefill, timeout_s=LEASE_S + 20)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if prefill.metric("pdserve_kv_leases_expired_total") > expired_before:
            break
        time.sleep(0.2)
    assert prefill.metric("pdserve_kv_leases_expired_total") == expired_before + 1


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_decode_pointing_at_a_dead_prefill_recomputes(pd_engines: PDEngines) -> None:
    """The decode engine runs kv_load_failure_policy=recompute: same output, no hang."""
    body = completion(prompt_of(90, salt=9))
    expected = aggregated(pd_engines, body)
    params = prefill_leg(pd_engines.prefill, body)
    params["remote_port"] = _dead_port()
    failures_before = pd_engines.decode.metric("pdserve_kv_transfer_failures_total")
    started = time.monotonic()
    assert decode_leg(pd_engines.decode, body, params) == expected
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pd_engines.decode.metric("pdserve_kv_transfer_failures_total") > failures_before:
            break
        time.sleep(0.2)
    assert pd_engines.decode.metric("pdserve_kv_transfer_failures_total") > failures_before
    # Nobody can release the real prefill's blocks now; the lease does.
    wait_blocks_released(pd_engines.prefill, timeout_s=LEASE_S + 20)


def test_wrong_secret_is_refused_and_serving_continues(pd_engines: PDEngines) -> None:
    assert pd_engines.prefill.kv_port is not None
    with socket.create_connection(("127.0.0.1", pd_engines.prefill.kv_port), timeout=10) as sock:
        challenge = wire.recv_frame(sock)
        nonce = wire.new_nonce()
        wire.send_frame(
            sock,
            {
                "op": "hello",
                "v": wire.PROTOCOL_VERSION,
                "nonce": nonce,
                "mac": wire.client_mac(b"not-the-secret", challenge["nonce"], nonce),
                "fingerprint": {},
            },
        )
        reply = wire.recv_frame(sock)
    assert reply["op"] == "error" and reply["code"] == wire.ERR_AUTH
    body = completion(prompt_of(40, salt=11))
    assert disaggregated(pd_engines, body) == aggregated(pd_engines, body)
    wait_blocks_released(pd_engines.prefill)


def test_transfer_metrics_are_on_both_workers_metrics(pd_engines: PDEngines) -> None:
    body = completion(prompt_of(50, salt=12))
    disaggregated(pd_engines, body)
    wait_blocks_released(pd_engines.prefill)
    for engine in (pd_engines.prefill, pd_engines.decode):
        text = engine.metrics_text()
        for name in METRICS:
            assert f'{name}{{engine="0",model_name="{MODEL_NAME}"}}' in text or (
                name.endswith("_count") and name in text
            ), f"{name} missing on {engine.name}"
    assert pd_engines.prefill.metric("pdserve_kv_transfer_bytes_total") > 0
    assert pd_engines.decode.metric("pdserve_kv_transfer_seconds_count") > 0
