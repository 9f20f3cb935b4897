"""The scheduler half: decides what to hold (prefill) and what to pull (decode).

It runs in vLLM's EngineCore process, moves no bytes, and tells the worker
half its decisions through ``TcpPullMetadata`` once per engine step.

Prefill (``do_remote_decode`` in the request's kv_transfer_params): when the
request finishes normally, keep its blocks (``delay_free``) under a lease and
return the kv_transfer_params a decode instance needs to pull them.

Decode (``do_remote_prefill``): ask vLLM to treat the prompt tokens past the
local prefix-cache hit as loaded asynchronously, then pull exactly the blocks
after that hit. Whatever happens (pull, params that cannot be honoured, abort
before scheduling) the prefill instance is told to release once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kv_transfer.metadata import HoldSpec, PullSpec, TcpPullMetadata
from kv_transfer.stats import StatsRecorder, TcpTransferStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# Set in a decode request's kv_transfer_params once its pull has been planned,
# so re-admission after preemption or a failed load recomputes instead of re-pulling.
HANDLED_KEY = "_pdserve_kv_handled"
TRANSFER_MODE = "pdserve-tcp-pull"


def prompt_digest(token_ids: Sequence[int]) -> str:
    """Identifies the exact prompt tokens, so a decode instance never attaches
    KV computed for a different token sequence."""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class SchedulerSettings:
    engine_id: str
    block_size: int
    public_host: str
    port: int
    lease_s: float
    fingerprint: Mapping[str, Any]  # model, dtype, block_size, layout, tp_size
    is_producer: bool
    is_consumer: bool
    tp_size: int = 1

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> SchedulerSettings:
        from kv_transfer.config import TransferSettings

        kv_config = vllm_config.kv_transfer_config
        assert kv_config is not None
        transfer = TransferSettings.from_extra_config(kv_config.kv_connector_extra_config)
        block_size = int(vllm_config.cache_config.block_size)
        tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        return cls(
            engine_id=str(kv_config.engine_id),
            block_size=block_size,
            public_host=transfer.public_host,
            port=transfer.port,
            lease_s=transfer.lease_s,
            fingerprint=scheduler_fingerprint(vllm_config),
            is_producer=bool(kv_config.is_kv_producer),
            is_consumer=bool(kv_config.is_kv_consumer),
            tp_size=tp_size,
        )


def scheduler_fingerprint(vllm_config: VllmConfig) -> dict[str, Any]:
    model_config = vllm_config.model_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(model_config.dtype) if cache_dtype == "auto" else str(cache_dtype)
    return {
        "model": str(model_config.served_model_name),
        "dtype": dtype,
        "block_size": int(vllm_config.cache_config.block_size),
        "tp_size": int(vllm_config.parallel_config.tensor_parallel_size),
    }


@dataclass(frozen=True)
class RemotePrefill:
    """A decode request's validated view of the prefill instance's kv_transfer_params."""

    host: str
    port: int
    request_id: str
    engine_id: str
    block_ids: tuple[int, ...]
    problem: str | None  # set when the KV cannot be used; the prefill side is still released


class TcpPullScheduler:
    def __init__(self, settings: SchedulerSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._pending_pulls: list[PullSpec] = []
        self._pending_holds: list[HoldSpec] = []
        # Prefill requests whose blocks are held, with their block counts.
        self._held: dict[str, int] = {}
        self._stats = StatsRecorder()
        self._stats.blocks_held(0)

    # -- decode side ----------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        remote = self._remote_prefill(request)
        if remote is None or remote.problem is not None:
            return 0, False
        count = int(request.num_prompt_tokens) - num_computed_tokens
        if count <= 0:
            return 0, False  # the local prefix cache covers the prompt: release only
        return count, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        remote = self._remote_prefill(request)
        if remote is None:
            return
        params = request.kv_transfer_params
        assert params is not None
        params[HANDLED_KEY] = True
        if remote.problem is not None:
            logger.warning(
                "request %s: not pulling KV from %s:%s (%s); computing the prompt locally",
                request.request_id,
                remote.host,
                remote.port,
                remote.problem,
            )
            self._queue_release(request.request_id, remote, report=False)
            return
        if num_external_tokens <= 0:
            self._queue_release(request.request_id, remote, report=False)
            return
        bs = self._settings.block_size
        num_prompt = int(request.num_prompt_tokens)
        local_tokens = num_prompt - num_external_tokens
        num_prompt_blocks = math.ceil(num_prompt / bs)
        first = local_tokens // bs
        (all_local,) = blocks.get_block_ids()[:1]
        local_ids = tuple(all_local[first:num_prompt_blocks])
        remote_ids = remote.block_ids[first:num_prompt_blocks]
        if local_tokens % bs or len(local_ids) != len(remote_ids) or not local_ids:
            # Cannot happen with a block-aligned local hit; pull nothing rather than
            # write KV into the wrong slots. The transfer is reported failed so
            # vLLM applies kv_load_failure_policy.
            logger.error(
                "request %s: cannot map %d external tokens onto blocks "
                "(local hit %d tokens, %d local / %d remote blocks)",
                request.request_id,
                num_external_tokens,
                local_tokens,
                len(local_ids),
                len(remote_ids),
            )
            local_ids, remote_ids = (), ()
        self._pending_pulls.append(
            PullSpec(
                request_id=request.request_id,
                remote_host=remote.host,
                remote_port=remote.port,
                remote_request_id=remote.request_id,
                remote_engine_id=remote.engine_id,
                remote_block_ids=tuple(remote_ids),
                local_block_ids=local_ids,
                report=True,
            )
        )

    def _queue_release(self, request_id: str, remote: RemotePrefill, *, report: bool) -> None:
        if not remote.host or remote.port <= 0 or not remote.request_id:
            return  # nowhere to send it; the lease expiry on the prefill side cleans up
        self._pending_pulls.append(
            PullSpec(
                request_id=request_id,
                remote_host=remote.host,
                remote_port=remote.port,
                remote_request_id=remote.request_id,
                remote_engine_id=remote.engine_id,
                report=report,
            )
        )

    def _remote_prefill(self, request: Request) -> RemotePrefill | None:
        params = request.kv_transfer_params
        if (
            not self._settings.is_consumer
            or not params
            or not params.get("do_remote_prefill")
            or params.get(HANDLED_KEY)
        ):
            return None
        return parse_remote_prefill(
            params,
            prompt_token_ids=request.prompt_token_ids or [],
            settings=self._settings,
            now=self._clock(),
        )

    # -- prefill side ---------------------------------------------------------------------------

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        remote = self._remote_prefill(request)
        if remote is not None:
            # A decode request that finished (aborted, or rejected by the API
            # server) before it was ever scheduled: the prefill side still holds.
            params[HANDLED_KEY] = True
            self._queue_release(request.request_id, remote, report=False)
            return False, None
        if not (self._settings.is_producer and params.get("do_remote_decode")):
            return False, None
        if request.status not in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        ):
            return False, None  # aborted or failed: nobody will pull, free now
        if not block_ids:
            return False, None
        expires_at = self._clock() + self._settings.lease_s
        self._pending_holds.append(HoldSpec(request.request_id, tuple(block_ids), expires_at))
        self._held[request.request_id] = len(block_ids)
        self._stats.blocks_held(sum(self._held.values()))
        prompt = list(request.prompt_token_ids or [])
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self._settings.engine_id,
            "remote_request_id": request.request_id,
            "remote_host": self._settings.public_host,
            "remote_port": self._settings.port,
            "remote_block_ids": list(block_ids),
            "remote_blocks_expiry_time": expires_at,
            "remote_num_tokens": len(prompt),
            "remote_prompt_digest": prompt_digest(prompt),
            "tp_size": self._settings.tp_size,
            "block_size": self._settings.block_size,
            "kv_fingerprint": dict(self._settings.fingerprint),
            "transfer_mode": TRANSFER_MODE,
        }

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        changed = False
        for request_id in connector_output.finished_sending or ():
            changed |= self._held.pop(request_id, None) is not None
        if changed:
            self._stats.blocks_held(sum(self._held.values()))

    # -- every step -----------------------------------------------------------------------------

    def build_connector_meta(self) -> TcpPullMetadata:
        meta = TcpPullMetadata(pulls=self._pending_pulls, holds=self._pending_holds)
        self._pending_pulls, self._pending_holds = [], []
        return meta

    def get_kv_connector_stats(self) -> TcpTransferStats | None:
        return self._stats.drain()

    @property
    def blocks_held(self) -> int:
        return sum(self._held.values())


def parse_remote_prefill(
    params: Mapping[str, Any],
    *,
    prompt_token_ids: Sequence[int],
    settings: SchedulerSettings,
    now: float,
) -> RemotePrefill:
    """Validate the prefill instance's params against this request and engine."""
    host = params.get("remote_host")
    port = params.get("remote_port")
    request_id = params.get("remote_request_id")
    engine_id = params.get("remote_engine_id") or ""
    raw_blocks = params.get("remote_block_ids")
    # Nixl-style per-group lists: accept a single group.
    if isinstance(raw_blocks, list) and len(raw_blocks) == 1 and isinstance(raw_blocks[0], list):
        raw_blocks = raw_blocks[0]
    addressable = (
        isinstance(host, str)
        and bool(host)
        and isinstance(port, int)
        and 0 < port < 65536
        and isinstance(request_id, str)
        and bool(request_id)
    )
    block_ids: tuple[int, ...] = ()
    problem: str | None = None
    if not addressable:
        problem = "kv_transfer_params lack a valid remote_host, remote_port or remote_request_id"
    elif not isinstance(raw_blocks, list) or not all(
        isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in raw_blocks
    ):
        problem = "remote_block_ids is not a list of block ids"
    else:
        block_ids = tuple(raw_blocks)
        problem = _compatibility_problem(params, prompt_token_ids, settings, now, len(block_ids))
    return RemotePrefill(
        host=host if isinstance(host, str) else "",
        port=port if isinstance(port, int) else 0,
        request_id=request_id if isinstance(request_id, str) else "",
        engine_id=str(engine_id),
        block_ids=block_ids,
        problem=problem,
    )


