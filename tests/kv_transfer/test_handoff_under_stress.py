"""The KV handoff when the decode is slow, the machine is busy or the prefill dies mid-pull.

Real engines (the session's, settings in tests/engine_support.py): the prefill's lease is
``LEASE_S`` (4 s), and every order the handoff must survive is forced, not hoped for:

- a decode whose queue holds each request two leases long (``decode_queued``'s scheduler is
  frozen with vLLM's ``/pause?mode=keep`` while the requests arrive) still pulls every block;
- the same sequential and 16-concurrent identity runs while CPU-bound processes keep both cores
  busy;
- a "prefill instance" that dies half-way through the bytes: with ``recompute`` the decode
  computes the prompt again (same output, counted as recomputed), with ``fail`` the client gets
  an error.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from engine_support import ENGINE_BLOCK_SIZE as BLOCK_SIZE
from engine_support import ENGINE_LEASE_S as LEASE_S
from engine_support import KV_SECRET, PDEngines, RunningServer, block_bytes
from test_real_engines import (
    BYTES,
    aggregated,
    completion,
    decode_leg,
    disaggregated,
    prefill_leg,
    prompt_of,
    text_of,
)

from kv_transfer import wire

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FAILURES = "pdserve_kv_transfer_failures_total"
RECOMPUTED = "pdserve_kv_recomputed_requests_total"
RECOMPUTED_TOKENS = "pdserve_kv_recomputed_tokens_total"
EXPIRED = "pdserve_kv_leases_expired_total"


def _post_empty(server: RunningServer, path: str) -> None:
    request = urllib.request.Request(server.url + path, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200, f"{path} answered {response.status}"


@contextlib.contextmanager
def _scheduler_frozen(decode: RunningServer) -> Iterator[None]:
    """The decode's scheduler accepts requests but schedules none until the block ends.

    vLLM's ``/pause?mode=keep`` (served with ``VLLM_SERVER_DEV_MODE``) queues every new request
    in the scheduler, where the connector's ``on_new_request`` sees it, and steps nothing: a
    queue exactly as long as the test says, however fast the machine."""
    _post_empty(decode, "/pause?mode=keep")
    try:
        yield
    finally:
        _post_empty(decode, "/resume")


def test_decode_queue_longer_than_the_lease_still_pulls_every_block(
    real_engines: PDEngines, real_decode_queued: RunningServer, tiny_model: Path
) -> None:
    decode = real_decode_queued
    prefill = real_engines.prefill
    bodies = [completion(prompt_of(n, salt=600 + n)) for n in (20, BLOCK_SIZE + 1, 150, 300)]
    expected = [aggregated(real_engines, body) for body in bodies]
    counters = {name: decode.counter(name) for name in (BYTES, FAILURES, RECOMPUTED)}
    expired_before = prefill.counter(EXPIRED)

    with ThreadPoolExecutor(len(bodies)) as pool, _scheduler_frozen(decode):
        # Each decode leg goes out as soon as its prefill answered, as a router sends it; the
        # lease of each starts when its prefill leg ends.
        results = [
            pool.submit(decode_leg, decode, body, prefill_leg(prefill, body)) for body in bodies
        ]
        # Every request waits in the decode's queue for at least two leases.
        time.sleep(2 * LEASE_S)
        assert not any(future.done() for future in results), "a request ran while frozen"
    got = [future.result() for future in results]
    assert got == expected
    per_block = block_bytes(tiny_model, BLOCK_SIZE)
    blocks = sum(-(-len(b["prompt"]) // BLOCK_SIZE) for b in bodies)
    pulled = decode.wait_for_counter(BYTES, counters[BYTES] + blocks * per_block) - counters[BYTES]
    assert pulled == blocks * per_block, f"pulled {pulled / per_block:g} of {blocks} blocks"
    assert decode.counter(FAILURES) == counters[FAILURES]
    assert decode.counter(RECOMPUTED) == counters[RECOMPUTED]
    prefill.wait_blocks_released()
    assert prefill.counter(EXPIRED) == expired_before


def _burn_cpu(stop: Any) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


@contextlib.contextmanager
def _both_cores_busy() -> Iterator[None]:
    """Two CPU-bound processes (one per core) for the duration of the block."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    burners = [ctx.Process(target=_burn_cpu, args=(stop,), daemon=True) for _ in range(2)]
    for proc in burners:
        proc.start()
    try:
        yield
    finally:
        stop.set()
        for proc in burners:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def test_identity_runs_while_both_cores_are_busy(real_engines: PDEngines) -> None:
    decode, prefill = real_engines.decode, real_engines.prefill
    sequential = [completion(prompt_of(10 + 37 * i, salt=700 + i)) for i in range(6)]
    concurrent = [completion(prompt_of(30 + 23 * i, salt=800 + i)) for i in range(16)]
    expected = [aggregated(real_engines, body) for body in sequential + concurrent]
    counters = {name: decode.counter(name) for name in (FAILURES, RECOMPUTED)}
    expired_before = prefill.counter(EXPIRED)
    with _both_cores_busy():
        got = [disaggregated(real_engines, body) for body in sequential]
        with ThreadPoolExecutor(16) as pool:
            got += list(pool.map(lambda body: disaggregated(real_engines, body), concurrent))
    assert got == expected
    assert decode.counter(FAILURES) == counters[FAILURES]
    assert decode.counter(RECOMPUTED) == counters[RECOMPUTED]
    assert prefill.counter(EXPIRED) == expired_before
    prefill.wait_blocks_released()


