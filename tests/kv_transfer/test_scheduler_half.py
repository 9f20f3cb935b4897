"""Scheduler-half decisions with fake vLLM Request / KVCacheBlocks objects (no engine).

The decode side's claims on prefill leases go to a fake ClaimKeeper that records every call
(the real one, over TCP, is tested in test_claims.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import RequestStatus

from kv_transfer import params as kvp
from kv_transfer.claims import ClaimKeeper
from kv_transfer.metadata import PullSpec, TcpPullWorkerMeta
from kv_transfer.scheduler import SchedulerSettings, TcpPullScheduler, prompt_digest

BS = 32
FINGERPRINT = {"model": "tiny", "dtype": "torch.float32", "block_size": BS, "tp_size": 1}
SECRET = b"sched-secret"
PREFILL = ("10.0.0.5", 15100)


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


class FakeClaims:
    """Records what the scheduler asks of its ClaimKeeper; ``lost_ids`` plays the network."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.lost_ids: set[str] = set()

    def claim(
        self,
        request_id: str,
        endpoints: Sequence[tuple[str, int]],
        remote_request_id: str,
        lease_s: float,
    ) -> None:
        self.calls.append(("claim", request_id, tuple(endpoints), remote_request_id, lease_s))

    def pulling(self, request_id: str) -> None:
        self.calls.append(("pulling", request_id))

    def drop(self, request_id: str) -> None:
        self.calls.append(("drop", request_id))

    def release(
        self, request_id: str, endpoints: Sequence[tuple[str, int]], remote_request_id: str
    ) -> None:
        self.calls.append(("release", request_id, tuple(endpoints), remote_request_id))

    def lost(self, request_id: str) -> bool:
        return request_id in self.lost_ids

    def stop(self) -> None:
        self.calls.append(("stop",))

    def named(self, op: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == op]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def settings(**overrides: Any) -> SchedulerSettings:
    base: dict[str, Any] = dict(
        engine_id="engine-p",
        block_size=BS,
        public_host=PREFILL[0],
        port=PREFILL[1],
        lease_s=30.0,
        fingerprint=FINGERPRINT,
        is_producer=True,
        is_consumer=True,
        secret=SECRET,
    )
    base.update(overrides)
    return SchedulerSettings(**base)


def scheduler(clock: Clock | None = None, **overrides: Any) -> tuple[TcpPullScheduler, FakeClaims]:
    claims = FakeClaims()
    sched = TcpPullScheduler(
        settings(**overrides), clock=clock or Clock(), claims=cast(ClaimKeeper, claims)
    )
    return sched, claims


def prefill(
    sched: TcpPullScheduler, tokens: list[int], blocks: list[int], rid: str = "p-1"
) -> dict[str, Any]:
    req = FakeRequest(rid, tokens, {"do_remote_decode": True}, RequestStatus.FINISHED_LENGTH_CAPPED)
    delay, params = sched.request_finished(req, blocks)  # type: ignore[arg-type]
    assert delay and params is not None
    return params


def decode_request(tokens: list[int], params: dict[str, Any], rid: str = "d-1") -> FakeRequest:
    return FakeRequest(rid, tokens, dict(params))


def output(
    finished_sending: set[str] | None = None,
    finished_recving: set[str] | None = None,
    failed_blocks: dict[str, int] | None = None,
) -> KVConnectorOutput:
    return KVConnectorOutput(
        finished_sending=finished_sending,
        finished_recving=finished_recving,
        kv_connector_worker_meta=(
            TcpPullWorkerMeta(failed_blocks=failed_blocks) if failed_blocks is not None else None
        ),
    )


def recomputed(sched: TcpPullScheduler) -> dict[str, list[int]]:
    stats = sched.get_kv_connector_stats()
    return {} if stats is None else dict(stats.data["recomputed"])


def finish(sched: TcpPullScheduler, req: FakeRequest) -> tuple[bool, dict[str, Any] | None]:
    req.status = RequestStatus.FINISHED_STOPPED
    return sched.request_finished(req, [])  # type: ignore[arg-type]


# -- prefill side ---------------------------------------------------------------------------------


