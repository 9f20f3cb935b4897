"""Discrete-event simulation of a whole pdserve fleet: xPyD behind the proxy, or N aggregated.

Routing is the proxy's own: the prefill and decode policies are built by
:func:`proxy.routing.load_policy` from the same names and options as the proxy config, they
choose among real :class:`proxy.instances.Instance` objects of an
:class:`proxy.registry.InstanceRegistry`, and those instances' load counters move exactly
where ``proxy/pd_flow.py`` moves them: a prefill leg adds its prompt to
``in_flight_requests``, ``in_flight_tokens`` and ``queued_prompt_tokens`` when it is sent
and takes them off when the prefill answers (then ``observe`` is called with the leg's
round trip); a decode leg adds one request and prompt + max tokens when it is sent (before
the KV pull) and takes them off when the stream ends. An aggregated fleet is what the proxy
does without a prefill pool: every request is one leg to the decode pool, chosen by the
decode policy. Prompts shorter than ``disagg_min_prompt_tokens`` skip the prefill leg, as
in the proxy.

Each instance is a vLLM-like engine (V1 scheduler, chunked prefill): a step serves every
running decode (one token each), then spends what is left of ``max_num_batched_tokens``
on prompts, the partly prefilled one first, then waiting ones first come first served, with
at most ``max_num_seqs`` requests running; the step lasts what the fitted
:class:`~benchmarks.planner.profile_model.StepModel` says for that mix. An aggregated
instance mixes prefill chunks into its decode steps (the interference PD avoids). A
prefill instance only prefills: a request leaves it at the end of the step that completes
its prompt, the proxy sends the decode leg (the decode policy picks the instance), the
decode pulls the KV (``kv_pull_seconds(prompt x kv_bytes_per_token)``, off the decode's
compute) and the request joins the decode's running batch at the next step boundary. The
client's first token is the decode's first output: the end of the first step it runs in
after the pull. ``proxy_overhead_s`` delays the dispatch of every leg.

To stay fast (well under a minute for 100,000 requests on 64 instances) nothing is done per
token. A stretch of decode-only steps with the same batch is one arithmetic series (each
step's context grows by the batch size), so its boundaries are closed-form: an instance
jumps straight to the step where its next request finishes, or to the first boundary after
new work arrives. Per instance a heap holds each running request's finishing step number
and the context sum is kept as one offset, so events are per request (arrival, prefill
step, pull, join, finish), not per token.

Not modelled: prefix caching (the shared prefix is prefilled every time), the KV cache's
capacity (only ``max_num_seqs`` limits a batch; vLLM would also preempt when blocks run
out), speculative decoding, failures, retries and timeouts. A KV pull takes the fitted
time whatever else is being pulled at once. A decode instance admits pulled requests before
any short prompt of its own waiting queue.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from benchmarks.planner.profile_model import Profile, StepModel, prefill_attention
from benchmarks.workload import WorkloadRequest
from proxy.config import ProxyConfig
from proxy.instances import Instance, Role
from proxy.registry import InstanceRegistry
from proxy.routing import RoutingPolicy, RoutingRequest, load_policy

_PROXY_DEFAULTS: Final = ProxyConfig()
DEFAULT_PREFILL_POLICY: Final[str] = _PROXY_DEFAULTS.prefill_policy.name
DEFAULT_DECODE_POLICY: Final[str] = _PROXY_DEFAULTS.decode_policy.name

# A step never takes less than this: a fit with every coefficient at 0 would otherwise stop
# the clock and loop forever.
MIN_STEP_S: Final = 1e-6

# Synthetic token ids for the prompts policies see: the shared prefix is 1..N for every
# request that has one; the rest of request r's prompt repeats one id unique to r.
_DISTINCT_ID_BASE: Final = 1 << 40


# -- what is simulated ------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceModel:
    """One simulated vLLM instance: its step latencies and its scheduler's limits."""

    step: StepModel
    max_num_batched_tokens: int
    max_num_seqs: int
    kv_bytes_per_token: int = 0
    proxy_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.kv_bytes_per_token < 0 or not self.proxy_overhead_s >= 0:
            raise ValueError("kv_bytes_per_token and proxy_overhead_s must be >= 0")

    @classmethod
    def from_profile(cls, profile: Profile, step: StepModel | None = None) -> InstanceModel:
        return cls(
            step=step if step is not None else StepModel.fit(profile),
            max_num_batched_tokens=profile.max_num_batched_tokens,
            max_num_seqs=profile.max_num_seqs,
            kv_bytes_per_token=profile.kv_bytes_per_token,
            proxy_overhead_s=profile.proxy_overhead_s,
        )

    def solo_seconds(self, prompt_tokens: int, output_tokens: int) -> float:
        """One request alone on an idle aggregated instance, start to last token."""
        step = self.step
        seconds = 0.0
        done = 0
        while done < prompt_tokens:
            chunk = min(prompt_tokens - done, self.max_num_batched_tokens)
            seconds += step.step_seconds(chunk, prefill_attention(chunk, done), 0, 0)
            done += chunk
        # Decode steps' context grows by one a step: the mean context is used for all.
        mean_context = prompt_tokens + output_tokens // 2
        decode = step.step_seconds(0, 0, 1, mean_context)
        return seconds + max(output_tokens - 1, 0) * max(decode, MIN_STEP_S)


