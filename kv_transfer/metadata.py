"""What the scheduler half tells the worker half each engine step (small, picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass(frozen=True)
class PullSpec:
    """Decode side: fetch ``remote_block_ids`` of a prefilled request into ``local_block_ids``.

    With no block ids the pull was abandoned (the blocks could not be mapped):
    the prefill side is released and vLLM is told the load failed.
    ``hold_token`` lets the prefill's block server wait for a hold it has
    not registered yet.
    """

    request_id: str
    remote_host: str
    remote_port: int
    remote_request_id: str
    remote_engine_id: str
    remote_block_ids: tuple[int, ...] = ()
    local_block_ids: tuple[int, ...] = ()
    hold_token: str = ""

    @property
    def release_only(self) -> bool:
        return not self.local_block_ids


@dataclass(frozen=True)
class HoldSpec:
    """Prefill side: keep serving ``block_ids`` of ``request_id`` until released or expiry."""

    request_id: str
    block_ids: tuple[int, ...]
    expires_at: float  # unix seconds


@dataclass
class TcpPullMetadata(KVConnectorMetadata):
    pulls: list[PullSpec] = field(default_factory=list)
    holds: list[HoldSpec] = field(default_factory=list)


@dataclass
class TcpPullWorkerMeta(KVConnectorWorkerMetadata):
    """What the worker half tells the scheduler half each step: failed pulls, by request,
    with how many of the request's blocks did not arrive (and are computed again)."""

    failed_blocks: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, TcpPullWorkerMeta):
            for request_id, count in other.failed_blocks.items():
                self.failed_blocks[request_id] = max(count, self.failed_blocks.get(request_id, 0))
        return self