def test_prefill_holds_blocks_and_returns_transfer_params() -> None:
    clock = Clock()
    sched, _claims = scheduler(clock)
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
    assert params["remote_lease_s"] == 30.0
    assert params["transfer_mode"] == kvp.TRANSFER_MODE
    # The block server (same secret, same engine id) will recognise this hold as issued.
    assert kvp.hold_token_valid(SECRET, "engine-p", "p-1", params["remote_hold_token"])
    assert not kvp.hold_token_valid(SECRET, "engine-p", "p-2", params["remote_hold_token"])
    # The params parse as what they describe.
    remote = kvp.RemotePrefill.parse(params)
    assert remote.block_ids == (5, 6, 7, 8) and remote.lease_s == 30.0
    meta = sched.build_connector_meta()
    assert [(h.request_id, h.block_ids, h.expires_at) for h in meta.holds] == [
        ("p-1", (5, 6, 7, 8), clock.now + 30.0)
    ]
    assert sched.build_connector_meta().holds == []  # per-step state is reset
    assert sched.blocks_held == 4
    stats = sched.get_kv_connector_stats()
    assert stats is not None and stats.data["blocks_held"] == 4
    sched.update_connector_output(output(finished_sending={"p-1"}))
    assert sched.blocks_held == 0
    stats = sched.get_kv_connector_stats()
    assert stats is not None and stats.data["blocks_held"] == 0


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])
def test_prefill_abort_frees_at_once(status: RequestStatus) -> None:
    sched, _claims = scheduler()
    req = FakeRequest("p-2", list(range(40)), {"do_remote_decode": True}, status)
    assert sched.request_finished(req, [1, 2]) == (False, None)  # type: ignore[arg-type]
    assert sched.build_connector_meta().holds == []
    assert sched.blocks_held == 0


def test_plain_request_is_left_alone() -> None:
    sched, claims = scheduler()
    req = FakeRequest("x", list(range(40)), None, RequestStatus.FINISHED_STOPPED)
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([1, 2]), 0)  # type: ignore[arg-type]
    assert sched.request_finished(req, [1, 2]) == (False, None)  # type: ignore[arg-type]
    assert claims.calls == [] and sched.build_connector_meta().pulls == []


def test_consumer_only_engine_never_holds() -> None:
    sched, _claims = scheduler(is_producer=False)
    req = FakeRequest(
        "p", list(range(40)), {"do_remote_decode": True}, RequestStatus.FINISHED_LENGTH_CAPPED
    )
    assert sched.request_finished(req, [1, 2]) == (False, None)  # type: ignore[arg-type]


def test_producer_only_engine_ignores_remote_prefill_params() -> None:
    sched, claims = scheduler(is_consumer=False)
    tokens = list(range(40))
    req = decode_request(tokens, prefill(sched, tokens, [1, 2]))
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    assert claims.calls == []


def test_shutdown_stops_the_claim_keeper() -> None:
    sched, claims = scheduler()
    sched.shutdown()
    assert claims.calls == [("stop",)]


