"""``TcpPullConnector``: the vLLM ``KVConnectorBase_V1`` facade.

vLLM builds the connector twice per engine: once in the scheduler (role
SCHEDULER), once per worker process (role WORKER). The facade only routes
each hook to the half that exists in this process; the halves are
``kv_transfer.scheduler`` (decides) and ``kv_transfer.worker`` (moves bytes).

Load it with::

    --kv-transfer-config '{"kv_connector": "TcpPullConnector",
        "kv_connector_module_path": "kv_transfer.connector", "kv_role": "kv_producer", ...}'

(``kv_transfer.config.connector_config`` builds that dict.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kv_transfer.block_client import BlockClient, ClientSettings
from kv_transfer.claims import ClaimKeeper
from kv_transfer.config import CONNECTOR_NAME, TransferSettings
from kv_transfer.metadata import TcpPullMetadata
from kv_transfer.scheduler import SchedulerSettings, TcpPullScheduler
from kv_transfer.stats import TcpTransferPromMetrics, TcpTransferStats
from kv_transfer.worker import TcpPullWorker, WorkerSettings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class TcpPullConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _share_vllm_log_handlers()
        _require_one_kv_cache_group(kv_cache_config)
        self._scheduler: TcpPullScheduler | None = None
        self._worker: TcpPullWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            settings = SchedulerSettings.from_vllm_config(vllm_config)
            claims = _claim_keeper(settings) if settings.is_consumer else None
            self._scheduler = TcpPullScheduler(settings, claims=claims)
        else:
            _request_amx_permission()
            self._worker = TcpPullWorker(_worker_settings(vllm_config))

    # -- worker side ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, TcpPullMetadata):
            # Before the forward pass (start_load_kv may run after it): the prefill's answer
            # may already be at a decode instance that asks for these blocks.
            self._worker.register_holds(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, TcpPullMetadata)
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # whole-request asynchronous pulls: nothing is loaded layer by layer

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # pull design: the prefill side serves blocks from its cache, saves nothing

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving, failed = self._worker.get_finished(finished_req_ids)
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        assert self._worker is not None
        return self._worker.build_worker_meta()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is not None:
            return self._worker.get_kv_connector_stats()
        assert self._scheduler is not None
        return self._scheduler.get_kv_connector_stats()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # -- scheduler side -------------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        assert self._scheduler is not None
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        return (0,)  # the one group (see _require_one_kv_cache_group)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    # -- class-level hooks ----------------------------------------------------------------------

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """Blocks are moved as raw bytes, block id on the outermost dimension of each layer
        and each block one contiguous run: LBHNC (vLLM's CPU layout; GPU backends accept it).
        MLA caches have no head dimension to order, so any layout will do."""
        if vllm_config.model_config is not None and vllm_config.model_config.use_mla:
            return None
        return "LBHNC"

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return TcpTransferStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return TcpTransferPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _share_vllm_log_handlers() -> None:
    """vLLM configures only its own ``vllm`` logger; route ours through the same
    handlers so connector logs show up, formatted like vLLM's, in the server log."""
    ours = logging.getLogger("kv_transfer")
    if ours.handlers:
        return
    vllm_logger = logging.getLogger("vllm")
    for handler in vllm_logger.handlers:
        ours.addHandler(handler)
    if ours.handlers:
        ours.setLevel(vllm_logger.level or logging.INFO)
        ours.propagate = False


def _require_one_kv_cache_group(kv_cache_config: KVCacheConfig | None) -> None:
    """Pulls move one block list per request. A hybrid model (sliding-window or mamba layers
    next to full attention) keeps several KV cache groups with their own block ids, which this
    connector does not transfer: refuse it at start-up instead of serving wrong KV."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if groups is not None and len(groups) > 1:
        raise ValueError(
            f"{CONNECTOR_NAME} supports models with one KV cache group (full attention or MLA "
            f"in every layer); this model has {len(groups)} groups. Serve it without "
            "disaggregation, or with a connector that supports hybrid models (SupportsHMA)."
        )


def _claim_keeper(settings: SchedulerSettings) -> ClaimKeeper:
    client = BlockClient(
        ClientSettings(
            secret=settings.secret,
            # A renewal that cannot connect must not hold up the others for long.
            connect_timeout_s=min(settings.connect_timeout_s, settings.lease_s / 3),
            io_timeout_s=min(10.0, settings.lease_s),
        ),
        None,
    )
    keeper = ClaimKeeper(client)
    keeper.start()
    return keeper


def _worker_settings(vllm_config: VllmConfig) -> WorkerSettings:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    kv_config = vllm_config.kv_transfer_config
    assert kv_config is not None
    tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
    try:
        tp_rank = int(get_tensor_model_parallel_rank())
    except AssertionError:  # TP group not initialised (single process)
        tp_rank = 0
    return WorkerSettings(
        engine_id=str(kv_config.engine_id),
        model=str(vllm_config.model_config.served_model_name),
        block_size=int(vllm_config.cache_config.block_size),
        transfer=TransferSettings.from_extra_config(kv_config.kv_connector_extra_config),
        is_producer=bool(kv_config.is_kv_producer),
        is_consumer=bool(kv_config.is_kv_consumer),
        tp_size=tp_size,
        tp_rank=tp_rank,
    )


def _request_amx_permission() -> None:
    """Ask Linux for AMX tile permission in this worker process, before its first forward pass.

    vLLM 0.32's CPU attention uses AMX tiles for bf16 caches on CPUs that have them. Linux
    lets a process run tile instructions only after it asked (``arch_prctl``
    ``ARCH_REQ_XCOMP_PERM``), and vLLM's kernels ask on the path a prompt's first computation
    takes. A decode instance whose first forward pass is a decode step (the prompt's KV came
    from the prefill) ran tile instructions without asking and died of SIGILL (seen with
    bf16, block size 128, on a Sapphire Rapids class CPU). Asking twice is harmless.
    """
    if torch.cpu._is_amx_tile_supported() and not torch.cpu._init_amx():
        logger.warning("AMX tiles reported by the CPU but Linux refused their use")
