"""Fast tests of the capacity planner: the profile format, the fitted step model, the fleet
simulator (against closed forms and a naive step-by-step reference), goodput, the P:D split
and ``pdserve plan``.

The reference simulator below runs one engine a step at a time, token by token, with the
scheduling rules the simulator documents; the simulator jumps over decode-only stretches in
closed form, so agreement to rounding checks that jumping.
"""

from __future__ import annotations

import json
import math
import sys
import types
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.planner import cli as planner_cli
from benchmarks.planner.profile_model import (
    PROFILE_FORMAT,
    DecodeSample,
    KvPullSample,
    PrefillSample,
    Profile,
    ProfileError,
    StepModel,
    fit_errors,
    fit_report,
    prefill_attention,
)
from benchmarks.planner.simulate import (
    MIN_STEP_S,
    Deployment,
    InstanceModel,
    Routing,
    Slo,
    goodput,
    poisson_arrivals,
    recommend_split,
    simulate,
    simulate_at_rate,
)
from benchmarks.workload import WorkloadRequest, WorkloadSpec, generate
from deploy.cli import SUBCOMMANDS, main
from proxy.instances import Instance
from proxy.routing import RoutingPolicy, RoutingRequest
from proxy.routing.least_load import LeastLoadPolicy
from proxy.routing.prefill_cost import PrefillCostPolicy

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]

# A GPU-like engine: 5 ms a step, ~20k prefill tokens/s, memory-bound decode.
TRUTH = StepModel(
    base_s=0.005,
    prefill_token_s=5e-5,
    prefill_attention_s=2e-9,
    decode_seq_s=1e-4,
    decode_context_token_s=2e-7,
    kv_pull_base_s=0.001,
    kv_pull_s_per_byte=1e-10,
)


def _profile(truth: StepModel = TRUTH, **overrides: Any) -> Profile:
    """A profile whose samples the model ``truth`` predicts exactly."""
    budget = overrides.get("max_num_batched_tokens", 2048)
    prefill = []
    for prompt in (64, 256, 1024, 4096):
        for batch in (1, 2, 4):
            sample = PrefillSample(prompt, batch, 1.0)
            seconds = truth.step_seconds(sample.tokens, sample.attention, 0, 0)
            seconds += (sample.steps(budget) - 1) * truth.base_s
            prefill.append(PrefillSample(prompt, batch, seconds))
    decode = [
        DecodeSample(batch, context, truth.step_seconds(0, 0, batch, batch * context))
        for batch in (1, 8, 32, 128)
        for context in (128, 512, 2048)
    ]
    kv_pull = [KvPullSample(n, truth.kv_pull_seconds(n)) for n in (1 << 20, 1 << 24, 1 << 27)]
    fields: dict[str, Any] = {
        "model": "synthetic-8b",
        "hardware": "made up",
        "created": "2026-01-01T00:00:00+0000",
        "block_size": 16,
        "kv_bytes_per_token": 131072,
        "max_num_batched_tokens": budget,
        "max_num_seqs": 256,
        "prefill": prefill,
        "decode": decode,
        "kv_pull": kv_pull,
        "proxy_overhead_s": 0.0005,
    }
    fields.update(overrides)
    return Profile(**fields)


def _model(
    step: StepModel = TRUTH,
    budget: int = 2048,
    seqs: int = 256,
    kv_bytes: int = 131072,
    overhead: float = 0.0,
) -> InstanceModel:
    return InstanceModel(step, budget, seqs, kv_bytes, overhead)


def _requests(n: int, seed: int = 0, **spec: Any) -> list[WorkloadRequest]:
    return generate(WorkloadSpec(num_requests=n, seed=seed, **spec))


# -- the profile format -----------------------------------------------------------------------


def test_profile_round_trips_through_json_and_a_file(tmp_path: Path) -> None:
    profile = _profile()
    assert Profile.from_json(profile.to_json()) == profile
    path = tmp_path / "sub" / "profile.json"
    profile.save(path)
    assert Profile.load(path) == profile
    document = json.loads(path.read_text())
    assert next(iter(document)) == "format"
    assert document["format"] == PROFILE_FORMAT == "pdserve-plan-profile/1"
    assert document["decode"][0] == {
        "batch": 1,
        "context_tokens": 128,
        "seconds": pytest.approx(0.0051256),
    }