# -- decode side ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "local_hit"),
    [(20, 0), (32, 0), (33, 0), (300, 0), (100, 64), (300, 256), (64, 32)],
    ids=["in-first-block", "on-boundary", "past-boundary", "9-blocks", "hit-2", "hit-8", "hit-1"],
)
def test_decode_pulls_only_blocks_after_the_local_hit(num_tokens: int, local_hit: int) -> None:
    sched, claims = scheduler()
    tokens = list(range(1000, 1000 + num_tokens))
    n_blocks = math.ceil(num_tokens / BS)
    remote_ids = list(range(100, 100 + n_blocks))
    params = prefill(sched, tokens, remote_ids)
    sched.build_connector_meta()
    req = decode_request(tokens, params)
    # Claimed as soon as the engine accepts it, before it is ever scheduled.
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert claims.calls == [("claim", "d-1", (PREFILL,), "p-1", 30.0)]
    expected = num_tokens - local_hit
    # Idempotent: vLLM may ask again when allocation fails.
    assert sched.get_num_new_matched_tokens(req, local_hit) == (expected, True)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, local_hit) == (expected, True)  # type: ignore[arg-type]
    local_ids = list(range(500, 500 + n_blocks))
    sched.update_state_after_alloc(req, FakeBlocks(local_ids), expected)  # type: ignore[arg-type]
    (spec,) = sched.build_connector_meta().pulls
    first = local_hit // BS
    assert spec.local_block_ids == tuple(local_ids[first:])
    assert spec.remote_block_ids == tuple(remote_ids[first:])
    assert spec.remote_request_id == "p-1" and spec.request_id == "d-1"
    assert spec.remote_engine_id == "engine-p"
    assert spec.hold_token == params["remote_hold_token"]
    assert (spec.remote_host, spec.remote_port) == PREFILL
    assert not spec.release_only
    # Planned once: the second post-load allocation and any re-admission pull nothing.
    sched.update_state_after_alloc(req, FakeBlocks(local_ids), 0)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    assert sched.build_connector_meta().pulls == []
    # The pull frees the prefill's blocks itself (read with release): no release, and the
    # claim is dropped once the pull is reported.
    assert claims.named("release") == []
    sched.update_connector_output(output(finished_recving={"d-1"}))
    assert claims.named("drop") == [("drop", "d-1")]
    assert recomputed(sched) == {}
    assert finish(sched, req) == (
        False,
        {"pdserve_kv_outcome": "transferred", "pdserve_kv_recomputed_tokens": 0},
    )


def test_the_params_are_parsed_once_per_request() -> None:
    """Later edits of the request's params (vLLM never makes any) change no decision."""
    sched, _claims = scheduler()
    tokens = list(range(64))
    params = prefill(sched, tokens, [1, 2])
    req = decode_request(tokens, params)
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert req.kv_transfer_params is not None
    req.kv_transfer_params["remote_port"] = 0
    assert sched.get_num_new_matched_tokens(req, 0) == (64, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([7, 8]), 64)  # type: ignore[arg-type]
    (spec,) = sched.build_connector_meta().pulls
    assert spec.remote_port == PREFILL[1]


def test_expired_params_are_still_pulled() -> None:
    """The lease lives as long as the decode claims it: the first expiry in the params is
    not a deadline for the decode."""
    clock = Clock()
    sched, claims = scheduler(clock)
    tokens = list(range(64))
    params = prefill(sched, tokens, [1, 2])
    clock.now += 3600
    req = decode_request(tokens, {**params, "remote_blocks_expiry_time": 1.0})
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert claims.named("claim")
    assert sched.get_num_new_matched_tokens(req, 0) == (64, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([7, 8]), 64)  # type: ignore[arg-type]
    assert len(sched.build_connector_meta().pulls) == 1


def test_claims_cover_every_prefill_rank_and_use_the_prefill_lease() -> None:
    sched, claims = scheduler(lease_s=30.0)
    tokens = list(range(40))
    params = {**prefill(sched, tokens, [1, 2]), "tp_size": 2, "remote_lease_s": 12.0}
    params.pop("kv_fingerprint")  # the local engine is TP 1; the fingerprint would refuse
    req = decode_request(tokens, params)
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert claims.calls == [("claim", "d-1", (PREFILL, (PREFILL[0], PREFILL[1] + 1)), "p-1", 12.0)]
    # A prefill that sends no lease: the decode's own.
    params.pop("remote_lease_s")
    other = decode_request(tokens, params, rid="d-2")
    sched.on_new_request(other)  # type: ignore[arg-type]
    assert claims.calls[-1][-1] == 30.0


@pytest.mark.parametrize("lease_s", [-1.0, 1e9])
def test_a_claim_never_asks_for_a_lease_a_block_server_refuses(lease_s: float) -> None:
    """Block servers accept renewals of 0 < extend_s <= 3600 s and close the connection on
    anything else; a claim with such a lease can never be renewed."""
    sched, claims = scheduler()
    tokens = list(range(40))
    req = decode_request(tokens, {**prefill(sched, tokens, [1, 2]), "remote_lease_s": lease_s})
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert all(0 < c[4] <= 3600 for c in claims.named("claim")), claims.calls


