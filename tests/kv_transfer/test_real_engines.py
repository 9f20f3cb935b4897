"""Real vLLM CPU engines hand off KV through the connector (direct HTTP, no proxy).

The engines are the session's shared ones (tests/conftest.py ``real_engines``, settings in
tests/engine_support.py): block size 32, float32, a 12 s lease, and a decode worker that
recomputes when a pull fails. The request bodies are the ones the proxy sends: a prefill leg
with max_tokens 1, stream false and ``kv_transfer_params: {"do_remote_decode": true}``, then
the original request to the decode engine with the params the prefill returned.

Every test leaves the prefill worker holding no blocks (waiting for the lease where it left a
prefill un-pulled on purpose), as the end-to-end tests after it on the same engines expect.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from engine_support import ENGINE_BLOCK_SIZE as BLOCK_SIZE
from engine_support import ENGINE_LEASE_S as LEASE_S
from engine_support import MODEL_NAME, PDEngines, RunningServer, block_bytes

from deploy.worker_launch import free_port
from kv_transfer import wire

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

MAX_TOKENS = 12
BYTES = "pdserve_kv_transfer_bytes_total"
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


def prefill_leg(prefill: RunningServer, body: dict[str, Any]) -> dict[str, Any]:
    leg = dict(body, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    if "messages" in body:
        leg["max_completion_tokens"] = 1
    response = prefill.post_json(
        "/v1/chat/completions" if "messages" in body else "/v1/completions", leg
    )
    params = response.get("kv_transfer_params")
    assert params and params["do_remote_prefill"] is True, response
    return dict(params)


def decode_leg(decode: RunningServer, body: dict[str, Any], params: dict[str, Any]) -> str:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = decode.post_json(path, dict(body, kv_transfer_params=params))
    return text_of(response)


def text_of(response: dict[str, Any]) -> str:
    choice = response["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def aggregated(engines: PDEngines, body: dict[str, Any]) -> str:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    return text_of(engines.aggregated.post_json(path, body))


def disaggregated(engines: PDEngines, body: dict[str, Any]) -> str:
    return decode_leg(engines.decode, body, prefill_leg(engines.prefill, body))


def assert_pulled_blocks(
    decode: RunningServer, bytes_before: float, blocks: int, model_dir: Path
) -> None:
    """The decode worker's transfer counter grew by exactly ``blocks`` blocks."""
    per_block = block_bytes(model_dir, BLOCK_SIZE)
    expected = bytes_before + blocks * per_block
    got = decode.wait_for_counter(BYTES, expected, timeout_s=10)
    assert got == expected, f"decode pulled {(got - bytes_before) / per_block:.2f} blocks"


@pytest.mark.parametrize(
    "num_tokens",
    [20, BLOCK_SIZE, BLOCK_SIZE + 1, 8 * BLOCK_SIZE + 5],
    ids=["inside-first-block", "on-block-boundary", "one-past-boundary", "nine-blocks"],
)
def test_pd_output_is_token_identical_to_aggregated(
    real_engines: PDEngines, tiny_model: Path, num_tokens: int
) -> None:
    body = completion(prompt_of(num_tokens, salt=num_tokens))
    expected = aggregated(real_engines, body)
    bytes_before = real_engines.decode.counter(BYTES)
    assert disaggregated(real_engines, body) == expected
    real_engines.prefill.wait_blocks_released()
    blocks = -(-num_tokens // BLOCK_SIZE)
    assert_pulled_blocks(real_engines.decode, bytes_before, blocks, tiny_model)


def test_sixteen_concurrent_requests(real_engines: PDEngines) -> None:
    bodies = [completion(prompt_of(30 + 23 * i, salt=1000 + i)) for i in range(16)]
    expected = [aggregated(real_engines, b) for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda b: disaggregated(real_engines, b), bodies))
    assert got == expected
    real_engines.prefill.wait_blocks_released()