def _compatibility_problem(
    params: Mapping[str, Any],
    prompt_token_ids: Sequence[int],
    settings: SchedulerSettings,
    now: float,
    num_blocks: int,
) -> str | None:
    if params.get("transfer_mode", TRANSFER_MODE) != TRANSFER_MODE:
        return f"transfer_mode {params.get('transfer_mode')!r} is not {TRANSFER_MODE!r}"
    block_size = params.get("block_size", settings.block_size)
    if block_size != settings.block_size:
        return f"block_size {block_size} != local {settings.block_size}"
    theirs = params.get("kv_fingerprint")
    if isinstance(theirs, Mapping):
        diffs = [
            f"{key}: {theirs.get(key)!r} != local {value!r}"
            for key, value in settings.fingerprint.items()
            if key in theirs and theirs.get(key) != value
        ]
        if diffs:
            return "KV fingerprint mismatch: " + "; ".join(diffs)
    num_tokens = params.get("remote_num_tokens")
    if num_tokens is not None and num_tokens != len(prompt_token_ids):
        return (
            f"prefill computed {num_tokens} prompt tokens, this prompt has {len(prompt_token_ids)}"
        )
    digest = params.get("remote_prompt_digest")
    if digest is not None and digest != prompt_digest(prompt_token_ids):
        return "prompt tokens differ from the ones the prefill instance computed"
    needed = math.ceil(len(prompt_token_ids) / settings.block_size)
    if num_blocks < needed:
        return f"{num_blocks} remote blocks cannot hold {len(prompt_token_ids)} prompt tokens"
    expiry = params.get("remote_blocks_expiry_time")
    if isinstance(expiry, int | float) and expiry <= now:
        return "the prefill instance's lease on these blocks has expired"
    return None