class DyingPrefill:
    """A block server that authenticates like a prefill instance, answers claims, and dies half
    way through the bytes of every read: a prefill instance that crashes mid-pull."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.reads = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(wire.WireError, OSError):
            nonce = wire.new_nonce()
            wire.send_frame(conn, {"op": "challenge", "v": 1, "nonce": nonce, "engine_id": "x"})
            hello = wire.recv_frame(conn)
            theirs = hello.get("fingerprint") or {}
            wire.send_frame(
                conn,
                {
                    "op": "welcome",
                    "mac": wire.server_mac(self._secret, nonce, hello["nonce"]),
                    "fingerprint": theirs,
                },
            )
            while True:
                message = wire.recv_frame(conn)
                if message["op"] == "renew":
                    states = ["held"] * len(message["reqs"])
                    wire.send_frame(conn, {"op": "renewed", "states": states})
                elif message["op"] == "release":
                    wire.send_frame(conn, {"op": "released", "known": True})
                elif message["op"] == "read":
                    self.reads += 1
                    block_shape = theirs["block_shape"]
                    per_block = theirs["num_layers"] * 4
                    for dim in block_shape:
                        per_block *= int(dim)
                    nbytes = per_block * len(message["blocks"])
                    wire.send_frame(conn, {"op": "data", "nbytes": nbytes})
                    conn.sendall(b"\x01" * (nbytes // 2))
                    return  # dies mid-transfer
                else:
                    return


@pytest.fixture
def dying_prefill() -> Iterator[DyingPrefill]:
    server = DyingPrefill(KV_SECRET.encode())
    try:
        yield server
    finally:
        server.close()


def _params_to(prefill: RunningServer, body: dict[str, Any], port: int) -> dict[str, Any]:
    params = prefill_leg(prefill, body)
    # The real prefill keeps these blocks until its lease ends; nobody claims them.
    return dict(params, remote_host="127.0.0.1", remote_port=port)


def test_prefill_dying_mid_pull_recomputes_with_the_same_output(
    real_engines: PDEngines, dying_prefill: DyingPrefill
) -> None:
    decode = real_engines.decode
    body = completion(prompt_of(5 * BLOCK_SIZE + 3, salt=901))
    expected = aggregated(real_engines, body)
    recomputed_before = decode.counter(RECOMPUTED)
    tokens_before = decode.counter(RECOMPUTED_TOKENS)
    failures_before = decode.counter(FAILURES)
    params = _params_to(real_engines.prefill, body, dying_prefill.port)
    response = decode.post_json("/v1/completions", dict(body, kv_transfer_params=params))
    assert text_of(response) == expected
    assert dying_prefill.reads == 1
    # The decode says what happened, in its answer and in its metrics.
    outcome = response.get("kv_transfer_params") or {}
    assert outcome.get("pdserve_kv_outcome") == "recomputed", response
    assert outcome.get("pdserve_kv_recomputed_tokens") == 5 * BLOCK_SIZE + 3
    assert decode.wait_for_counter(RECOMPUTED, recomputed_before + 1) == recomputed_before + 1
    assert decode.counter(RECOMPUTED_TOKENS) == tokens_before + 5 * BLOCK_SIZE + 3
    assert decode.counter(FAILURES) == failures_before + 1
    assert 'reason="pull_failed"' in decode.metrics_text()
    real_engines.prefill.wait_blocks_released(timeout_s=LEASE_S + 20)


def test_prefill_dying_mid_pull_fails_the_request_under_policy_fail(
    real_engines: PDEngines, real_decode_queued: RunningServer, dying_prefill: DyingPrefill
) -> None:
    decode = real_decode_queued
    body = completion(prompt_of(3 * BLOCK_SIZE, salt=902))
    params = _params_to(real_engines.prefill, body, dying_prefill.port)
    request = urllib.request.Request(
        decode.url + "/v1/completions",
        data=json.dumps(dict(body, kv_transfer_params=params)).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=120)
    assert caught.value.code >= 500
    error = json.loads(caught.value.read())
    assert "error" in error, error
    assert dying_prefill.reads == 1
    # The engine still serves the next request normally.
    plain = completion(prompt_of(40, salt=903))
    assert text_of(decode.post_json("/v1/completions", plain)) == aggregated(real_engines, plain)
    real_engines.prefill.wait_blocks_released(timeout_s=LEASE_S + 20)


def test_decode_answer_reports_a_transfer(real_engines: PDEngines) -> None:
    body = completion(prompt_of(70, salt=904))
    params = prefill_leg(real_engines.prefill, body)
    response = real_engines.decode.post_json(
        "/v1/completions", dict(body, kv_transfer_params=params)
    )
    assert (response.get("kv_transfer_params") or {}).get("pdserve_kv_outcome") == "transferred"
    real_engines.prefill.wait_blocks_released()