def test_optional_fields_default() -> None:
    document = _profile().to_dict()
    del document["kv_pull"], document["proxy_overhead_s"]
    profile = Profile.from_dict(document)
    assert (profile.kv_pull, profile.proxy_overhead_s) == ([], 0.0)


def _broken(change: Any) -> dict[str, Any]:
    document = _profile().to_dict()
    change(document)
    return document


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.update(format="pdserve-plan-profile/0"),
            r"^format: expected 'pdserve-plan-profile/1'",
        ),
        (lambda d: d.pop("format"), r"^format: expected"),
        (lambda d: d.pop("max_num_seqs"), r"^max_num_seqs: missing"),
        (lambda d: d.pop("model"), r"^model: missing"),
        (lambda d: d.update(block_size=-16), r"^block_size: must be >= 1, got -16"),
        (lambda d: d.update(kv_bytes_per_token=-1), r"^kv_bytes_per_token: must be >= 0"),
        (lambda d: d.update(proxy_overhead_s=-0.1), r"^proxy_overhead_s: must be >= 0"),
        (lambda d: d.update(max_num_seqs=1.5), r"^max_num_seqs: must be an integer"),
        (lambda d: d.update(max_num_seqs=True), r"^max_num_seqs: must be an integer"),
        (lambda d: d.update(max_num_batched_tokens=8), r"^max_num_batched_tokens: must be >= max"),
        (lambda d: d.update(hardware=3), r"^hardware: must be a string"),
        (lambda d: d.update(colour="blue"), r"^colour: unknown field"),
        (lambda d: d["prefill"][2].update(seconds=-0.5), r"^prefill\[2\]\.seconds: must be > 0"),
        (lambda d: d["decode"][1].update(batch=0), r"^decode\[1\]\.batch: must be >= 1, got 0"),
        (lambda d: d["decode"][0].pop("context_tokens"), r"^decode\[0\]\.context_tokens: missing"),
        (lambda d: d["kv_pull"][0].update(bytes=-5), r"^kv_pull\[0\]\.bytes: must be >= 0"),
        (lambda d: d["kv_pull"][0].update(extra=1), r"^kv_pull\[0\]\.extra: unknown field"),
        (lambda d: d["decode"].__setitem__(0, [1, 2, 3]), r"^decode\[0\]: must be an object"),
        (lambda d: d.update(prefill=[]), r"^prefill: needs at least one sample"),
        (lambda d: d.update(decode={}), r"^decode: must be a list"),
    ],
)
def test_bad_profiles_are_refused_naming_the_field(change: Any, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        Profile.from_dict(_broken(change))


def test_unreadable_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"nope\.json: cannot read"):
        Profile.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match=r"bad\.json: not valid JSON"):
        Profile.load(bad)
    bad.write_text("[]")
    with pytest.raises(ProfileError, match="expected a JSON object"):
        Profile.load(bad)
    assert issubclass(ProfileError, ValueError)


# -- the fitted model -------------------------------------------------------------------------


def test_fit_recovers_known_coefficients() -> None:
    fitted = StepModel.fit(_profile())
    for name, value in TRUTH.coefficients().items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6), name
    assert fitted.kv_pull_bandwidth_bytes_per_s == pytest.approx(1e10)
    assert all(abs(fit.relative_error) < 1e-9 for fit in fit_errors(_profile(), fitted))


def test_fit_counts_the_constant_of_every_chunked_step() -> None:
    # 4096-token samples are two or more steps of a 1024-token budget.
    profile = _profile(max_num_batched_tokens=1024)
    assert max(s.steps(1024) for s in profile.prefill) == 16
    fitted = StepModel.fit(profile)
    assert fitted.prefill_token_s == pytest.approx(TRUTH.prefill_token_s, rel=1e-6)
    assert fitted.base_s == pytest.approx(TRUTH.base_s, rel=1e-6)


def test_attention_pairs_do_not_depend_on_chunking() -> None:
    whole = prefill_attention(1000, 0)
    assert whole == 1000 * 1001 // 2
    chunks = prefill_attention(300, 0) + prefill_attention(500, 300) + prefill_attention(200, 800)
    assert chunks == whole