@dataclass(frozen=True)
class Routing:
    """The proxy's routing settings (defaults: the proxy config's)."""

    prefill_policy: str = DEFAULT_PREFILL_POLICY
    prefill_options: Mapping[str, Any] = field(default_factory=dict)
    decode_policy: str = DEFAULT_DECODE_POLICY
    decode_options: Mapping[str, Any] = field(default_factory=dict)
    disagg_min_prompt_tokens: int = 0

    def build(self) -> tuple[RoutingPolicy, RoutingPolicy]:
        """Fresh (prefill, decode) policies: they keep state, so one pair per simulation.
        ValueError naming the policy when a name or option is bad."""
        return (
            load_policy(self.prefill_policy, self.prefill_options),
            load_policy(self.decode_policy, self.decode_options),
        )


@dataclass(frozen=True)
class Deployment:
    """``pd``: ``prefill`` prefill and ``decode`` decode instances; ``aggregated``: ``decode``
    instances that prefill and decode (the proxy's decode pool without a prefill pool)."""

    kind: str
    prefill: int
    decode: int
    routing: Routing = field(default_factory=Routing)

    def __post_init__(self) -> None:
        if self.kind == "pd":
            if self.prefill < 1 or self.decode < 1:
                raise ValueError("a PD deployment needs >= 1 prefill and >= 1 decode instance")
        elif self.kind == "aggregated":
            if self.prefill != 0 or self.decode < 1:
                raise ValueError("an aggregated deployment has no prefill and >= 1 instances")
        else:
            raise ValueError(f"deployment kind must be 'pd' or 'aggregated', got {self.kind!r}")

    @classmethod
    def pd(cls, prefill: int, decode: int, routing: Routing | None = None) -> Deployment:
        return cls("pd", prefill, decode, routing or Routing())

    @classmethod
    def aggregated(cls, instances: int, routing: Routing | None = None) -> Deployment:
        return cls("aggregated", 0, instances, routing or Routing())

    @property
    def instances(self) -> int:
        return self.prefill + self.decode

    @property
    def label(self) -> str:
        return f"{self.prefill}P{self.decode}D" if self.kind == "pd" else f"{self.decode} agg"

    def to_dict(self) -> dict[str, Any]:
        routing = self.routing
        policies: dict[str, Any] = {
            "decode_policy": {
                "name": routing.decode_policy,
                "options": dict(routing.decode_options),
            }
        }
        if self.kind == "pd":
            policies["prefill_policy"] = {
                "name": routing.prefill_policy,
                "options": dict(routing.prefill_options),
            }
            policies["disagg_min_prompt_tokens"] = routing.disagg_min_prompt_tokens
        return {"kind": self.kind, "prefill": self.prefill, "decode": self.decode, **policies}


@dataclass(frozen=True)
class Slo:
    """Per-request targets; a request meets the SLO when it meets every target given."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"SLO {name} must be > 0, got {value!r}")

    @property
    def given(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """``n`` arrival times (the first at 0) of a Poisson process of ``rate`` per second;
    ``rate=inf`` puts all at 0. The same seed at another rate is the same sequence rescaled,
    so a sweep over rates compares like with like."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if n == 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0, n - 1)
    times = np.concatenate(([0.0], np.cumsum(gaps))) / rate
    return [float(t) for t in times]


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: np.ndarray) -> Percentiles:
        if values.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
        return cls(p50, p90, p99, float(values.mean()))

    def to_dict(self) -> dict[str, float | None]:
        return {k: (None if math.isnan(v) else v) for k, v in vars(self).items()}


