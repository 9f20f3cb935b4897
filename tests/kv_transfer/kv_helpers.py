"""Helpers for the connector's fast tests: vLLM-like CPU KV caches and wired-up endpoints."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer import params, wire
from kv_transfer.block_client import BlockClient, ClientSettings
from kv_transfer.block_server import BlockServer, ServerSettings
from kv_transfer.device import KVCacheAccess
from kv_transfer.leases import LeaseTable

SECRET = b"test-secret"
ENGINE_ID = "prefill-test"


def hold_token(request_id: str, secret: bytes = SECRET, engine_id: str = ENGINE_ID) -> str:
    """The token a prefill scheduler issues for ``request_id`` (see kv_transfer.params)."""
    return params.hold_token(secret, engine_id, request_id)


def far_future() -> float:
    """A lease expiry no test outlives."""
    return time.time() + 60.0


def client_hello(
    server_nonce: bytes,
    fingerprint: wire.KVFingerprint | None,
    secret: bytes = SECRET,
    client_nonce: bytes | None = None,
) -> dict[str, Any]:
    """The hello a BlockConnection answers ``server_nonce`` with: a data hello with
    ``fingerprint``, a control hello without one. For tests that speak the wire by hand."""
    nonce = client_nonce if client_nonce is not None else wire.new_nonce()
    hello: dict[str, Any] = {
        "op": "hello",
        "v": wire.PROTOCOL_VERSION,
        "nonce": nonce,
        "mac": wire.client_mac(secret, server_nonce, nonce),
    }
    if fingerprint is None:
        hello["mode"] = wire.MODE_CONTROL
    else:
        hello["fingerprint"] = fingerprint.to_wire()
    return hello


def vllm_like_cpu_cache(
    num_layers: int = 3,
    num_blocks: int = 64,
    num_kv_heads: int = 2,
    block_size: int = 32,
    head_size: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    fill: str = "random",
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per-layer views ``[num_blocks, heads, block_size, 2*head]`` of ONE flat int8 buffer,
    the way vLLM's ``allocate_kv_cache`` lays out the CPU cache."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer = num_blocks * num_kv_heads * block_size * 2 * head_size
    flat = torch.zeros(num_layers * per_layer * elem, dtype=torch.int8)
    if fill == "random":
        gen = torch.Generator().manual_seed(seed)
        flat.copy_(torch.randint(-128, 127, flat.shape, generator=gen, dtype=torch.int8))
    typed = flat.view(dtype)
    layers = [
        typed[i * per_layer : (i + 1) * per_layer].view(
            num_blocks, num_kv_heads, block_size, 2 * head_size
        )
        for i in range(num_layers)
    ]
    assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in layers)
    return layers


def fingerprint_for(
    layers: list[torch.Tensor], block_size: int = 32, model: str = "tiny"
) -> wire.KVFingerprint:
    return wire.KVFingerprint(
        model=model,
        dtype=str(layers[0].dtype),
        block_size=block_size,
        layout="LBHNC",
        num_layers=len(layers),
        block_shape=tuple(layers[0].shape[1:]),
    )


@dataclass
class Endpoints:
    server: BlockServer
    leases: LeaseTable
    src: list[torch.Tensor]
    src_access: KVCacheAccess
    fingerprint: wire.KVFingerprint
    transfers: list[tuple[int, float]]
    refusals: list[int]

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.port)

    def client(
        self, secret: bytes = SECRET, fingerprint: wire.KVFingerprint | None = None
    ) -> BlockClient:
        return BlockClient(
            ClientSettings(secret=secret, connect_timeout_s=2.0, io_timeout_s=10.0),
            fingerprint or self.fingerprint,
        )

    def control_client(self, secret: bytes = SECRET) -> BlockClient:
        """What a decode engine's scheduler uses: no KV fingerprint, renew and release only."""
        return control_client(secret)


def control_client(secret: bytes = SECRET) -> BlockClient:
    return BlockClient(
        ClientSettings(secret=secret, connect_timeout_s=2.0, io_timeout_s=10.0), None
    )


@contextlib.contextmanager
def running_server(
    src: list[torch.Tensor],
    *,
    block_size: int = 32,
    unknown_request_wait_s: float = 0.2,
    pending_hold_wait_s: float = 30.0,
    max_renewals_per_frame: int = 4096,
    max_extend_s: float = 3600.0,
    force_staging: bool = False,
    leases: LeaseTable | None = None,
) -> Iterator[Endpoints]:
    leases = leases if leases is not None else LeaseTable()
    access = KVCacheAccess(src, force_staging=force_staging)
    fingerprint = fingerprint_for(src, block_size)
    transfers: list[tuple[int, float]] = []
    refusals: list[int] = []
    lock = threading.Lock()

    def on_transfer(nbytes: int, seconds: float) -> None:
        with lock:
            transfers.append((nbytes, seconds))

    def on_refusal() -> None:
        with lock:
            refusals.append(1)

    server = BlockServer(
        ServerSettings(
            host="127.0.0.1",
            port=0,
            secret=SECRET,
            handshake_timeout_s=2.0,
            unknown_request_wait_s=unknown_request_wait_s,
            pending_hold_wait_s=pending_hold_wait_s,
            max_renewals_per_frame=max_renewals_per_frame,
            max_extend_s=max_extend_s,
        ),
        fingerprint,
        access,
        leases,
        engine_id=ENGINE_ID,
        on_transfer=on_transfer,
        on_refusal=on_refusal,
    )
    server.start()
    try:
        yield Endpoints(server, leases, src, access, fingerprint, transfers, refusals)
    finally:
        server.stop()


class ManualClock:
    """An injectable clock (unix-like seconds) that only moves when a test moves it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self._lock = threading.Lock()
        self._now = now

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, step_s: float = 0.01
) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step_s)


def blocks_equal(
    src: list[torch.Tensor], src_ids: list[int], dst: list[torch.Tensor], dst_ids: list[int]
) -> bool:
    return all(
        torch.equal(s[a].view(torch.uint8), d[b].view(torch.uint8))
        for s, d in zip(src, dst, strict=True)
        for a, b in zip(src_ids, dst_ids, strict=True)
    )