def test_coefficients_stay_non_negative() -> None:
    # Decode steps that get faster with the batch would need a negative per-sequence cost.
    profile = _profile()
    decode = [DecodeSample(b, 256, 0.02 - 0.0001 * b) for b in (1, 8, 32, 64)]
    fitted = StepModel.fit(Profile(**{**vars(profile), "decode": decode}))
    assert all(value >= 0 for value in fitted.coefficients().values())
    assert fitted.decode_seq_s == 0.0


def test_no_kv_pull_samples_means_free_pulls() -> None:
    fitted = StepModel.fit(_profile(kv_pull=[]))
    assert fitted.kv_pull_seconds(1 << 30) == 0.0
    assert math.isinf(fitted.kv_pull_bandwidth_bytes_per_s)


def test_fit_report_points_at_the_sample_that_is_off() -> None:
    profile = _profile()
    decode = list(profile.decode)
    decode[5] = DecodeSample(decode[5].batch, decode[5].context_tokens, decode[5].seconds * 3)
    skewed = Profile(**{**vars(profile), "decode": decode})
    report = fit_report(skewed, StepModel.fit(skewed))
    worst = report["errors"]["decode"]["worst"]
    assert (worst["batch"], worst["context_tokens"]) == (decode[5].batch, decode[5].context_tokens)
    assert worst["relative_error"] < -0.3  # the model is far faster than that sample
    assert report["errors"]["prefill"]["samples"] == len(profile.prefill)
    assert set(report["coefficients"]) == set(TRUTH.coefficients())


# -- the simulator against closed forms -------------------------------------------------------

CONSTANT = StepModel(base_s=0.02)


def test_spaced_arrivals_each_take_one_step() -> None:
    requests = [WorkloadRequest(100, 1)] * 5
    result = simulate(_model(CONSTANT), Deployment.aggregated(1), requests, [0, 1, 2, 3, 4])
    assert result.ttft_s == pytest.approx([0.02] * 5, abs=1e-12)
    assert result.e2e_s == pytest.approx([0.02] * 5, abs=1e-12)
    assert result.request(0).tpot_s is None
    assert math.isnan(result.tpot.p50)


def test_queueing_when_arrivals_come_faster_than_service() -> None:
    # One running sequence at a time: an M/D/1 queue with deterministic arrivals every gap.
    step, gap = 0.02, 0.005
    requests = [WorkloadRequest(100, 1)] * 8
    arrivals = [k * gap for k in range(8)]
    result = simulate(_model(CONSTANT, seqs=1), Deployment.aggregated(1), requests, arrivals)
    expected = [(k + 1) * step - k * gap for k in range(8)]
    assert result.ttft_s == pytest.approx(expected, abs=1e-12)


def test_a_burst_shares_one_step() -> None:
    requests = [WorkloadRequest(100, 1)] * 10
    result = simulate(_model(CONSTANT), Deployment.aggregated(1), requests, [0.0] * 10)
    assert result.ttft_s == pytest.approx([0.02] * 10, abs=1e-12)


def test_one_request_decodes_with_growing_context() -> None:
    step = StepModel(
        base_s=0.01, prefill_token_s=1e-4, decode_seq_s=1e-3, decode_context_token_s=1e-5
    )
    prompt, output = 200, 50
    result = simulate(
        _model(step), Deployment.aggregated(1), [WorkloadRequest(prompt, output)], [0.0]
    )
    ttft = 0.01 + 1e-4 * prompt
    decode = sum(0.01 + 1e-3 + 1e-5 * (prompt + j) for j in range(output - 1))
    timing = result.request(0)
    assert timing.ttft_s == pytest.approx(ttft, rel=1e-12)
    assert timing.e2e_s == pytest.approx(ttft + decode, rel=1e-12)
    assert timing.tpot_s == pytest.approx(decode / (output - 1), rel=1e-12)