def test_chat_completion(real_engines: PDEngines) -> None:
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
    assert disaggregated(real_engines, body) == aggregated(real_engines, body)
    real_engines.prefill.wait_blocks_released()


def test_decode_with_a_cached_prefix_pulls_only_the_rest(
    real_engines: PDEngines, tiny_model: Path
) -> None:
    shared = prompt_of(4 * BLOCK_SIZE, salt=77)
    # Warm the decode engine's prefix cache with the first four blocks.
    real_engines.decode.post_json("/v1/completions", completion(shared, max_tokens=1))
    body = completion(shared + prompt_of(100, salt=78))
    expected = aggregated(real_engines, body)
    bytes_before = real_engines.decode.counter(BYTES)
    assert disaggregated(real_engines, body) == expected
    real_engines.prefill.wait_blocks_released()
    total_blocks = -(-(4 * BLOCK_SIZE + 100) // BLOCK_SIZE)
    assert_pulled_blocks(real_engines.decode, bytes_before, total_blocks - 4, tiny_model)


def test_unpulled_prefill_is_released_at_lease_expiry(real_engines: PDEngines) -> None:
    prefill = real_engines.prefill
    expired_before = prefill.counter("pdserve_kv_leases_expired_total")
    params = prefill_leg(prefill, completion(prompt_of(70, salt=5)))
    assert params["remote_blocks_expiry_time"] > time.time()
    assert params["remote_blocks_expiry_time"] <= time.time() + LEASE_S + 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and prefill.counter("pdserve_kv_blocks_held") < 3:
        time.sleep(0.2)
    assert prefill.counter("pdserve_kv_blocks_held") >= 3
    prefill.wait_blocks_released(timeout_s=LEASE_S + 20)
    expired = prefill.wait_for_counter("pdserve_kv_leases_expired_total", expired_before + 1, 10)
    assert expired == expired_before + 1


def test_decode_pointing_at_a_dead_prefill_recomputes(real_engines: PDEngines) -> None:
    """The decode engine runs kv_load_failure_policy=recompute: same output, no hang."""
    body = completion(prompt_of(90, salt=9))
    expected = aggregated(real_engines, body)
    params = prefill_leg(real_engines.prefill, body)
    params["remote_port"] = free_port()
    failures_before = real_engines.decode.counter("pdserve_kv_transfer_failures_total")
    started = time.monotonic()
    assert decode_leg(real_engines.decode, body, params) == expected
    assert time.monotonic() - started < 60
    failures = real_engines.decode.wait_for_counter(
        "pdserve_kv_transfer_failures_total", failures_before + 1, timeout_s=10
    )
    assert failures > failures_before
    # Nobody can release the real prefill's blocks now; the lease does.
    real_engines.prefill.wait_blocks_released(timeout_s=LEASE_S + 20)


def test_wrong_secret_is_refused_and_serving_continues(real_engines: PDEngines) -> None:
    kv_port = real_engines.prefill.kv_port
    assert kv_port is not None
    with socket.create_connection(("127.0.0.1", kv_port), timeout=10) as sock:
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
    assert disaggregated(real_engines, body) == aggregated(real_engines, body)
    real_engines.prefill.wait_blocks_released()


def test_transfer_metrics_are_on_both_workers_metrics(real_engines: PDEngines) -> None:
    body = completion(prompt_of(50, salt=12))
    disaggregated(real_engines, body)
    real_engines.prefill.wait_blocks_released()
    for engine in (real_engines.prefill, real_engines.decode):
        text = engine.metrics_text()
        for name in METRICS:
            assert f'{name}{{engine="0",model_name="{MODEL_NAME}"}}' in text or (
                name.endswith("_count") and name in text
            ), f"{name} missing on {engine.name}"
    assert real_engines.prefill.counter("pdserve_kv_transfer_bytes_total") > 0
    assert real_engines.decode.counter("pdserve_kv_transfer_seconds_count") > 0
