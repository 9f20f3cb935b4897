"""Helpers for the connector's fast tests: vLLM-like CPU KV caches and wired-up endpoints."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kv_transfer import wire
from kv_transfer.block_client import BlockClient, ClientSettings
from kv_transfer.block_server import BlockServer, ServerSettings
from kv_transfer.device import KVCacheAccess
from kv_transfer.leases import LeaseTable

SECRET = b"test-secret"


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


@contextlib.contextmanager
def running_server(
    src: list[torch.Tensor],
    *,
    block_size: int = 32,
    unknown_request_wait_s: float = 0.2,
    force_staging: bool = False,
) -> Iterator[Endpoints]:
    leases = LeaseTable()
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
        ),
        fingerprint,
        access,
        leases,
        engine_id="prefill-test",
        on_transfer=on_transfer,
        on_refusal=on_refusal,
    )
    server.start()
    try:
        yield Endpoints(server, leases, src, access, fingerprint, transfers, refusals)
    finally:
        server.stop()


def blocks_equal(
    src: list[torch.Tensor], src_ids: list[int], dst: list[torch.Tensor], dst_ids: list[int]
) -> bool:
    return all(
        torch.equal(s[a].view(torch.uint8), d[b].view(torch.uint8))
        for s, d in zip(src, dst, strict=True)
        for a, b in zip(src_ids, dst_ids, strict=True)
    )