def test_pd_first_token_comes_from_the_decode_after_the_pull() -> None:
    model = _model(TRUTH, overhead=0.001)
    prompt, output = 300, 10
    result = simulate(model, Deployment.pd(1, 1), [WorkloadRequest(prompt, output)], [0.0])
    prefill = TRUTH.step_seconds(prompt, prefill_attention(prompt, 0), 0, 0)
    pull = TRUTH.kv_pull_seconds(prompt * 131072)
    first_decode = TRUTH.step_seconds(0, 0, 1, prompt)
    expected = 0.001 + prefill + 0.001 + pull + first_decode
    timing = result.request(0)
    assert timing.ttft_s == pytest.approx(expected, rel=1e-12)
    assert timing.prefill_instance == "http://prefill-0.sim:8000"
    assert timing.decode_instance == "http://decode-0.sim:8000"


# -- the simulator against a step-by-step reference -------------------------------------------


def _reference_engine(
    model: InstanceModel, jobs: Sequence[tuple[float, int, int]], mode: str
) -> tuple[list[float], list[float]]:
    """(first token, finish) per (arrival, prompt, output) job on one engine, a step at a time.

    mode "aggregated": prefill then decode; "prefill": a job finishes when its prompt is
    prefilled; "decode": jobs arrive prefilled and join the decode batch.
    """
    step, budget_max, max_seqs = model.step, model.max_num_batched_tokens, model.max_num_seqs
    n = len(jobs)
    order = sorted(range(n), key=lambda j: jobs[j][0])
    first, finish = [math.nan] * n, [math.nan] * n
    waiting: deque[int] = deque()
    joins: deque[int] = deque()
    decodes: dict[int, list[int]] = {}  # job -> [tokens to go, context]
    partial: list[int] | None = None  # [job, prefilled]
    now, arrived = 0.0, 0
    while True:
        while arrived < n and jobs[order[arrived]][0] <= now:
            (joins if mode == "decode" else waiting).append(order[arrived])
            arrived += 1
        if not (waiting or joins or decodes or partial):
            if arrived == n:
                return first, finish
            now = jobs[order[arrived]][0]
            continue
        running = len(decodes) + (partial is not None)
        admitted = []
        while joins and running < max_seqs:
            job = joins.popleft()
            decodes[job] = [jobs[job][2], jobs[job][1]]
            admitted.append(job)
            running += 1
        budget = budget_max - len(decodes)
        tokens = attention = 0
        completing = []
        if partial is not None and budget > 0:
            job, done = partial
            chunk = min(jobs[job][1] - done, budget)
            tokens, attention, budget = chunk, prefill_attention(chunk, done), budget - chunk
            if done + chunk == jobs[job][1]:
                completing.append(job)
                partial = None
            else:
                partial = [job, done + chunk]
        while budget > 0 and waiting and running < max_seqs:
            job = waiting.popleft()
            running += 1
            chunk = min(jobs[job][1], budget)
            tokens, attention, budget = (
                tokens + chunk,
                attention + prefill_attention(chunk, 0),
                budget - chunk,
            )
            if chunk == jobs[job][1]:
                completing.append(job)
            else:
                partial = [job, chunk]
        context = sum(c for _, c in decodes.values())
        end = now + max(step.step_seconds(tokens, attention, len(decodes), context), MIN_STEP_S)
        for job in admitted:
            first[job] = end
        for job in list(decodes):
            decodes[job][0] -= 1
            decodes[job][1] += 1
            if decodes[job][0] == 0:
                finish[job] = end
                del decodes[job]
        for job in completing:
            if mode == "prefill":
                finish[job] = end
                continue
            first[job] = end
            if jobs[job][2] == 1:
                finish[job] = end
            else:
                decodes[job] = [jobs[job][2] - 1, jobs[job][1]]
        now = end


REFERENCE_STEP = StepModel(
    base_s=0.004,
    prefill_token_s=2e-5,
    prefill_attention_s=1e-8,
    decode_seq_s=3e-4,
    decode_context_token_s=4e-6,
    kv_pull_base_s=0.002,
    kv_pull_s_per_byte=2e-9,
)


