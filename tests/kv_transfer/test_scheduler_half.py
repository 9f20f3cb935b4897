"""Scheduler-half decisions with fake vLLM Request / KVCacheBlocks objects (no engine)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from vllm.v1.request import RequestStatus

from kv_transfer.metadata import PullSpec
from kv_transfer.scheduler import (
    HANDLED_KEY,
    SchedulerSettings,
    TcpPullScheduler,
    prompt_digest,
)

BS = 32
FINGERPRINT = {"model": "tiny", "dtype": "torch.float32", "block_size": BS, "tp_size": 1}


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    status: RequestStatus = RequestStatus.WAITING

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class FakeBlocks:
    ids: list[int] = field(default_factory=list)

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


class FakeOutput:
    def __init__(self, finished_sending: set[str]) -> None:
        self.finished_sending = finished_sending


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def settings(**overrides: Any) -> SchedulerSettings:
    base: dict[str, Any] = dict(
        engine_id="engine-p",
        block_size=BS,
        public_host="10.0.0.5",
        port=15100,
        lease_s=30.0,
        fingerprint=FINGERPRINT,
        is_producer=True,
        is_consumer=True,
    )
    base.update(overrides)
    return SchedulerSettings(**base)


def prefill(
    sched: TcpPullScheduler, tokens: list[int], blocks: list[int], rid: str = "p-1"
) -> dict[str, Any]:
    req = FakeRequest(rid, tokens, {"do_remote_decode": True}, RequestStatus.FINISHED_LENGTH_CAPPED)
    delay, params = sched.request_finished(req, blocks)
    assert delay and params is not None
    return params


def test_prefill_holds_blocks_and_returns_transfer_params() -> None:
    clock = Clock()
    sched = TcpPullScheduler(settings(), clock=clock)
    tokens = list(range(100))
    params = prefill(sched, tokens, [5, 6, 7, 8])
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_host"] == "10.0.0.5" and params["remote_port"] == 15100
    assert params["remote_engine_id"] == "engine-p" and params["remote_request_id"] == "p-1"
    assert params["remote_block_ids"] == [5, 6, 7, 8]
    assert params["remote_blocks_expiry_time"] == clock.now + 30.0
    assert params["block_size"] == BS and params["tp_size"] == 1
    assert params["remote_num_tokens"] == 100
    assert params["remote_prompt_digest"] == prompt_digest(tokens)
    assert params["kv_fingerprint"] == FINGERPRINT
    meta = sched.build_connector_meta()
    assert [(h.request_id, h.block_ids, h.expires_at) for h in meta.holds] == [
        ("p-1", (5, 6, 7, 8), clock.now + 30.0)
    ]
    assert sched.build_connector_meta().holds == []  # per-step state is reset
    assert sched.blocks_held == 4
    stats = sched.get_kv_connector_stats()
    assert stats is not None and stats.data["blocks_held"] == 4
    sched.update_connector_output(FakeOutput({"p-1"}))  # type: ignore[arg-type]
    assert sched.blocks_held == 0
    stats = sched.get_kv_connector_stats()
    assert stats is not None and stats.data["blocks_held"] == 0


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])
def test_prefill_abort_frees_at_once(status: RequestStatus) -> None:
    sched = TcpPullScheduler(settings())
    req = FakeRequest("p-2", list(range(40)), {"do_remote_decode": True}, status)
    assert sched.request_finished(req, [1, 2]) == (False, None)
    assert sched.build_connector_meta().holds == []
    assert sched.blocks_held == 0


def test_plain_request_is_left_alone() -> None:
    sched = TcpPullScheduler(settings())
    req = FakeRequest("x", list(range(40)), None, RequestStatus.FINISHED_STOPPED)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.request_finished(req, [1, 2]) == (False, None)


def decode_request(tokens: list[int], params: dict[str, Any], rid: str = "d-1") -> FakeRequest:
    return FakeRequest(rid, tokens, dict(params))


@pytest.mark.parametrize(
    ("num_tokens", "local_hit"),
    [(20, 0), (32, 0), (33, 0), (300, 0), (100, 64), (300, 256), (64, 32)],
    ids=["in-first-block", "on-boundary", "past-boundary", "9-blocks", "hit-2", "hit-8", "hit-1"],
)
def test_decode_pulls_only_blocks_after_the_local_hit(num_tokens: int, local_hit: int) -> None:
    sched = TcpPullScheduler(settings())
    tokens = list(range(1000, 1000 + num_tokens))
    n_blocks = math.ceil(num_tokens / BS)
    remote_ids = list(range(100, 100 + n_blocks))
    params = prefill(sched, tokens, remote_ids)
    sched.build_connector_meta()
    req = decode_request(tokens, params)
    expected = num_tokens - local_hit
    # Idempotent: vLLM may ask again when allocation fails.
    assert sched.get_num_new_matched_tokens(req, local_hit) == (expected, True)
    assert sched.get_num_new_matched_tokens(req, local_hit) == (expected, True)
    local_ids = list(range(500, 500 + n_blocks))
    sched.update_state_after_alloc(req, FakeBlocks(local_ids), expected)  # type: ignore[arg-type]
    (spec,) = sched.build_connector_meta().pulls
    first = local_hit // BS
    assert spec.local_block_ids == tuple(local_ids[first:])
    assert spec.remote_block_ids == tuple(remote_ids[first:])
    assert spec.report and spec.remote_request_id == "p-1"
    assert (spec.remote_host, spec.remote_port) == ("10.0.0.5", 15100)
    # Handled once: the second post-load allocation and any re-admission pull nothing.
    assert req.kv_transfer_params is not None and req.kv_transfer_params[HANDLED_KEY]
    sched.update_state_after_alloc(req, FakeBlocks(local_ids), 0)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.build_connector_meta().pulls == []


def test_full_local_hit_only_releases() -> None:
    sched = TcpPullScheduler(settings())
    tokens = list(range(64))
    params = prefill(sched, tokens, [1, 2])
    req = decode_request(tokens, params)
    assert sched.get_num_new_matched_tokens(req, 64) == (0, False)
    sched.update_state_after_alloc(req, FakeBlocks([9, 10]), 0)  # type: ignore[arg-type]
    (spec,) = sched.build_connector_meta().pulls
    assert spec.release_only and not spec.report
    assert spec.remote_request_id == "p-1"


def _release_only(sched: TcpPullScheduler) -> PullSpec:
    (spec,) = sched.build_connector_meta().pulls
    assert spec.release_only and not spec.report
    return spec


@pytest.mark.parametrize(
    "tamper",
    [
        {"remote_prompt_digest": "0" * 32},
        {"remote_num_tokens": 7},
        {"block_size": 16},
        {"kv_fingerprint": {**FINGERPRINT, "dtype": "torch.bfloat16"}},
        {"remote_block_ids": [1]},
        {"remote_blocks_expiry_time": 1.0},
        {"transfer_mode": "nixl"},
    ],
    ids=["digest", "num-tokens", "block-size", "dtype", "too-few-blocks", "expired", "mode"],
)
def test_unusable_params_recompute_locally_but_release(tamper: dict[str, Any]) -> None:
    sched = TcpPullScheduler(settings())
    tokens = list(range(70))
    params = prefill(sched, tokens, [1, 2, 3])
    sched.build_connector_meta()
    req = decode_request(tokens, {**params, **tamper})
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, FakeBlocks([4, 5, 6]), 0)  # type: ignore[arg-type]
    _release_only(sched)


def test_params_without_an_address_are_ignored() -> None:
    sched = TcpPullScheduler(settings())
    req = decode_request(list(range(10)), {"do_remote_prefill": True, "remote_block_ids": [1]})
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, FakeBlocks([4]), 0)  # type: ignore[arg-type]
    assert sched.build_connector_meta().pulls == []


def test_decode_aborted_before_scheduling_releases_the_prefill() -> None:
    sched = TcpPullScheduler(settings())
    tokens = list(range(50))
    params = prefill(sched, tokens, [1, 2])
    sched.build_connector_meta()
    req = decode_request(tokens, params)
    req.status = RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(req, []) == (False, None)
    spec = _release_only(sched)
    assert spec.remote_request_id == "p-1"
    # A second finish (cannot happen in vLLM) does not release twice.
    assert sched.request_finished(req, []) == (False, None)
    assert sched.build_connector_meta().pulls == []


def test_decode_aborted_after_pull_started_does_nothing_more() -> None:
    sched = TcpPullScheduler(settings())
    tokens = list(range(50))
    params = prefill(sched, tokens, [1, 2])
    sched.build_connector_meta()
    req = decode_request(tokens, params)
    assert sched.get_num_new_matched_tokens(req, 0) == (50, True)
    sched.update_state_after_alloc(req, FakeBlocks([7, 8]), 50)  # type: ignore[arg-type]
    assert len(sched.build_connector_meta().pulls) == 1
    req.status = RequestStatus.FINISHED_ABORTED
    # The worker's pull still completes and releases; nothing else to queue.
    assert sched.request_finished(req, [7, 8]) == (False, None)
    assert sched.build_connector_meta().pulls == []


def test_consumer_only_engine_never_holds() -> None:
    sched = TcpPullScheduler(settings(is_producer=False))
    req = FakeRequest(
        "p", list(range(40)), {"do_remote_decode": True}, RequestStatus.FINISHED_LENGTH_CAPPED
    )
    assert sched.request_finished(req, [1, 2]) == (False, None)


def test_nixl_style_nested_block_ids_are_accepted() -> None:
    sched = TcpPullScheduler(settings())
    tokens = list(range(40))
    params = prefill(sched, tokens, [3, 4])
    params["remote_block_ids"] = [[3, 4]]
    req = decode_request(tokens, params)
    assert sched.get_num_new_matched_tokens(req, 0) == (40, True)