def test_full_local_hit_releases_through_the_keeper() -> None:
    sched, claims = scheduler()
    tokens = list(range(64))
    params = prefill(sched, tokens, [1, 2])
    req = decode_request(tokens, params)
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 64) == (0, False)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([9, 10]), 0)  # type: ignore[arg-type]
    assert sched.build_connector_meta().pulls == []
    assert claims.named("release") == [("release", "d-1", (PREFILL,), "p-1")]
    assert recomputed(sched) == {}
    assert finish(sched, req) == (
        False,
        {"pdserve_kv_outcome": "local_cache", "pdserve_kv_recomputed_tokens": 0},
    )
    assert len(claims.named("release")) == 1  # released once


@pytest.mark.parametrize(
    "tamper",
    [
        {"remote_prompt_digest": "0" * 32},
        {"remote_num_tokens": 7},
        {"block_size": 16},
        {"kv_fingerprint": {**FINGERPRINT, "dtype": "torch.bfloat16"}},
        {"remote_block_ids": [1]},
    ],
    ids=["digest", "num-tokens", "block-size", "dtype", "too-few-blocks"],
)
def test_incompatible_params_recompute_locally_and_release(
    tamper: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    sched, claims = scheduler()
    tokens = list(range(70))
    params = prefill(sched, tokens, [1, 2, 3])
    sched.build_connector_meta()
    req = decode_request(tokens, {**params, **tamper})
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert claims.named("claim") == []  # nothing worth keeping alive
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="kv_transfer.scheduler"):
        sched.update_state_after_alloc(req, FakeBlocks([4, 5, 6]), 0)  # type: ignore[arg-type]
    assert sched.build_connector_meta().pulls == []
    # The prefill instance is told at once instead of holding until its lease ends.
    assert claims.named("release") == [("release", "d-1", (PREFILL,), "p-1")]
    assert any(
        r.levelno == logging.WARNING and "d-1" in r.getMessage() and "10.0.0.5" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    assert recomputed(sched) == {"unusable": [1, 70]}
    assert finish(sched, req) == (
        False,
        {"pdserve_kv_outcome": "recomputed", "pdserve_kv_recomputed_tokens": 70},
    )


def test_unusable_params_count_only_the_tokens_past_the_local_hit() -> None:
    sched, _claims = scheduler()
    tokens = list(range(70))
    req = decode_request(tokens, {**prefill(sched, tokens, [1, 2, 3]), "block_size": 16})
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 32) == (0, False)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([4, 5, 6]), 0)  # type: ignore[arg-type]
    assert recomputed(sched) == {"unusable": [1, 38]}


@pytest.mark.parametrize(
    "params",
    [
        {"do_remote_prefill": True, "remote_block_ids": [1]},
        {"do_remote_prefill": True, "remote_host": "h", "remote_port": 0, "remote_request_id": "p"},
        {
            "do_remote_prefill": True,
            "remote_host": "h",
            "remote_port": 1,
            "remote_request_id": "p",
            "remote_block_ids": [1],
            "transfer_mode": "nixl",
        },
    ],
    ids=["no-address", "bad-port", "other-transfer-mode"],
)
def test_params_that_name_no_usable_prefill_are_recomputed_without_a_release(
    params: dict[str, Any],
) -> None:
    sched, claims = scheduler()
    req = decode_request(list(range(10)), params)
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([4]), 0)  # type: ignore[arg-type]
    assert sched.build_connector_meta().pulls == []
    assert claims.calls == []  # no address to claim or release at
    assert recomputed(sched) == {"unusable": [1, 10]}
    assert finish(sched, req) == (
        False,
        {"pdserve_kv_outcome": "recomputed", "pdserve_kv_recomputed_tokens": 10},
    )


def test_a_lost_lease_recomputes_locally_and_releases(caplog: pytest.LogCaptureFixture) -> None:
    sched, claims = scheduler()
    tokens = list(range(70))
    req = decode_request(tokens, prefill(sched, tokens, [1, 2, 3]))
    sched.on_new_request(req)  # type: ignore[arg-type]
    claims.lost_ids.add("d-1")  # the keeper found the lease gone while the request waited
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="kv_transfer.scheduler"):
        sched.update_state_after_alloc(req, FakeBlocks([4, 5, 6]), 0)  # type: ignore[arg-type]
    assert sched.build_connector_meta().pulls == []
    assert claims.named("release") == [("release", "d-1", (PREFILL,), "p-1")]
    assert any("lease" in r.getMessage() for r in caplog.records), caplog.text
    assert recomputed(sched) == {"lease_lost": [1, 70]}
    assert finish(sched, req) == (
        False,
        {"pdserve_kv_outcome": "recomputed", "pdserve_kv_recomputed_tokens": 70},
    )