@dataclass(frozen=True)
class RequestTiming:
    """One simulated request, times in seconds from its arrival at the proxy."""

    arrival_s: float
    ttft_s: float
    tpot_s: float | None  # None for a one-token answer
    e2e_s: float
    prefill_instance: str | None  # None: no prefill leg (aggregated, or a short prompt)
    decode_instance: str


@dataclass(frozen=True)
class SimulationResult:
    deployment: Deployment
    rate: float | None  # requests/s of the arrivals, when they were drawn at a rate
    requests: int
    duration_s: float  # first arrival to last token
    throughput_rps: float
    output_tokens_per_s: float
    ttft: Percentiles
    tpot: Percentiles
    e2e: Percentiles
    slo: Slo | None
    attainment: float | None  # share of requests meeting the SLO; None without one
    instances: tuple[str, ...]  # URLs, prefill pool first
    # Per request, in the order of the input (arrays, so 100,000 requests cost no objects).
    arrival_s: np.ndarray = field(repr=False, compare=False)
    ttft_s: np.ndarray = field(repr=False, compare=False)
    tpot_s: np.ndarray = field(repr=False, compare=False)  # NaN for one-token answers
    e2e_s: np.ndarray = field(repr=False, compare=False)
    prefill_index: np.ndarray = field(repr=False, compare=False)  # -1: no prefill leg
    decode_index: np.ndarray = field(repr=False, compare=False)

    def request(self, index: int) -> RequestTiming:
        tpot = float(self.tpot_s[index])
        prefill = int(self.prefill_index[index])
        return RequestTiming(
            arrival_s=float(self.arrival_s[index]),
            ttft_s=float(self.ttft_s[index]),
            tpot_s=None if math.isnan(tpot) else tpot,
            e2e_s=float(self.e2e_s[index]),
            prefill_instance=self.instances[prefill] if prefill >= 0 else None,
            decode_instance=self.instances[int(self.decode_index[index])],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment.to_dict(),
            "label": self.deployment.label,
            "rate": _finite_or_none(self.rate),
            "requests": self.requests,
            "duration_s": self.duration_s,
            "throughput_rps": self.throughput_rps,
            "output_tokens_per_s": self.output_tokens_per_s,
            "ttft_s": self.ttft.to_dict(),
            "tpot_s": self.tpot.to_dict(),
            "e2e_s": self.e2e.to_dict(),
            "slo": None
            if self.slo is None
            else {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            "attainment": self.attainment,
        }


def _finite_or_none(value: float | None) -> float | str | None:
    if value is None:
        return None
    return value if math.isfinite(value) else "inf"


# -- the simulation ---------------------------------------------------------------------------

# Engine modes: no work; a boundary is due now; one step with prefill in flight; a run of
# decode-only steps whose boundaries are closed-form.
_IDLE, _PENDING, _STEP, _RUN = 0, 1, 2, 3
# Event kinds.
_WAKE, _DECODE_DISPATCH, _PULL_DONE = 0, 1, 2


class _Engine:
    """The simulated scheduler state of one instance.

    ``dstep`` counts the steps run so far; every running decode emits one token per step,
    so a request admitted to decode at step D with m tokens to go finishes at step D + m
    (the ``finishing`` heap). A decode's context at step D is its offset + D, so the batch's
    context sum is ``ctx_offset + n_dec x D`` without touching each request.
    """

    __slots__ = (
        "clock",
        "completing",
        "ctx_offset",
        "dstep",
        "finishing",
        "index",
        "instance",
        "joins",
        "mode",
        "n_dec",
        "n_pre",
        "partial",
        "partial_done",
        "prefill_only",
        "run_a",
        "run_b",
        "run_target",
        "version",
        "waiting",
    )

    def __init__(self, index: int, instance: Instance, prefill_only: bool) -> None:
        self.index = index
        self.instance = instance
        self.prefill_only = prefill_only
        self.mode = _IDLE
        self.version = 0  # a wake event carrying another version is stale
        self.clock = 0.0  # time of the last boundary (the start of the current step or run)
        self.dstep = 0
        self.n_dec = 0  # running decodes
        self.n_pre = 0  # running requests still prefilling (the partial one, this step's)
        self.ctx_offset = 0
        self.finishing: list[tuple[int, int]] = []  # (step it finishes at, request)
        self.waiting: deque[int] = deque()  # prompts to prefill, FCFS
        self.joins: deque[int] = deque()  # pulled requests waiting for a decode slot
        self.partial = -1  # the request whose prompt is partly prefilled, -1: none
        self.partial_done = 0
        self.completing: list[int] = []  # prompts the current step completes
        # The current run: step j lasts run_a + run_b x j; it is cut at step run_target.
        self.run_a = 0.0
        self.run_b = 0.0
        self.run_target = 0


class _Simulation:
    def __init__(
        self,
        model: InstanceModel,
        deployment: Deployment,
        requests: Sequence[WorkloadRequest],
        arrivals: Sequence[float],
    ) -> None:
        if len(arrivals) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times")
        for request in requests:
            if request.prompt_tokens < 1 or request.output_tokens < 1:
                raise ValueError("every request needs prompt_tokens >= 1 and output_tokens >= 1")
        self.model = model
        self.deployment = deployment
        self.pd = deployment.kind == "pd"
        self.prefill_policy, self.decode_policy = deployment.routing.build()
        self.disagg_min = deployment.routing.disagg_min_prompt_tokens
        # The registry hands out the routable lists the proxy's flow passes to select().
        self.registry = InstanceRegistry()
        decode_name = "decode" if self.pd else "aggregated"
        for i in range(deployment.prefill):
            self.registry.add(f"http://prefill-{i}.sim:8000", Role.PREFILL)
        for i in range(deployment.decode):
            self.registry.add(f"http://{decode_name}-{i}.sim:8000", Role.DECODE)
        self.prefill_candidates = self.registry.routable(Role.PREFILL)
        self.decode_candidates = self.registry.routable(Role.DECODE)
        pools = [(inst, True) for inst in self.prefill_candidates]
        pools += [(inst, False) for inst in self.decode_candidates]
        self.engines = [_Engine(i, inst, pre) for i, (inst, pre) in enumerate(pools)]
        self.engine_of = {engine.instance: engine for engine in self.engines}

        n = len(requests)
        self.n = n
        self.arrival = [float(t) for t in arrivals]
        self.prompt = [r.prompt_tokens for r in requests]
        self.out = [r.output_tokens for r in requests]
        self.shared = [min(r.shared_prefix_tokens, r.prompt_tokens) for r in requests]
        self.prefix_ids = list(range(1, max(self.shared, default=0) + 1))
        self.first = [math.nan] * n
        self.finish = [math.nan] * n
        self.prefill_sent = [0.0] * n
        self.decode_sent = [0.0] * n
        self.prefill_engine = [-1] * n
        self.decode_engine = [-1] * n
        self.ctx_off = [0] * n
        self.events: list[tuple[float, int, int, int, int]] = []
        self.sequence = itertools.count()

    # -- helpers ------------------------------------------------------------------------------

    def _routing(self, r: int) -> RoutingRequest:
        """What the proxy would hand the policy for request r (built anew each time rather
        than kept: a burst of 100,000 queued prompts would otherwise hold them all)."""
        shared = self.shared[r]
        prompt = self.prompt[r]
        ids = self.prefix_ids[:shared] + [_DISTINCT_ID_BASE + r] * (prompt - shared)
        return RoutingRequest(f"sim-{r}", ids, prompt, self.out[r])

    def _push(self, time: float, kind: int, arg: int, version: int = 0) -> None:
        heapq.heappush(self.events, (time, next(self.sequence), kind, arg, version))

    def _wake(self, engine: _Engine, time: float) -> None:
        engine.version += 1
        self._push(time, _WAKE, engine.index, engine.version)

    @staticmethod
    def _run_time(engine: _Engine, k: int) -> float:
        """End of the k-th step of the engine's current decode run."""
        return engine.clock + k * engine.run_a + engine.run_b * (k * (k - 1) // 2)

    def _steps_until(self, engine: _Engine, time: float) -> int:
        """The first step boundary of the current run at or after ``time`` (>= 1: the step
        under way cannot take new work)."""
        a, b = engine.run_a, engine.run_b
        x = time - engine.clock
        if x <= a:
            return 1
        if b <= 0.0:
            k = math.ceil(x / a)
        else:
            half = a - b / 2
            k = math.ceil((-half + math.sqrt(half * half + 2 * b * x)) / b)
        k = max(k, 1)
        # The closed form is rounded: settle on the exact boundary with the same formula
        # the wake times use.
        run_time = self._run_time
        while k > 1 and run_time(engine, k - 1) >= time:
            k -= 1
        while run_time(engine, k) < time:
            k += 1
        return k

    def _notify(self, engine: _Engine, time: float) -> None:
        """New work (a prompt or a pulled request) reached the engine at ``time``."""
        mode = engine.mode
        if mode == _IDLE:
            # A boundary at once, but after every other event of this instant, so requests
            # that arrive together share the first step.
            engine.mode = _PENDING
            self._wake(engine, time)
        elif mode == _RUN:
            if engine.n_dec + engine.n_pre >= self.model.max_num_seqs:
                return  # no slot until a request finishes, which is a boundary anyway
            k = self._steps_until(engine, time)
            if k < engine.run_target:
                engine.run_target = k
                self._wake(engine, self._run_time(engine, k))
        # _PENDING, _STEP: the coming boundary reads the queues.

    # -- the proxy's legs ---------------------------------------------------------------------

    def _dispatch(self, r: int, now: float) -> None:
        """The proxy sends request r's first leg."""
        if self.pd and self.prompt[r] >= self.disagg_min:
            instance = self.prefill_policy.select(self.prefill_candidates, self._routing(r))
            tokens = self.prompt[r]
            instance.in_flight_requests += 1
            instance.in_flight_tokens += tokens
            instance.queued_prompt_tokens += tokens
            engine = self.engine_of[instance]
            self.prefill_engine[r] = engine.index
            self.prefill_sent[r] = now
            engine.waiting.append(r)
            self._notify(engine, now)
        else:
            self._decode_leg(r, now, pulled=False)

    def _decode_leg(self, r: int, now: float, *, pulled: bool) -> None:
        instance = self.decode_policy.select(self.decode_candidates, self._routing(r))
        instance.in_flight_requests += 1
        instance.in_flight_tokens += self.prompt[r] + self.out[r]
        engine = self.engine_of[instance]
        self.decode_engine[r] = engine.index
        self.decode_sent[r] = now
        if pulled:
            model = self.model
            pull = model.step.kv_pull_seconds(self.prompt[r] * model.kv_bytes_per_token)
            self._push(now + pull, _PULL_DONE, r)
        else:
            engine.waiting.append(r)
            self._notify(engine, now)

    def _prefill_done(self, engine: _Engine, r: int, now: float) -> None:
        instance = engine.instance
        tokens = self.prompt[r]
        instance.in_flight_requests -= 1
        instance.in_flight_tokens -= tokens
        instance.queued_prompt_tokens -= tokens
        self.prefill_policy.observe(instance, self._routing(r), now - self.prefill_sent[r])
        self._push(now + self.model.proxy_overhead_s, _DECODE_DISPATCH, r)

    def _finish(self, engine: _Engine, r: int, now: float) -> None:
        instance = engine.instance
        instance.in_flight_requests -= 1
        instance.in_flight_tokens -= self.prompt[r] + self.out[r]
        self.decode_policy.observe(instance, self._routing(r), now - self.decode_sent[r])
        self.finish[r] = now

    # -- the engines ----------------------------------------------------------------------

    def _boundary(self, engine: _Engine, now: float, steps: int) -> None:
        """``steps`` steps ended at ``now``: retire what finished, then start the next step."""
        dstep = engine.dstep + steps
        engine.dstep = dstep
        engine.clock = now
        finishing = engine.finishing
        ctx_off = self.ctx_off
        while finishing and finishing[0][0] <= dstep:
            r = heapq.heappop(finishing)[1]
            engine.n_dec -= 1
            engine.ctx_offset -= ctx_off[r]
            self._finish(engine, r, now)
        completing = engine.completing
        if completing:
            engine.completing = []
            engine.n_pre -= len(completing)
            if engine.prefill_only:
                for r in completing:
                    self._prefill_done(engine, r, now)
            else:
                prompt, out = self.prompt, self.out
                for r in completing:
                    # Its first token came with this step; the rest are decode steps.
                    if out[r] == 1:
                        self._finish(engine, r, now)
                        continue
                    offset = prompt[r] - dstep
                    ctx_off[r] = offset
                    engine.ctx_offset += offset
                    engine.n_dec += 1
                    heapq.heappush(finishing, (dstep + out[r] - 1, r))
        self._start_step(engine, now)

    def _start_step(self, engine: _Engine, now: float) -> None:
        model = self.model
        max_seqs = model.max_num_seqs
        dstep = engine.dstep
        n_dec = engine.n_dec
        prompt = self.prompt
        admitted: list[int] = []
        joins = engine.joins
        if joins and n_dec + engine.n_pre < max_seqs:
            ctx_off, out = self.ctx_off, self.out
            while joins and n_dec + engine.n_pre < max_seqs:
                r = joins.popleft()
                offset = prompt[r] - dstep
                ctx_off[r] = offset
                engine.ctx_offset += offset
                n_dec += 1
                heapq.heappush(engine.finishing, (dstep + out[r], r))
                admitted.append(r)
            engine.n_dec = n_dec
        tokens = 0
        attention = 0
        budget = model.max_num_batched_tokens - n_dec
        if budget > 0:
            completing = engine.completing
            r = engine.partial
            if r >= 0:
                done = engine.partial_done
                chunk = min(prompt[r] - done, budget)
                tokens = chunk
                attention = chunk * done + chunk * (chunk + 1) // 2
                budget -= chunk
                if done + chunk >= prompt[r]:
                    completing.append(r)
                    engine.partial = -1
                else:
                    engine.partial_done = done + chunk
            waiting = engine.waiting
            while budget > 0 and waiting and n_dec + engine.n_pre < max_seqs:
                r = waiting.popleft()
                engine.n_pre += 1
                chunk = prompt[r]
                if chunk <= budget:
                    completing.append(r)
                else:
                    chunk = budget
                    engine.partial = r
                    engine.partial_done = chunk
                tokens += chunk
                attention += chunk * (chunk + 1) // 2
                budget -= chunk
        step = model.step
        context = engine.ctx_offset + n_dec * dstep
        if tokens:
            seconds = step.step_seconds(tokens, attention, n_dec, context)
            end = now + max(seconds, MIN_STEP_S)
            engine.mode = _STEP
            self._wake(engine, end)
            if not engine.prefill_only:
                first = self.first
                for r in engine.completing:
                    first[r] = end
        elif n_dec:
            a = step.base_s + step.decode_seq_s * n_dec + step.decode_context_token_s * context
            engine.run_a = max(a, MIN_STEP_S)
            engine.run_b = step.decode_context_token_s * n_dec
            engine.run_target = engine.finishing[0][0] - dstep
            engine.mode = _RUN
            self._wake(engine, self._run_time(engine, engine.run_target))
            end = now + engine.run_a
        else:
            engine.mode = _IDLE
            return
        first = self.first
        for r in admitted:
            first[r] = end

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        overhead = self.model.proxy_overhead_s
        arrival = self.arrival
        order = sorted(range(self.n), key=arrival.__getitem__)
        events = self.events
        engines = self.engines
        heappop = heapq.heappop
        position = 0
        n = self.n
        while True:
            if position < n:
                r = order[position]
                sent = arrival[r] + overhead
                # Arrivals first at a tie: they then share the step a wake at that instant starts.
                if not events or sent <= events[0][0]:
                    position += 1
                    self._dispatch(r, sent)
                    continue
            elif not events:
                break
            now, _, kind, arg, version = heappop(events)
            if kind == _WAKE:
                engine = engines[arg]
                if version != engine.version:
                    continue
                mode = engine.mode
                steps = 0 if mode == _PENDING else 1 if mode == _STEP else engine.run_target
                self._boundary(engine, now, steps)
            elif kind == _DECODE_DISPATCH:
                self._decode_leg(arg, now, pulled=True)
            else:  # _PULL_DONE
                engine = engines[self.decode_engine[arg]]
                engine.joins.append(arg)
                self._notify(engine, now)

    def result(self, slo: Slo | None, rate: float | None) -> SimulationResult:
        arrival = np.asarray(self.arrival, dtype=float)
        ttft = np.asarray(self.first, dtype=float) - arrival
        e2e = np.asarray(self.finish, dtype=float) - arrival
        out = np.asarray(self.out, dtype=float)
        multi = out > 1
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(multi, (e2e - ttft) / np.maximum(out - 1, 1), math.nan)
        n = self.n
        duration = float(np.max(np.asarray(self.finish)) - arrival.min()) if n else 0.0
        attainment = None
        if slo is not None and slo.given and n:
            ok = np.ones(n, dtype=bool)
            if slo.ttft_s is not None:
                ok &= ttft <= slo.ttft_s
            if slo.tpot_s is not None:
                ok &= ~multi | (tpot <= slo.tpot_s)
            attainment = float(ok.mean())
        per_s = (lambda count: count / duration) if duration > 0 else (lambda count: math.inf)
        return SimulationResult(
            deployment=self.deployment,
            rate=rate,
            requests=n,
            duration_s=duration,
            throughput_rps=per_s(n),
            output_tokens_per_s=per_s(float(out.sum())),
            ttft=Percentiles.of(ttft),
            tpot=Percentiles.of(tpot[multi]),
            e2e=Percentiles.of(e2e),
            slo=slo,
            attainment=attainment,
            instances=tuple(engine.instance.url for engine in self.engines),
            arrival_s=arrival,
            ttft_s=ttft,
            tpot_s=tpot,
            e2e_s=e2e,
            prefill_index=np.asarray(self.prefill_engine, dtype=int),
            decode_index=np.asarray(self.decode_engine, dtype=int),
        )


def simulate(
    model: InstanceModel,
    deployment: Deployment,
    requests: Sequence[WorkloadRequest],
    arrivals: Sequence[float],
    *,
    slo: Slo | None = None,
    rate: float | None = None,
    check_counters: bool = True,
) -> SimulationResult:
    """Serve ``requests`` arriving at ``arrivals`` (seconds) on ``deployment``.

    ValueError on bad input (a policy name or option, lengths that differ). With
    ``check_counters`` the instances' load counters must all be back at 0 at the end, as
    they are in the proxy once every request has ended.
    """
    simulation = _Simulation(model, deployment, requests, arrivals)
    simulation.run()
    if check_counters:
        for engine in simulation.engines:
            instance = engine.instance
            left = (
                instance.in_flight_requests,
                instance.in_flight_tokens,
                instance.queued_prompt_tokens,
            )
            if left != (0, 0, 0):
                raise AssertionError(f"{instance.url} ended with load counters {left}")
    return simulation.result(slo, rate)


def simulate_at_rate(
    model: InstanceModel,
    deployment: Deployment,
    requests: Sequence[WorkloadRequest],
    rate: float,
    *,
    seed: int = 0,
    slo: Slo | None = None,
) -> SimulationResult:
    """:func:`simulate` with seeded Poisson arrivals at ``rate`` requests/s."""
    arrivals = poisson_arrivals(len(requests), rate, seed)
    return simulate(model, deployment, requests, arrivals, slo=slo, rate=rate)


# -- goodput and the P:D split ----------------------------------------------------------------


@dataclass(frozen=True)
class GoodputResult:
    """The highest rate found whose SLO attainment reaches the target."""

    deployment: Deployment
    rate: float  # requests/s; 0.0 when even a trickle misses, inf when a burst of all meets it
    target: float
    at_rate: SimulationResult | None  # the simulation at ``rate`` (None when rate is 0)
    evaluations: tuple[tuple[float, float], ...]  # (rate, attainment) in the order tried

    def to_dict(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment.to_dict(),
            "label": self.deployment.label,
            "goodput_rps": _finite_or_none(self.rate),
            "attainment_target": self.target,
            "at_goodput": None if self.at_rate is None else self.at_rate.to_dict(),
            "evaluations": [
                {"rate": _finite_or_none(rate), "attainment": attainment}
                for rate, attainment in self.evaluations
            ],
        }


def goodput(
    model: InstanceModel,
    deployment: Deployment,
    requests: Sequence[WorkloadRequest],
    slo: Slo,
    *,
    target: float = 0.9,
    seed: int = 0,
    rel_tol: float = 0.02,
    start_rate: float | None = None,
    max_doublings: int = 30,
) -> GoodputResult:
    """Bracket the rate where attainment crosses ``target`` by doubling or halving from
    ``start_rate`` (default: the fleet's rate if every request ran alone), then bisect
    (geometrically) until the bracket is within ``rel_tol``. Every rate uses the same
    seeded workload and the same arrival sequence, rescaled."""
    if not slo.given:
        raise ValueError("goodput needs an SLO (a TTFT or TPOT target)")
    if not 0 < target <= 1:
        raise ValueError(f"target attainment must be in (0, 1], got {target}")
    if not rel_tol > 0:
        raise ValueError(f"rel_tol must be > 0, got {rel_tol}")
    if not requests:
        raise ValueError("goodput needs at least one request")
    unit = np.asarray(poisson_arrivals(len(requests), 1.0, seed))
    evaluations: list[tuple[float, float]] = []
    results: dict[float, SimulationResult] = {}

    def attained(rate: float) -> bool:
        arrivals = [0.0] * len(requests) if math.isinf(rate) else list(unit / rate)
        result = simulate(model, deployment, requests, arrivals, slo=slo, rate=rate)
        assert result.attainment is not None
        results[rate] = result
        evaluations.append((rate, result.attainment))
        return result.attainment >= target

    def done(rate: float) -> GoodputResult:
        return GoodputResult(deployment, rate, target, results.get(rate), tuple(evaluations))

    rate = start_rate if start_rate is not None else _capacity_guess(model, deployment, requests)
    if attained(rate):
        low = rate
        for doubling in range(max_doublings):
            # A workload too small to load the fleet meets the SLO at any rate: a burst of
            # all of it says so at once, instead of doubling for ever.
            if doubling == _DOUBLINGS_BEFORE_BURST and attained(math.inf):
                return done(math.inf)
            if not attained(rate * 2):
                high = rate * 2
                break
            rate *= 2
            low = rate
        else:
            return done(low)
    else:
        high = rate
        for _ in range(max_doublings):
            rate /= 2
            if attained(rate):
                low = rate
                break
            high = rate
        else:
            return done(0.0)
    while high / low > 1 + rel_tol:
        middle = math.sqrt(low * high)
        if attained(middle):
            low = middle
        else:
            high = middle
    return done(low)


# Successful doublings of the goodput search before it tries all requests at once.
_DOUBLINGS_BEFORE_BURST: Final = 3


def _capacity_guess(
    model: InstanceModel, deployment: Deployment, requests: Sequence[WorkloadRequest]
) -> float:
    """Requests/s the fleet serves with no batching at all: a start below the goodput of
    any batching engine, so the search mostly doubles."""
    mean_prompt = round(sum(r.prompt_tokens for r in requests) / len(requests))
    mean_output = round(sum(r.output_tokens for r in requests) / len(requests))
    solo = model.solo_seconds(max(mean_prompt, 1), max(mean_output, 1))
    return deployment.instances / max(solo, MIN_STEP_S)


@dataclass(frozen=True)
class SplitRecommendation:
    instances: int
    rows: tuple[GoodputResult, ...]  # every P:D split (P = 1..N-1), then N aggregated
    best: GoodputResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "best": self.best.deployment.label,
            "rows": [row.to_dict() for row in self.rows],
        }


def recommend_split(
    total_instances: int,
    model: InstanceModel,
    requests: Sequence[WorkloadRequest],
    slo: Slo,
    *,
    routing: Routing | None = None,
    target: float = 0.9,
    seed: int = 0,
    rel_tol: float = 0.02,
    progress: Callable[[GoodputResult], None] | None = None,
) -> SplitRecommendation:
    """Goodput of every xPyD with x + y = ``total_instances`` and of as many aggregated
    instances; the best is the highest goodput (the first of equals: fewer prefill)."""
    if total_instances < 1:
        raise ValueError(f"total_instances must be >= 1, got {total_instances}")
    routing = routing or Routing()
    deployments = [
        Deployment.pd(prefill, total_instances - prefill, routing)
        for prefill in range(1, total_instances)
    ]
    deployments.append(Deployment.aggregated(total_instances, routing))
    rows = []
    for deployment in deployments:
        row = goodput(model, deployment, requests, slo, target=target, seed=seed, rel_tol=rel_tol)
        if progress is not None:
            progress(row)
        rows.append(row)
    best = max(rows, key=lambda row: row.rate)
    return SplitRecommendation(total_instances, tuple(rows), best)
