"""The scheduler half: decides what to hold (prefill) and what to pull (decode).

It runs in vLLM's EngineCore process, moves no bytes, and tells the worker
half its decisions through ``TcpPullMetadata`` once per engine step.

Prefill (``do_remote_decode`` in the request's kv_transfer_params): when the
request finishes normally, keep its blocks (``delay_free``) under a lease and
return the kv_transfer_params a decode instance needs to pull them.

Decode (``do_remote_prefill``): as soon as the engine accepts the request, claim
the prefill's lease and keep renewing it while the request waits (``ClaimKeeper``);
when it is scheduled, ask vLLM to treat the prompt tokens past the local
prefix-cache hit as loaded asynchronously, then pull exactly the blocks after that
hit. Whatever happens (pull, params that cannot be honoured, abort before
scheduling) the prefill instance is released once, and a prompt computed again
locally is counted (``pdserve_kv_recomputed_*``) and reported in the answer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kv_transfer import params as kvp
from kv_transfer.claims import ClaimKeeper
from kv_transfer.metadata import HoldSpec, PullSpec, TcpPullMetadata, TcpPullWorkerMeta
from kv_transfer.params import Outcome, ParamsError, RecomputeReason, RemotePrefill
from kv_transfer.stats import StatsRecorder, TcpTransferStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

prompt_digest = kvp.prompt_digest


@dataclass(frozen=True)
class SchedulerSettings:
    engine_id: str
    block_size: int
    public_host: str
    port: int
    lease_s: float
    fingerprint: Mapping[str, Any]  # model, dtype, block_size, tp_size
    is_producer: bool
    is_consumer: bool
    tp_size: int = 1
    secret: bytes = b""
    connect_timeout_s: float = 5.0

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
            secret=transfer.secret,
            connect_timeout_s=transfer.connect_timeout_s,
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


@dataclass
class _DecodeRequest:
    """A decode request's handoff state, from ``on_new_request`` to ``request_finished``."""

    remote: RemotePrefill | None  # None: params that name no reachable prefill instance
    problem: ParamsError | None
    local_hit_tokens: int = 0
    prompt_tokens: int = 0
    planned: bool = False  # the pull (or the decision not to pull) has been made
    pulling: bool = False
    outcome: str = Outcome.TRANSFERRED
    recomputed_tokens: int = 0

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        assert self.remote is not None
        return [
            (self.remote.host, self.remote.port + r) for r in range(max(1, self.remote.tp_size))
        ]


class TcpPullScheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        clock: Callable[[], float] = time.time,
        claims: ClaimKeeper | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._claims = claims
        self._pending_pulls: list[PullSpec] = []
        self._pending_holds: list[HoldSpec] = []
        # Prefill requests whose blocks are held, with their block counts.
        self._held: dict[str, int] = {}
        # Decode requests carrying a remote prefill, until they finish.
        self._decodes: dict[str, _DecodeRequest] = {}
        self._stats = StatsRecorder()
        self._stats.blocks_held(0)

    def shutdown(self) -> None:
        if self._claims is not None:
            self._claims.stop()

    # -- decode side ----------------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        """The engine accepted ``request``: claim the prefill's blocks before it is scheduled."""
        state = self._decode_state(request)
        if state is None or state.remote is None or state.problem is not None:
            return
        if self._claims is not None:
            lease_s = state.remote.lease_s or self._settings.lease_s
            self._claims.claim(
                request.request_id, state.endpoints, state.remote.request_id, lease_s
            )

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        state = self._decode_state(request)
        if state is None or state.planned:
            return 0, False
        state.local_hit_tokens = num_computed_tokens
        if state.problem is None and self._lease_lost(request.request_id):
            state.problem = ParamsError(
                "the prefill instance's lease on these blocks has ended",
                RecomputeReason.LEASE_LOST,
            )
        if state.problem is not None:
            return 0, False
        count = int(request.num_prompt_tokens) - num_computed_tokens
        if count <= 0:
            return 0, False  # the local prefix cache covers the prompt: release only
        return count, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._decode_state(request)
        if state is None or state.planned:
            return
        state.planned = True
        request_id = request.request_id
        num_prompt = state.prompt_tokens = int(request.num_prompt_tokens)
        # Decided by get_num_new_matched_tokens in this same scheduling pass: a lease lost
        # since then must not change the answer, or vLLM would wait for a load never started.
        problem = state.problem
        if problem is not None:
            where = f"{state.remote.host}:{state.remote.port}" if state.remote else "nowhere"
            logger.warning(
                "request %s: not pulling KV from %s (%s); computing the prompt locally",
                request_id,
                where,
                problem,
            )
            self._recomputed(state, problem.reason, num_prompt - state.local_hit_tokens)
            self._release(request_id, state)
            return
        if num_external_tokens <= 0:
            # vLLM never serves a prompt's last token from cache, so a zero here means vLLM
            # itself declined external KV for this request (it skips reading any prefix
            # cache, e.g. for prompt logprobs): the prompt past the local hit is computed.
            missing = num_prompt - state.local_hit_tokens
            if missing > 1:
                self._recomputed(state, RecomputeReason.UNUSABLE, missing)
            else:
                state.outcome = Outcome.LOCAL_CACHE
            self._release(request_id, state)
            return
        assert state.remote is not None
        bs = self._settings.block_size
        local_tokens = num_prompt - num_external_tokens
        num_prompt_blocks = math.ceil(num_prompt / bs)
        first = local_tokens // bs
        (all_local,) = blocks.get_block_ids()[:1]
        local_ids = tuple(all_local[first:num_prompt_blocks])
        remote_ids = state.remote.block_ids[first:num_prompt_blocks]
        if local_tokens % bs or len(local_ids) != len(remote_ids) or not local_ids:
            # Cannot happen with a block-aligned local hit; pull nothing rather than
            # write KV into the wrong slots. The transfer is reported failed so
            # vLLM applies kv_load_failure_policy.
            logger.error(
                "request %s: cannot map %d external tokens onto blocks "
                "(local hit %d tokens, %d local / %d remote blocks)",
                request_id,
                num_external_tokens,
                local_tokens,
                len(local_ids),
                len(remote_ids),
            )
            local_ids, remote_ids = (), ()
        state.pulling = True
        if self._claims is not None:
            self._claims.pulling(request_id)
        self._pending_pulls.append(
            PullSpec(
                request_id=request_id,
                remote_host=state.remote.host,
                remote_port=state.remote.port,
                remote_request_id=state.remote.request_id,
                remote_engine_id=state.remote.engine_id,
                remote_block_ids=tuple(remote_ids),
                local_block_ids=local_ids,
                hold_token=state.remote.hold_token,
            )
        )

    def _lease_lost(self, request_id: str) -> bool:
        return self._claims is not None and self._claims.lost(request_id)

    def _release(self, request_id: str, state: _DecodeRequest) -> None:
        if self._claims is None or state.remote is None:
            return  # nowhere to send it; the lease expiry on the prefill side cleans up
        self._claims.release(request_id, state.endpoints, state.remote.request_id)

    def _recomputed(self, state: _DecodeRequest, reason: str, tokens: int) -> None:
        state.outcome = Outcome.RECOMPUTED
        state.recomputed_tokens = max(0, tokens)
        self._stats.recomputed(reason, state.recomputed_tokens)

    def _decode_state(self, request: Request) -> _DecodeRequest | None:
        """The request's handoff state, made on first sight; None for no remote prefill."""
        state = self._decodes.get(request.request_id)
        if state is not None:
            return state
        if not self._settings.is_consumer or not kvp.is_remote_prefill(request.kv_transfer_params):
            return None
        params = request.kv_transfer_params
        assert params is not None
        try:
            remote = RemotePrefill.parse(params)
        except ParamsError as exc:
            state = _DecodeRequest(remote=None, problem=exc)
        else:
            try:
                remote.check_against(
                    request.prompt_token_ids or [],
                    block_size=self._settings.block_size,
                    fingerprint=self._settings.fingerprint,
                )
            except ParamsError as exc:
                state = _DecodeRequest(remote=remote, problem=exc)
            else:
                state = _DecodeRequest(remote=remote, problem=None)
        self._decodes[request.request_id] = state
        return state

    # -- prefill side ---------------------------------------------------------------------------

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        state = self._decodes.pop(request.request_id, None)
        if state is not None:
            return False, self._decode_finished(request.request_id, state)
        params = request.kv_transfer_params
        if not (self._settings.is_producer and kvp.is_remote_decode(params)):
            return False, None
        if request.status not in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        ):
            return False, None  # aborted or failed: nobody will pull, free now
        if not block_ids:
            return False, None
        s = self._settings
        expires_at = self._clock() + s.lease_s
        self._pending_holds.append(HoldSpec(request.request_id, tuple(block_ids), expires_at))
        self._held[request.request_id] = len(block_ids)
        self._stats.blocks_held(sum(self._held.values()))
        prompt = list(request.prompt_token_ids or [])
        return True, RemotePrefill(
            engine_id=s.engine_id,
            request_id=request.request_id,
            host=s.public_host,
            port=s.port,
            block_ids=tuple(block_ids),
            num_tokens=len(prompt),
            prompt_digest=kvp.prompt_digest(prompt),
            block_size=s.block_size,
            tp_size=s.tp_size,
            fingerprint=dict(s.fingerprint),
            expiry_time=expires_at,
            lease_s=s.lease_s,
            hold_token=kvp.hold_token(s.secret, s.engine_id, request.request_id),
        ).to_params()

    def _decode_finished(self, request_id: str, state: _DecodeRequest) -> dict[str, Any] | None:
        if not state.planned:
            # Finished (aborted, or rejected by the API server) before it was ever
            # scheduled: the prefill side still holds.
            self._release(request_id, state)
            return None
        if self._claims is not None:
            self._claims.drop(request_id)
        return kvp.DecodeOutcome(state.outcome, state.recomputed_tokens).to_params()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        changed = False
        for request_id in connector_output.finished_sending or ():
            changed |= self._held.pop(request_id, None) is not None
        if changed:
            self._stats.blocks_held(sum(self._held.values()))
        finished_recving = connector_output.finished_recving or ()
        if not finished_recving:
            return
        worker_meta = connector_output.kv_connector_worker_meta
        failed = worker_meta.failed_blocks if isinstance(worker_meta, TcpPullWorkerMeta) else {}
        for request_id in finished_recving:
            if self._claims is not None:
                self._claims.drop(request_id)
            state = self._decodes.get(request_id)
            if state is None or not state.pulling:
                continue
            state.pulling = False
            if request_id in failed:
                blocks = failed[request_id]
                # No blocks: an abandoned pull, reported as a failed request, which vLLM
                # recomputes from the first prompt token.
                tokens = (
                    min(
                        blocks * self._settings.block_size,
                        state.prompt_tokens - state.local_hit_tokens,
                    )
                    if blocks
                    else state.prompt_tokens
                )
                self._recomputed(state, RecomputeReason.PULL_FAILED, tokens)

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