def test_a_lease_lost_after_the_match_still_gives_vllm_a_finished_load() -> None:
    """get_num_new_matched_tokens said (n, True): vLLM has put the request in
    WAITING_FOR_REMOTE_KVS and waits for it in finished_recving. If the keeper's thread marks
    the lease lost between that call and update_state_after_alloc (same scheduler step), the
    worker must still be given a pull (it fails fast, the prefill remembers ended leases) or
    an abandoned pull, or the request waits forever."""
    sched, claims = scheduler()
    tokens = list(range(64))
    req = decode_request(tokens, prefill(sched, tokens, [1, 2]))
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (64, True)  # type: ignore[arg-type]
    claims.lost_ids.add("d-1")
    sched.update_state_after_alloc(req, FakeBlocks([7, 8]), 64)  # type: ignore[arg-type]
    pulls = sched.build_connector_meta().pulls
    assert [p.request_id for p in pulls] == ["d-1"]


def test_a_failed_pull_is_counted_as_recomputed() -> None:
    sched, claims = scheduler()
    tokens = list(range(100))
    req = decode_request(tokens, prefill(sched, tokens, [1, 2, 3, 4]))
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 32) == (68, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([5, 6, 7, 8]), 68)  # type: ignore[arg-type]
    (spec,) = sched.build_connector_meta().pulls
    assert spec.local_block_ids == (6, 7, 8)
    # Three blocks did not arrive: at most the 68 tokens past the local hit are recomputed.
    sched.update_connector_output(output(finished_recving={"d-1"}, failed_blocks={"d-1": 3}))
    assert claims.named("drop") == [("drop", "d-1")]
    assert recomputed(sched) == {"pull_failed": [1, 68]}
    assert finish(sched, req) == (
        False,
        {"pdserve_kv_outcome": "recomputed", "pdserve_kv_recomputed_tokens": 68},
    )


def test_a_partly_failed_pull_counts_its_blocks() -> None:
    sched, _claims = scheduler()
    tokens = list(range(200))
    req = decode_request(tokens, prefill(sched, tokens, list(range(7))))
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (200, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks(list(range(10, 17))), 200)  # type: ignore[arg-type]
    sched.build_connector_meta()
    # Other requests' failures in the same step are not this one's.
    sched.update_connector_output(
        output(finished_recving={"d-1"}, failed_blocks={"d-1": 2, "d-other": 5})
    )
    assert recomputed(sched) == {"pull_failed": [1, 64]}
    # Reported once: a duplicate report (cannot happen) is not counted again.
    sched.update_connector_output(output(finished_recving={"d-1"}, failed_blocks={"d-1": 2}))
    assert recomputed(sched) == {}


def test_an_abandoned_pull_releases_and_counts_its_tokens(caplog: pytest.LogCaptureFixture) -> None:
    """A local hit that is not block aligned cannot be mapped: the scheduler abandons the pull
    (no block ids), the worker releases the prefill and reports a failed load, and vLLM
    recomputes the request (failed_recving resets it to 0 computed tokens)."""
    sched, _claims = scheduler()
    tokens = list(range(70))
    req = decode_request(tokens, prefill(sched, tokens, [1, 2, 3]))
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 10) == (60, True)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="kv_transfer.scheduler"):
        sched.update_state_after_alloc(req, FakeBlocks([4, 5, 6]), 60)  # type: ignore[arg-type]
    (spec,) = sched.build_connector_meta().pulls
    assert isinstance(spec, PullSpec) and spec.release_only
    assert spec.remote_request_id == "p-1" and spec.hold_token
    assert any("cannot map" in r.getMessage() for r in caplog.records)
    # What the worker reports for it (test_worker_half): failed, with no local blocks.
    sched.update_connector_output(output(finished_recving={"d-1"}, failed_blocks={"d-1": 0}))
    counted = recomputed(sched)
    assert counted.get("pull_failed", [0, 0])[0] == 1
    assert counted["pull_failed"][1] >= 60, counted