@pytest.mark.parametrize(
    ("budget", "seqs", "rate"), [(2048, 256, 30.0), (96, 5, 12.0), (256, 8, 40.0)]
)
def test_aggregated_instance_matches_the_step_by_step_reference(
    budget: int, seqs: int, rate: float
) -> None:
    model = _model(REFERENCE_STEP, budget=budget, seqs=seqs, kv_bytes=1000, overhead=0.0007)
    requests = _requests(300, seed=3, scale=8.0, output_sigma=1.0, min_output_tokens=1)
    arrivals = poisson_arrivals(len(requests), rate, seed=5)
    result = simulate(model, Deployment.aggregated(1), requests, arrivals)
    jobs = [
        (a + 0.0007, r.prompt_tokens, r.output_tokens)
        for a, r in zip(arrivals, requests, strict=True)
    ]
    first, finish = _reference_engine(model, jobs, "aggregated")
    np.testing.assert_allclose(result.ttft_s, np.array(first) - arrivals, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.e2e_s, np.array(finish) - arrivals, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("budget", "seqs"), [(2048, 256), (128, 6)])
def test_1p1d_matches_the_step_by_step_reference(budget: int, seqs: int) -> None:
    overhead, kv_bytes = 0.0007, 1000
    model = _model(REFERENCE_STEP, budget=budget, seqs=seqs, kv_bytes=kv_bytes, overhead=overhead)
    requests = _requests(300, seed=4, scale=8.0, min_output_tokens=1)
    arrivals = poisson_arrivals(len(requests), 15.0, seed=6)
    result = simulate(model, Deployment.pd(1, 1), requests, arrivals)
    prompts = [r.prompt_tokens for r in requests]
    _, prefilled = _reference_engine(
        model, [(a + overhead, p, 1) for a, p in zip(arrivals, prompts, strict=True)], "prefill"
    )
    pulled = [
        done + overhead + REFERENCE_STEP.kv_pull_seconds(p * kv_bytes)
        for done, p in zip(prefilled, prompts, strict=True)
    ]
    first, finish = _reference_engine(
        model,
        [(t, p, r.output_tokens) for t, p, r in zip(pulled, prompts, requests, strict=True)],
        "decode",
    )
    np.testing.assert_allclose(result.ttft_s, np.array(first) - arrivals, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.e2e_s, np.array(finish) - arrivals, rtol=1e-9, atol=1e-9)


# -- fleet behaviour --------------------------------------------------------------------------


def test_latency_grows_and_attainment_falls_with_the_rate() -> None:
    model = _model(TRUTH, overhead=0.0005)
    requests = _requests(1500, seed=1)
    slo = Slo(ttft_s=0.2, tpot_s=0.007)
    results = [
        simulate_at_rate(model, Deployment.pd(2, 2), requests, rate, seed=2, slo=slo)
        for rate in (10, 40, 80, 110, 140, 200)
    ]
    for metric in ("p50", "p90"):
        ttfts = [getattr(r.ttft, metric) for r in results]
        assert ttfts == sorted(ttfts), (metric, ttfts)
    attainments = [r.attainment for r in results]
    assert attainments == sorted(attainments, reverse=True), attainments  # type: ignore[type-var]
    assert attainments[0] == 1.0 and attainments[-1] is not None and attainments[-1] < 0.5


def test_aggregated_decodes_suffer_prefill_interference() -> None:
    # Prefill-heavy: a 500-token prompt costs ~50 decode steps' worth of compute.
    step = StepModel(
        base_s=0.005, prefill_token_s=5e-4, decode_seq_s=1e-4, decode_context_token_s=1e-7
    )
    model = _model(step)
    requests = _requests(600, seed=7)
    pd = simulate_at_rate(model, Deployment.pd(2, 2), requests, 8.0, seed=1)
    aggregated = simulate_at_rate(model, Deployment.aggregated(4), requests, 8.0, seed=1)
    assert aggregated.tpot.p90 > 1.5 * pd.tpot.p90
    # PD decode steps never carry a prompt: TPOT is the decode step time alone.
    assert pd.tpot.p90 < 0.007


