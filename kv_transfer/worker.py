"""The worker half: moves bytes. One instance per vLLM worker process (TP rank).

Prefill: runs a ``BlockServer`` over this rank's KV cache and a ``LeaseTable``
fed by the scheduler's holds; reports released and expired leases as
``finished_sending`` so vLLM frees the blocks.

Decode: runs pulls on a small thread pool (never on the engine thread) and
reports every pull it started as ``finished_recving``. A failed pull reports the
blocks that did not arrive through ``get_block_ids_with_load_errors``, so vLLM
recomputes exactly those (or fails the request) per kv_load_failure_policy, and
tells the scheduler half how many blocks each request lost (worker metadata) so
it can count the recompute.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kv_transfer import wire
from kv_transfer.block_client import BlockClient, ClientSettings
from kv_transfer.block_server import BlockServer, ServerSettings
from kv_transfer.config import TransferSettings
from kv_transfer.device import KVCacheAccess
from kv_transfer.leases import LeaseTable
from kv_transfer.metadata import PullSpec, TcpPullMetadata, TcpPullWorkerMeta
from kv_transfer.stats import StatsRecorder, TcpTransferStats

logger = logging.getLogger(__name__)

CPU_LAYOUT = "LBHNC"  # vLLM's CPU_ATTN layout: per layer [blocks, kv_heads, block_size, 2*head]


@dataclass(frozen=True)
class WorkerSettings:
    engine_id: str
    model: str
    block_size: int
    transfer: TransferSettings
    is_producer: bool
    is_consumer: bool
    tp_size: int = 1
    tp_rank: int = 0
    pull_threads: int = 4


@dataclass(frozen=True)
class _PullResult:
    request_id: str
    ok: bool
    local_block_ids: tuple[int, ...]


def unique_layers(kv_caches: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Layer tensors in model order, each once (cross-layer sharing maps names to one tensor)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    layers: list[torch.Tensor] = []
    for tensor in kv_caches.values():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            layers.append(tensor)
    return layers


class TcpPullWorker:
    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._stats = StatsRecorder()
        self._cache: KVCacheAccess | None = None
        self._fingerprint: wire.KVFingerprint | None = None
        self._leases = LeaseTable()
        self._server: BlockServer | None = None
        self._client: BlockClient | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._results: queue.SimpleQueue[_PullResult] = queue.SimpleQueue()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        # finished_sending may only name ids vLLM has passed in finished_req_ids.
        self._seen_finished: OrderedDict[str, float] = OrderedDict()
        self._unreported_sends: set[str] = set()
        # Failed loads of the step being reported: vLLM reads them right after get_finished.
        self._invalid_block_ids: set[int] = set()
        self._failed_blocks: dict[str, int] = {}

    @property
    def server_port(self) -> int | None:
        return self._server.port if self._server is not None else None

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        layers = unique_layers(kv_caches)
        self.register_layers(layers)

    def register_layers(self, layers: Sequence[torch.Tensor]) -> None:
        s = self._settings
        self._cache = KVCacheAccess(layers)
        self._fingerprint = wire.KVFingerprint(
            model=s.model,
            dtype=str(self._cache.dtype),
            block_size=s.block_size,
            layout=CPU_LAYOUT if self._cache.device.type == "cpu" else self._cache.device.type,
            num_layers=self._cache.num_layers,
            block_shape=self._cache.block_shape,
            tp_size=s.tp_size,
            tp_rank=s.tp_rank,
        )
        if not s.transfer.secret:
            # A producer bound to a non-loopback address refuses to start below.
            logger.warning(
                "KV transfer runs without a shared secret; set $PDSERVE_KV_SECRET or "
                "$PDSERVE_KV_SECRET_FILE (the same on every prefill and decode worker)"
            )
        if s.is_producer:
            self._server = BlockServer(
                ServerSettings(
                    host=s.transfer.host,
                    port=s.transfer.port + s.tp_rank if s.transfer.port else 0,
                    secret=s.transfer.secret,
                    io_timeout_s=s.transfer.io_timeout_s,
                    # A hold is registered at the start of the engine step after the prefill
                    # answered; the lease bounds the wait in case that step never comes.
                    pending_hold_wait_s=s.transfer.lease_s,
                ),
                self._fingerprint,
                self._cache,
                self._leases,
                engine_id=s.engine_id,
                on_transfer=self._stats.transfer,
                on_refusal=self._stats.failure,
            )
            self._server.start()
        if s.is_consumer:
            self._client = BlockClient(
                ClientSettings(
                    secret=s.transfer.secret,
                    connect_timeout_s=s.transfer.connect_timeout_s,
                    io_timeout_s=s.transfer.io_timeout_s,
                ),
                self._fingerprint,
            )
            self._pool = ThreadPoolExecutor(
                max_workers=s.pull_threads, thread_name_prefix="kv-pull"
            )

    # -- per step -------------------------------------------------------------------------------

    def register_holds(self, meta: TcpPullMetadata) -> None:
        """Called when the step's metadata is bound, before the forward pass: a decode may
        already be asking for these blocks, and a long forward must not delay the hold."""
        for hold in meta.holds:
            self._leases.add(hold.request_id, hold.block_ids, hold.expires_at)

    def start_load_kv(self, meta: TcpPullMetadata) -> None:
        for spec in meta.pulls:
            self._submit(spec)

    def _submit(self, spec: PullSpec) -> None:
        if self._pool is None:
            logger.error("request %s: pull requested on a non-consumer worker", spec.request_id)
            self._results.put(_PullResult(spec.request_id, False, spec.local_block_ids))
            return
        with self._in_flight_lock:
            self._in_flight += 1
        self._pool.submit(self._run_pull, spec)

    def _run_pull(self, spec: PullSpec) -> None:
        ok = False
        try:
            ok = self._pull(spec)
        except Exception:
            logger.exception("request %s: KV pull crashed", spec.request_id)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
            # Every pull vLLM waits on is reported, success or not, or its blocks leak.
            self._results.put(_PullResult(spec.request_id, ok, spec.local_block_ids))

    def _pull(self, spec: PullSpec) -> bool:
        assert self._client is not None and self._cache is not None
        endpoint = (spec.remote_host, spec.remote_port + self._settings.tp_rank)
        where = f"{endpoint[0]}:{endpoint[1]} (engine {spec.remote_engine_id})"
        if spec.release_only:
            # A pull the scheduler had to abandon: free the prefill side, report a failed load.
            self._stats.failure()
            self._release_after_failure(endpoint, spec)
            return False
        started = time.perf_counter()
        try:
            nbytes = self._client.pull(
                endpoint,
                spec.remote_request_id,
                spec.remote_block_ids,
                self._cache,
                spec.local_block_ids,
                hold_token=spec.hold_token,
            )
        except (wire.WireError, wire.RemoteError, OSError) as exc:
            self._stats.failure()
            logger.warning(
                "request %s: KV pull of %d blocks from %s failed: %s",
                spec.request_id,
                len(spec.local_block_ids),
                where,
                exc,
            )
            self._release_after_failure(endpoint, spec)
            return False
        elapsed = time.perf_counter() - started
        self._stats.transfer(nbytes, elapsed)
        logger.debug(
            "request %s: pulled %d blocks (%d bytes) from %s in %.2f ms",
            spec.request_id,
            len(spec.local_block_ids),
            nbytes,
            where,
            elapsed * 1e3,
        )
        return True

    def _release_after_failure(self, endpoint: tuple[str, int], spec: PullSpec) -> None:
        """Best effort: a prefill instance that is alive but refused us should still free."""
        assert self._client is not None
        with contextlib.suppress(wire.WireError, wire.RemoteError, OSError):
            self._client.release(endpoint, spec.remote_request_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """Return (finished_sending, finished_recving, failed_recving)."""
        finished_recving: set[str] = set()
        failed_recving: set[str] = set()
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                break
            finished_recving.add(result.request_id)
            if result.ok:
                continue
            if result.local_block_ids:
                # Block-level report: vLLM keeps the local prefix hit and recomputes from
                # the first block that did not arrive.
                self._invalid_block_ids.update(result.local_block_ids)
            else:
                failed_recving.add(result.request_id)
            self._failed_blocks[result.request_id] = len(result.local_block_ids)

        finished_sending: set[str] = set()
        if self._server is not None:
            finished_sending = self._finished_sends(finished_req_ids)
        return finished_sending, finished_recving, failed_recving

    def _finished_sends(self, finished_req_ids: set[str]) -> set[str]:
        now = time.monotonic()
        for request_id in finished_req_ids:
            self._seen_finished[request_id] = now
            self._seen_finished.move_to_end(request_id)
        # Ids of requests that were never held would pile up; forget old ones. Never one
        # whose blocks are still held (a claimed lease lives as long as the decode waits) or
        # whose end is not reported yet: vLLM would never free those blocks. "Not reported"
        # includes a lease a block-server thread ended since the last drain, asked of the
        # lease table in the same breath as "held".
        horizon = now - 2 * self._settings.transfer.lease_s - 60.0
        for _ in range(len(self._seen_finished)):
            oldest, seen_at = next(iter(self._seen_finished.items()))
            if seen_at >= horizon:
                break
            if oldest in self._unreported_sends or self._leases.unreported(oldest):
                self._seen_finished[oldest] = now
                self._seen_finished.move_to_end(oldest)
            else:
                del self._seen_finished[oldest]

        expired = self._leases.reap_expired()
        for request_id in expired:
            logger.warning(
                "request %s: no decode instance pulled its KV blocks before the lease "
                "expired; releasing them",
                request_id,
            )
        if expired and self._settings.tp_rank == 0:
            self._stats.lease_expired(len(expired))
        for request_id, _reason in self._leases.drain_done():
            self._unreported_sends.add(request_id)
        finished_sending = {r for r in self._unreported_sends if r in self._seen_finished}
        self._unreported_sends -= finished_sending
        for request_id in finished_sending:
            del self._seen_finished[request_id]
        return finished_sending

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid_block_ids = self._invalid_block_ids, set()
        return invalid

    def build_worker_meta(self) -> TcpPullWorkerMeta | None:
        if not self._failed_blocks:
            return None
        failed, self._failed_blocks = self._failed_blocks, {}
        return TcpPullWorkerMeta(failed_blocks=failed)

    def get_kv_connector_stats(self) -> TcpTransferStats | None:
        return self._stats.drain()

    @property
    def leases(self) -> LeaseTable:
        return self._leases

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None