def test_decode_aborted_before_scheduling_releases_the_prefill() -> None:
    sched, claims = scheduler()
    tokens = list(range(50))
    params = prefill(sched, tokens, [1, 2])
    sched.build_connector_meta()
    req = decode_request(tokens, params)
    sched.on_new_request(req)  # type: ignore[arg-type]
    req.status = RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(req, []) == (False, None)  # type: ignore[arg-type]
    assert claims.named("release") == [("release", "d-1", (PREFILL,), "p-1")]
    assert sched.build_connector_meta().pulls == []
    # A second finish (cannot happen in vLLM) does not release twice.
    assert sched.request_finished(req, []) == (False, None)  # type: ignore[arg-type]
    assert len(claims.named("release")) == 1


def test_decode_aborted_after_pull_started_does_nothing_more() -> None:
    sched, claims = scheduler()
    tokens = list(range(50))
    params = prefill(sched, tokens, [1, 2])
    sched.build_connector_meta()
    req = decode_request(tokens, params)
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (50, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([7, 8]), 50)  # type: ignore[arg-type]
    assert len(sched.build_connector_meta().pulls) == 1
    req.status = RequestStatus.FINISHED_ABORTED
    # The worker's pull still completes and releases; nothing else to queue or release.
    delay, _outcome = sched.request_finished(req, [7, 8])  # type: ignore[arg-type]
    assert delay is False
    assert sched.build_connector_meta().pulls == []
    assert claims.named("release") == []
    assert ("drop", "d-1") in claims.calls  # renewals stop; the read releases
    # The pull's report arrives after the request is gone: nothing is counted.
    sched.update_connector_output(output(finished_recving={"d-1"}, failed_blocks={"d-1": 2}))
    assert recomputed(sched) == {}


def test_nixl_style_nested_block_ids_are_accepted() -> None:
    sched, _claims = scheduler()
    tokens = list(range(40))
    params = prefill(sched, tokens, [3, 4])
    params["remote_block_ids"] = [[3, 4]]
    req = decode_request(tokens, params)
    assert sched.get_num_new_matched_tokens(req, 0) == (40, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([7, 8]), 40)  # type: ignore[arg-type]
    (spec,) = sched.build_connector_meta().pulls
    assert spec.remote_block_ids == (3, 4)


def test_without_a_claim_keeper_decisions_are_the_same() -> None:
    """A scheduler built without a keeper (claims=None) still pulls; nothing is claimed."""
    sched = TcpPullScheduler(settings())
    tokens = list(range(64))
    req = decode_request(tokens, prefill(sched, tokens, [1, 2]))
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (64, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([7, 8]), 64)  # type: ignore[arg-type]
    assert len(sched.build_connector_meta().pulls) == 1
    sched.update_connector_output(output(finished_recving={"d-1"}))
    assert finish(sched, req)[1] == {
        "pdserve_kv_outcome": "transferred",
        "pdserve_kv_recomputed_tokens": 0,
    }


def test_external_kv_declined_by_vllm_counts_as_recomputed() -> None:
    """get_num_new_matched_tokens offered the prompt, but vLLM allocated for 0 external tokens
    (it skips every prefix cache for some requests, e.g. with prompt logprobs): the prompt is
    computed on the decode, and that is said, not reported as a cache hit."""
    sched, claims = scheduler()
    tokens = list(range(100))
    req = decode_request(tokens, prefill(sched, tokens, [1, 2, 3, 4]))
    sched.on_new_request(req)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 0) == (100, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, FakeBlocks([5, 6, 7, 8]), 0)  # type: ignore[arg-type]
    assert sched.build_connector_meta().pulls == []
    assert claims.named("release") == [("release", "d-1", (PREFILL,), "p-1")]
    assert recomputed(sched) == {"unusable": [1, 100]}
    assert finish(sched, req) == (
        False,
        {"pdserve_kv_outcome": "recomputed", "pdserve_kv_recomputed_tokens": 100},
    )