def test_result_summary_and_serialisation() -> None:
    requests = _requests(200, seed=2)
    result = simulate_at_rate(_model(), Deployment.pd(1, 2), requests, 20.0, slo=Slo(ttft_s=1.0))
    document = json.loads(json.dumps(result.to_dict()))
    assert document["label"] == "1P2D"
    assert document["deployment"]["prefill_policy"]["name"] == "prefill_cost"
    assert document["deployment"]["decode_policy"]["name"] == "least_load"
    assert document["requests"] == 200
    assert 0 < document["ttft_s"]["p50"] <= document["ttft_s"]["p90"] <= document["ttft_s"]["p99"]
    assert document["throughput_rps"] == pytest.approx(200 / result.duration_s)
    output_tokens = sum(r.output_tokens for r in requests)
    assert document["output_tokens_per_s"] == pytest.approx(output_tokens / result.duration_s)
    assert result.tpot_s.shape == (200,)
    assert np.all(result.e2e_s >= result.ttft_s)


def test_poisson_arrivals_are_seeded_and_rescale_with_the_rate() -> None:
    slow = poisson_arrivals(1000, 10.0, seed=3)
    fast = poisson_arrivals(1000, 40.0, seed=3)
    assert slow[0] == 0.0 and slow == sorted(slow)
    assert fast == pytest.approx([t / 4 for t in slow])
    assert poisson_arrivals(1000, 10.0, seed=4) != slow
    assert 1000 / slow[-1] == pytest.approx(10.0, rel=0.1)
    assert poisson_arrivals(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


# -- the proxy's routing ----------------------------------------------------------------------


class _SpyPolicy(RoutingPolicy):
    """Always the first candidate; records what the proxy's counters said at each choice."""

    seen: list[tuple[str, int, int, int]] = []

    def select(self, candidates: Sequence[Instance], request: RoutingRequest) -> Instance:
        assert all(isinstance(c, Instance) for c in candidates)
        busy = candidates[0]
        self.seen.append(
            (
                busy.role.value,
                busy.in_flight_requests,
                busy.in_flight_tokens,
                busy.queued_prompt_tokens,
            )
        )
        return busy


@pytest.fixture
def spy_policy(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An out-of-tree policy module: only the proxy's load_policy resolves its dotted name."""
    module = types.ModuleType("planner_spy.policy")
    module.POLICY = _SpyPolicy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "planner_spy", types.ModuleType("planner_spy"))
    monkeypatch.setitem(sys.modules, "planner_spy.policy", module)
    _SpyPolicy.seen = []
    yield "planner_spy.policy"
    _SpyPolicy.seen = []


def test_default_policies_are_the_proxy_configs() -> None:
    prefill, decode = Routing().build()
    assert isinstance(prefill, PrefillCostPolicy)
    assert isinstance(decode, LeastLoadPolicy)


def test_policies_see_the_proxys_load_counters(spy_policy: str) -> None:
    # A burst: each choice sees the legs sent before it, as the proxy's counters show them.
    requests = [WorkloadRequest(100, 5), WorkloadRequest(200, 5), WorkloadRequest(300, 5)]
    routing = Routing(prefill_policy=spy_policy, decode_policy=spy_policy)
    result = simulate(_model(), Deployment.pd(2, 2, routing), requests, [0.0, 0.0, 0.0])
    prefill_seen = [s for s in _SpyPolicy.seen if s[0] == "prefill"]
    assert prefill_seen == [
        ("prefill", 0, 0, 0),
        ("prefill", 1, 100, 100),
        ("prefill", 2, 300, 300),
    ]
    # The three prompts end in one step: the decode legs go out one after another.
    decode_seen = [s for s in _SpyPolicy.seen if s[0] == "decode"]
    assert decode_seen == [("decode", 0, 0, 0), ("decode", 1, 105, 0), ("decode", 2, 310, 0)]
    # simulate() also checked that every counter is back at 0.
    assert list(result.prefill_index) == [0, 0, 0] and list(result.decode_index) == [2, 2, 2]


def test_round_robin_decode_policy_alternates() -> None:
    requests = _requests(12, seed=0)
    arrivals = [0.5 * k for k in range(12)]
    routing = Routing(decode_policy="round_robin")
    result = simulate(_model(), Deployment.pd(1, 2, routing), requests, arrivals)
    assert list(result.decode_index) == [1, 2] * 6
    aggregated = simulate(_model(), Deployment.aggregated(3, routing), requests, arrivals)
    assert list(aggregated.decode_index) == [0, 1, 2] * 4
    assert set(aggregated.prefill_index) == {-1}


def test_short_prompts_skip_the_prefill_leg() -> None:
    requests = [WorkloadRequest(50, 4), WorkloadRequest(500, 4)] * 3
    routing = Routing(disagg_min_prompt_tokens=100)
    result = simulate(_model(), Deployment.pd(1, 1, routing), requests, [0.3 * k for k in range(6)])
    assert list(result.prefill_index) == [-1, 0] * 3


def test_bad_policy_names_and_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        simulate(_model(), Deployment.aggregated(1, Routing(decode_policy="nope")), [], [])
    with pytest.raises(ValueError, match="unknown option"):
        Routing(prefill_options={"speed": 1}).build()
    with pytest.raises(ValueError, match="needs >= 1 prefill"):
        Deployment.pd(0, 3)


# -- goodput and the split --------------------------------------------------------------------


def test_goodput_of_a_single_server_queue() -> None:
    # One sequence at a time and a constant 10 ms step: an M/D/1 queue. A request meets a
    # TTFT of one step only when it finds the server idle, which happens with probability
    # 1 - rate x 10 ms: 90 % attainment at 10 requests/s.
    requests = [WorkloadRequest(10, 1)] * 4000
    model = _model(StepModel(base_s=0.01), seqs=1)
    found = goodput(model, Deployment.aggregated(1), requests, Slo(ttft_s=0.0101), seed=3)
    assert found.rate == pytest.approx(10.0, rel=0.15)
    assert found.at_rate is not None and found.at_rate.attainment is not None
    assert found.at_rate.attainment >= 0.9
    # The search stopped with a failing rate within the tolerance above the answer.
    above = [rate for rate, ok in found.evaluations if rate > found.rate and ok < 0.9]
    assert min(above) <= found.rate * 1.02 * (1 + 1e-9)


def test_goodput_limits() -> None:
    requests = [WorkloadRequest(10, 1)] * 50
    model = _model(StepModel(base_s=0.01), seqs=1)
    never = goodput(model, Deployment.aggregated(1), requests, Slo(ttft_s=0.005))
    assert (never.rate, never.at_rate) == (0.0, None)
    always = goodput(model, Deployment.aggregated(1), requests, Slo(ttft_s=10.0))
    assert math.isinf(always.rate)
    with pytest.raises(ValueError, match="needs an SLO"):
        goodput(model, Deployment.aggregated(1), requests, Slo())


def test_recommend_split_tries_every_split_and_aggregated() -> None:
    requests = _requests(300, seed=5)
    recommendation = recommend_split(
        4, _model(), requests, Slo(ttft_s=0.3, tpot_s=0.01), rel_tol=0.05
    )
    labels = [row.deployment.label for row in recommendation.rows]
    assert labels == ["1P3D", "2P2D", "3P1D", "4 agg"]
    assert recommendation.best.rate == max(row.rate for row in recommendation.rows)
    assert all(row.rate > 0 for row in recommendation.rows)
    assert (
        json.loads(json.dumps(recommendation.to_dict()))["best"]
        == recommendation.best.deployment.label
    )


# -- pdserve plan -----------------------------------------------------------------------------


def test_registered_as_pdserve_plan() -> None:
    assert SUBCOMMANDS["plan"][0] == "benchmarks.planner.cli"
    assert set(planner_cli.ACTIONS) == {"profile", "simulate", "validate", "overhead"}


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "profile.json"
    _profile().save(path)
    return path


def _plan_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["plan", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pdserve plan: ")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--aggregated", "2"],
            "give exactly one of --rate, --find-goodput, --recommend N (got none)",
        ),
        (["--rate", "1", "--find-goodput", "--aggregated", "2"], "got --rate and --find-goodput"),
        (["--rate", "1"], "a deployment needs --prefill X and --decode Y, or --aggregated N"),
        (["--rate", "1", "--prefill", "2"], "a deployment needs"),
        (["--rate", "1", "--prefill", "1", "--decode", "1", "--aggregated", "2"], "not both"),
        (["--rate", "1", "--prefill", "0", "--decode", "1"], "must be >= 1"),
        (["--rate", "1,abc", "--aggregated", "2"], "'abc' is not a number"),
        (["--rate", "0", "--aggregated", "2"], "rates must be > 0"),
        (["--find-goodput", "--aggregated", "2"], "--find-goodput needs an SLO"),
        (["--recommend", "4"], "--recommend needs an SLO"),
        (["--recommend", "4", "--aggregated", "2", "--ttft-slo-ms", "100"], "tries every split"),
        (["--recommend", "1", "--ttft-slo-ms", "100"], "N >= 2"),
        (["--rate", "1", "--aggregated", "2", "--ttft-slo-ms", "-5"], "--ttft-slo-ms must be"),
        (["--rate", "1", "--aggregated", "2", "--attainment", "1.5"], "--attainment must be in"),
        (["--rate", "1", "--aggregated", "2", "--decode-policy", "nope"], "unknown routing policy"),
        (
            ["--rate", "1", "--aggregated", "2", "--decode-policy-options", "{bad"],
            "--decode-policy-options: not valid JSON",
        ),
        (["--rate", "1", "--aggregated", "2", "--num-prompts", "0"], "num_requests must be >= 1"),
    ],
)
def test_plan_simulate_bad_input_is_one_line(
    profile_file: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _plan_error(["simulate", "--profile", str(profile_file), *argv], capsys)
    assert message in line


def test_plan_simulate_bad_profile_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = _plan_error(
        ["simulate", "--profile", str(tmp_path / "no.json"), "--rate", "1", "--aggregated", "1"],
        capsys,
    )
    assert "no.json: cannot read" in missing
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_broken(lambda d: d.update(max_num_seqs=-1))))
    line = _plan_error(
        ["simulate", "--profile", str(bad), "--rate", "1", "--aggregated", "1"], capsys
    )
    assert "bad.json: max_num_seqs: must be >= 1" in line


