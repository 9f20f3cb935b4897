"""What the scheduler half tells the worker half each engine step (small, picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class PullSpec:
    """Decode side: fetch ``remote_block_ids`` of a prefilled request into ``local_block_ids``.

    With no block ids it is a release-only notice: the local cache already has
    what it needs (or the pull was abandoned), but the prefill side must free.
    ``report`` is False for release-only notices about requests vLLM is not
    waiting on, which must not appear in ``finished_recving``.
    """

    request_id: str
    remote_host: str
    remote_port: int
    remote_request_id: str
    remote_engine_id: str
    remote_block_ids: tuple[int, ...] = ()
    local_block_ids: tuple[int, ...] = ()
    report: bool = True

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