def test_plan_profile_without_its_module_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "benchmarks.planner.no_such_profile"
    monkeypatch.setitem(planner_cli.ACTIONS, "profile", (missing, "measure"))
    line = _plan_error(["profile"], capsys)
    assert f"no module {missing}" in line


def test_plan_simulate_prints_a_table_and_writes_json(
    profile_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "plan.json"
    argv = [
        "plan", "simulate", "--profile", str(profile_file), "--prefill", "1", "--decode", "2",
        "--rate", "5,20,inf", "--ttft-slo-ms", "500", "--tpot-slo-ms", "20",
        "--num-prompts", "100", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1P2D of synthetic-8b" in printed
    rows = [
        line.split()
        for line in printed.splitlines()
        if line.split()[:1] in (["5"], ["20"], ["inf"])
    ]
    assert [row[0] for row in rows] == ["5", "20", "inf"]
    report = json.loads(out.read_text())
    assert [entry["rate"] for entry in report["rates"]] == [5.0, 20.0, "inf"]
    assert report["profile"]["model"] == "synthetic-8b"
    assert report["fit"]["coefficients"]["base_s"] == pytest.approx(TRUTH.base_s)
    assert report["workload"]["requests"] == 100
    assert report["rates"][0]["attainment"] == 1.0


def test_plan_simulate_goodput_and_recommend(
    profile_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["plan", "simulate", "--profile", str(profile_file), "--num-prompts", "150"]
    slo = ["--ttft-slo-ms", "300", "--tpot-slo-ms", "10", "--tolerance", "0.1"]
    assert main([*base, "--aggregated", "2", "--find-goodput", *slo]) == 0
    assert "goodput of 2 agg: " in capsys.readouterr().out
    assert main([*base, "--recommend", "3", *slo]) == 0
    printed = capsys.readouterr().out
    for label in ("1P2D", "2P1D", "3 agg"):
        assert label in printed
    assert "best of 3 instances: " in printed


# -- speed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("deployment", [Deployment.pd(16, 48), Deployment.aggregated(64)])
def test_64_instances_and_20000_requests_complete(deployment: Deployment) -> None:
    # Speed is a benchmark figure (README, `pdserve plan simulate` prints its wall time); here
    # a fleet-sized run must finish every request and balance every load counter.
    requests = _requests(20000, seed=11)
    # Near the fleet's capacity: deep decode batches, queues at the prefill pool.
    result = simulate_at_rate(_model(overhead=0.0005), deployment, requests, 800.0)
    assert result.requests == 20000 and not np.isnan(result.e2e_s).any()
