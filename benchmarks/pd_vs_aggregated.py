"""PD disaggregation against aggregated serving on equal hardware: goodput under SLOs.

Setups, each on the same two cores (``--cores``, default ``0,1``), each behind its own
pdserve proxy, measured in turn with nothing else running:

* **pd**: one prefill engine (KV producer) on the first core, one decode engine (KV consumer)
  on the second;
* **aggregated**: two plain vLLM engines, one per core, balanced by ``least_load``;
* **aggregated-wide** (``--wide``): one plain engine on both cores.

The load is vLLM's own serving benchmark (``vllm bench serve``, :mod:`benchmarks.vllm_bench`):
open-loop Poisson arrivals at each rate of ``--rates``, a mixed workload whose prompt and
output lengths are log-normal with the medians of a published chat trace
(:mod:`benchmarks.workload`), prefix caching on with a shared system prompt on a stated
share of the requests. Every run's ``vllm bench serve`` command is in the JSON, so any
figure can be repeated by hand.

Per setup and rate: TTFT, TPOT and E2E percentiles, throughput, and the share of requests
meeting both SLOs (``--ttft-slo-ms``, ``--tpot-slo-ms``). Goodput is the highest rate at which
that share reaches ``--attainment`` (90 %); the report gives each setup's goodput and PD's
ratio over the aggregated setups. For PD it also reads the proxy's and the decode's counters
around every run: every request must have taken the disaggregated path and pulled its KV,
with no fallback, recompute or transfer failure.

Every setup is started once, then the setups take turns rate by rate (the first setup of
each rate rotates): the one measured runs, the others' process groups are stopped with
SIGSTOP, so they neither spin on the cores nor restart, and a drift of the machine's speed
lands on every setup alike rather than on whichever was measured later. ``--profile-out``
also profiles one engine (``pdserve plan profile``) in the same run, after the sweep, for
``pdserve plan validate``.

The default model is the generated ``small`` preset (``pdserve make-tiny-model --preset
small``), in which a long prefill costs tens of decode steps as on real models; ``--model``
takes any local HF model directory.

Everything the benchmark starts runs in its own process group and is stopped on exit, on
errors, on Ctrl-C and on SIGTERM/SIGHUP; the report lists any process group that outlived
its stop (there should be none).

    pdserve bench pd [--rates 0.5,1,2] [--ttft-slo-ms 2000] [--tpot-slo-ms 50] [--wide] [--quick]
    python -m benchmarks.pd_vs_aggregated --help
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import goodput as gp
from benchmarks.vllm_bench import ServeRun, VllmBenchError, run_serve
from benchmarks.workload import (
    TRACE_SOURCE,
    WorkloadError,
    WorkloadRequest,
    add_workload_arguments,
    render_prompts,
    single_token_words,
    summary,
    workload_from_args,
    write_vllm_custom_jsonl,
)
from deploy.worker_launch import (
    PortPicker,
    WorkerConfigError,
    WorkerSpec,
    free_port,
    group_alive,
    signal_group,
    start_worker,
    stop_process_group,
    stop_worker,
    wait_until_ready,
)

T = TypeVar("T")

DEFAULT_OUT = Path("benchmarks/results/pd_vs_aggregated.json")
SETUP_NAMES = ("pd", "aggregated", "aggregated-wide")
DEFAULT_RATES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
# Defaults sized to the small preset on one CPU core, before any measurement under load: a
# median prompt (255 tokens) prefills in about 0.3 s and a decode step at batch 8 takes about
# 16 ms, so the SLOs allow a few prefills' worth of queueing before the first token and about
# 3 decode steps per token.
DEFAULT_TTFT_SLO_MS = 2000.0
DEFAULT_TPOT_SLO_MS = 50.0
# Goodput is recomputed for these SLO pairs from the same runs (the report's slo_grid).
GRID_TTFT_SLOS_MS = (1000.0, 2000.0, 4000.0)
GRID_TPOT_SLOS_MS = (20.0, 30.0, 50.0, 100.0)

# Only what the flags cannot say: no admin listener, so no fixed port to collide on.
_PROXY_CONFIG = "proxy:\n  admin:\n    port: null\n"


class BenchError(Exception):
    """The benchmark cannot go on: a process failed to start or died."""


# -- processes ------------------------------------------------------------------------------


@dataclass
class Started:
    """One process group this benchmark started."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    ready_s: float | None = None
    stopper: Callable[[subprocess.Popen[bytes]], object] | None = None
    spec: WorkerSpec | None = None  # an engine's, for what the proxy must know of it

    def raise_if_exited(self, during: str = "") -> None:
        """BenchError naming the process, its exit status and its log, once it has exited."""
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self.process.returncode}"
                f"{' ' + during if during else ''} (log: {self.log_path})"
            )

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``process``, SIGKILL what is left after ``grace_s``."""
    pgid = process.pid
    stop_process_group(process, grace_s)
    deadline = time.monotonic() + 5.0
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


class ProcessSet:
    """The processes of one benchmark run; ``stop`` and ``stop_all`` leave none behind."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[Started] = []
        # Every engine port of the run: bound late, so never handed out twice.
        self.ports = PortPicker()
        # Process groups still alive after their stop: reported, never expected.
        self.leftovers: list[str] = []

    def add(self, started: Started) -> Started:
        self.running.append(started)
        return started

    def stop(self, started: Started) -> None:
        if started not in self.running:
            return
        # A second Ctrl-C must not cut the clean-up short and orphan an engine.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            # A paused group would only take SIGTERM once continued: its grace would run
            # out and SIGKILL would cut its own clean-up short.
            signal_group(started.process.pid, signal.SIGCONT)
            (started.stopper or stop_group)(started.process)
            if group_alive(started.process.pid):
                self.leftovers.append(f"{started.name} (process group {started.process.pid})")
        finally:
            signal.signal(signal.SIGINT, previous)
        self.running.remove(started)

    def stop_all(self) -> None:
        for started in reversed(list(self.running)):
            self.stop(started)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP become KeyboardInterrupt, so the finally-blocks stop our engines."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _http(url: str, body: dict[str, Any] | None = None, timeout_s: float = 10.0) -> bytes:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        data: bytes = response.read()
        return data


# -- engines and proxy ----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    model: Path
    served_model_name: str
    block_size: int
    dtype: str
    max_model_len: int
    kv_cache_gib: int
    secret: str


def start_engine(
    processes: ProcessSet,
    role: str,
    core: str,
    settings: EngineSettings,
    name: str | None = None,
    *,
    prefix_caching: bool = False,
    kv_events: bool = False,
    env: Mapping[str, str] | None = None,
) -> Started:
    """One engine, logging to ``<log_dir>/<name>.log`` (``name`` defaults to ``role``);
    ``kv_events`` publishes vLLM's KV cache events (``advertised_kv_events(started.spec)``)."""
    name = name or role
    spec = WorkerSpec(
        role=role,  # type: ignore[arg-type]  # one of the three roles, checked by validate
        model=settings.model,
        api_port=processes.ports.pick(),
        kv_port=processes.ports.pick() if role == "prefill" else None,
        kv_events=kv_events,
        kv_events_port=processes.ports.pick() if kv_events else None,
        kv_events_replay_port=processes.ports.pick() if kv_events else None,
        cpu_core=core,
        kv_cache_gib=settings.kv_cache_gib,
        secret=settings.secret,
        served_model_name=settings.served_model_name,
        block_size=settings.block_size,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        enable_prefix_caching=prefix_caching,
        # Equal hardware means each engine on its own cores, all of its processes included.
        pin_process_tree=True,
        env=dict(env or {}),
    )
    log_path = processes.log_dir / f"{name}.log"
    try:
        process = start_worker(spec, log_path=log_path)
    except WorkerConfigError as exc:
        raise BenchError(f"{name} engine: {exc}") from None
    return processes.add(
        Started(
            name,
            spec.url,
            process,
            log_path,
            stopper=lambda p: stop_worker(p, grace_s=20.0),
            spec=spec,
        )
    )


def wait_answering(started: Started, timeout_s: float, what: str) -> None:
    """Until the engine's /v1/models answers; BenchError "<name> <what>: <reason>" if not."""
    try:
        wait_until_ready(started.url, timeout_s, proc=started.process, log_path=started.log_path)
    except (RuntimeError, TimeoutError) as exc:
        first_line = str(exc).splitlines()[0]
        raise BenchError(f"{started.name} {what}: {first_line}") from None


def wait_engine(started: Started, timeout_s: float) -> None:
    wait_answering(started, timeout_s, "engine did not start")
    started.ready_s = time.monotonic() - started.started_at


def start_proxy(
    processes: ProcessSet,
    prefill: Sequence[Started],
    decode: Sequence[Started],
    name: str = "proxy",
    config_text: str = _PROXY_CONFIG,
) -> Started:
    """The pdserve proxy in front of ``decode`` (and ``prefill``: without it every request
    takes the aggregated path, straight to a decode-pool engine, picked by ``least_load``),
    logging to ``<log_dir>/<name>.log``. ``config_text`` is its YAML config, which may name
    the instances itself (with their KV-events endpoints) instead of ``prefill``/``decode``."""
    port = free_port()
    config = processes.log_dir / f"{name}.yaml"
    config.write_text(config_text)
    argv = [sys.executable, "-m", "deploy.cli", "proxy", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    if prefill:
        argv += ["--prefill", *(engine.url for engine in prefill)]
    if decode:
        argv += ["--decode", *(engine.url for engine in decode)]
    log_path = processes.log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
    return processes.add(Started(name, f"http://127.0.0.1:{port}", process, log_path))


def wait_serving(started: Started, probe: dict[str, Any], timeout_s: float) -> None:
    """Until one full completion goes through ``started`` (for the proxy: P then D)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        started.raise_if_exited()
        try:
            answer = json.loads(_http(started.url + "/v1/completions", probe, timeout_s=60.0))
            if answer.get("choices"):
                if started.ready_s is None:
                    started.ready_s = time.monotonic() - started.started_at
                return
            last = f"no choices in {str(answer)[:200]}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise BenchError(
        f"{started.name} at {started.url} served no completion within {timeout_s:g} s ({last})"
    )


# -- setups ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRole:
    name: str  # also its log file's name
    role: str  # prefill | decode | aggregated
    core: str  # VLLM_CPU_OMP_THREADS_BIND


@dataclass(frozen=True)
class Setup:
    name: str
    description: str
    engines: tuple[EngineRole, ...]

    @property
    def prefill(self) -> tuple[EngineRole, ...]:
        return tuple(e for e in self.engines if e.role == "prefill")


def build_setups(cores: tuple[int, int], wide: bool) -> list[Setup]:
    first, second = (str(core) for core in cores)
    both = f"{first}-{second}" if cores[1] == cores[0] + 1 else f"{first},{second}"
    setups = [
        Setup(
            "pd",
            f"1 prefill (core {first}) + 1 decode (core {second}) behind the proxy",
            (EngineRole("prefill", "prefill", first), EngineRole("decode", "decode", second)),
        ),
        Setup(
            "aggregated",
            f"2 aggregated engines (cores {first} and {second}) behind the proxy, least_load",
            (
                EngineRole("aggregated-0", "aggregated", first),
                EngineRole("aggregated-1", "aggregated", second),
            ),
        ),
    ]
    if wide:
        setups.append(
            Setup(
                "aggregated-wide",
                f"1 aggregated engine on cores {both} behind the proxy",
                (EngineRole("aggregated-wide", "aggregated", both),),
            )
        )
    return setups


# -- counters -------------------------------------------------------------------------------


def metric_sum(url: str, prefix: str, labels: dict[str, str] | None = None) -> float | None:
    """Sum of the samples on ``url``'s /metrics whose name starts with ``prefix``."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = _http(url + "/metrics", timeout_s=10.0).decode()
    except (OSError, ValueError):
        return None
    total: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(prefix) or sample.name.endswith("_created"):
                continue
            if labels and any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            total = (total or 0.0) + sample.value
    return total


_PATHS = ("disaggregated", "aggregated", "fallback")


def read_counters(proxy: Started, engines: Sequence[Started]) -> dict[str, float]:
    """The proxy's requests by path and the engines' KV-transfer counters (summed)."""
    counters = {
        f"proxy_{path}": metric_sum(proxy.url, "pdserve_requests_total", {"path": path}) or 0.0
        for path in _PATHS
    }
    names = {
        "kv_bytes": "pdserve_kv_transfer_bytes_total",
        "kv_pulls": "pdserve_kv_transfer_seconds_count",
        "kv_failures": "pdserve_kv_transfer_failures_total",
        "kv_recomputed_requests": "pdserve_kv_recomputed_requests_total",
        "kv_leases_expired": "pdserve_kv_leases_expired_total",
    }
    for key, name in names.items():
        counters[key] = sum(metric_sum(engine.url, name) or 0.0 for engine in engines)
    return counters


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def settled_delta(
    proxy: Started,
    engines: Sequence[Started],
    before: dict[str, float],
    requests: int,
    pd: bool,
    timeout_s: float = 30.0,
) -> dict[str, float]:
    """The counters' change over a run of ``requests`` requests, once they show all of them.

    The client has its last byte before the proxy records the request and before vLLM ships
    the decode's transfer stats to its /metrics, so reading at once would miss the last ones.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        delta = counter_delta(before, read_counters(proxy, engines))
        counted = sum(delta[f"proxy_{path}"] for path in _PATHS)
        if counted >= requests and (not pd or pd_check(delta, requests)[0]):
            return delta
        if time.monotonic() >= deadline:
            return delta
        time.sleep(0.5)


def pd_check(delta: dict[str, float], requests: int) -> tuple[bool, str]:
    """Whether ``requests`` PD requests all went through the prefill leg and a KV pull."""
    problems = []
    if delta["proxy_disaggregated"] < requests:
        problems.append(f"{delta['proxy_disaggregated']:.0f} of {requests} disaggregated")
    for key in ("proxy_aggregated", "proxy_fallback", "kv_failures", "kv_recomputed_requests"):
        if delta[key]:
            problems.append(f"{key} {delta[key]:.0f}")
    # A request pulls at least once (a pull is one transfer; a long prompt may take several).
    if delta["kv_pulls"] < requests:
        problems.append(f"{delta['kv_pulls']:.0f} KV pulls for {requests} requests")
    return (not problems, "; ".join(problems) or "ok")


# -- measuring ------------------------------------------------------------------------------


@dataclass
class RatePoint:
    setup: str
    rate: float  # offered requests per second (Poisson)
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    # Milliseconds, from vLLM's result (its own percentile code).
    ttft_ms: dict[str, float]  # p50, p90, p99
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]
    attainment: float  # share of the requests sent meeting both SLOs
    vllm_request_goodput: float | None  # vLLM's own count: good requests / duration
    command: str  # the vllm bench serve command of this run
    counters: dict[str, float] = field(default_factory=dict)
    pd_path_ok: bool | None = None  # None: not a PD setup
    pd_path_detail: str = ""
    # Per request sent, in the order of ``requests`` (None: it failed): the TPOT CDF, and
    # attainment at other SLOs after the fact. TPOT is 0 for one-token answers, as in vLLM.
    ttfts_ms: list[float | None] = field(default_factory=list)
    tpots_ms: list[float | None] = field(default_factory=list)
    # The run as it happened, for replaying it (``pdserve plan validate``): when each request
    # was sent (seconds from the first) and its [prompt, output, shared prefix] tokens.
    arrivals_s: list[float] = field(default_factory=list)
    requests: list[list[int]] = field(default_factory=list)
    # Whether vLLM counted exactly the prompt lengths the workload drew, request by request.
    lengths_exact: bool = True
    load_average_1m: float = 0.0


def _percentiles(result: dict[str, Any], metric: str) -> dict[str, float]:
    return {f"p{q}": float(result.get(f"p{q}_{metric}_ms") or 0.0) for q in (50, 90, 99)}


def rate_point(
    setup: Setup,
    dataset: RateDataset,
    run: ServeRun,
    result: dict[str, Any],
    counters: dict[str, float],
    slo: tuple[float, float],
    load_1m: float,
) -> RatePoint:
    outcomes = gp.outcomes_from_vllm(result)
    starts = [float(t) for t in result.get("start_times") or []]
    point = RatePoint(
        setup=setup.name,
        rate=dataset.rate,
        num_prompts=run.num_prompts,
        completed=int(result.get("completed", 0)),
        failed=int(result.get("failed", 0)),
        duration_s=float(result.get("duration", 0.0)),
        request_throughput=float(result.get("request_throughput", 0.0)),
        output_throughput=float(result.get("output_throughput", 0.0)),
        ttft_ms=_percentiles(result, "ttft"),
        tpot_ms=_percentiles(result, "tpot"),
        e2e_ms=_percentiles(result, "e2el"),
        attainment=gp.attainment(outcomes, slo[0] / 1000.0, slo[1] / 1000.0),
        vllm_request_goodput=result.get("request_goodput"),
        command=run.command(),
        counters=counters,
        ttfts_ms=[o.ttft_s * 1000.0 if o.ok else None for o in outcomes],
        tpots_ms=[o.tpot_s * 1000.0 if o.ok else None for o in outcomes],
        arrivals_s=[t - min(starts) for t in starts] if starts else [],
        requests=[
            [r.prompt_tokens, r.output_tokens, r.shared_prefix_tokens] for r in dataset.requests
        ],
        lengths_exact=list(result.get("input_lens") or [])
        == [r.prompt_tokens for r in dataset.requests],
        load_average_1m=load_1m,
    )
    if setup.prefill:
        # Exactly the measured requests: vLLM's ready-check request is off (the setup was
        # checked before) and the counters are read around the run.
        point.pd_path_ok, point.pd_path_detail = pd_check(counters, run.num_prompts)
    return point


@dataclass(frozen=True)
class RateDataset:
    rate: float
    path: Path
    requests: tuple[WorkloadRequest, ...]  # in the file's order, which vLLM keeps

    @property
    def num_prompts(self) -> int:
        return len(self.requests)


def prompts_for_rate(rate: float, args: argparse.Namespace) -> int:
    wanted = math.ceil(rate * args.seconds_per_rate)
    return max(args.min_prompts, min(args.max_prompts, wanted))


def build_datasets(
    model: Path, requests: Sequence[WorkloadRequest], args: argparse.Namespace, workdir: Path
) -> list[RateDataset]:
    """One vLLM custom dataset per rate: the same lengths, distinct text, the same shared
    prefix, so no rate gets cache hits from the prompts of another."""
    encode, decode, vocab, specials = _tokenizer(model)
    words = single_token_words(encode, decode, range(vocab))
    datasets = []
    for index, rate in enumerate(args.rates):
        count = prompts_for_rate(rate, args)
        chosen = list(requests[:count])
        if len(chosen) < count:
            raise WorkloadError(f"the workload has {len(requests)} requests, {count} needed")
        texts = render_prompts(chosen, words, args.seed + 1 + index, encode, specials,
                               prefix_seed=args.seed)  # fmt: skip
        path = workdir / f"workload-rate{index}.jsonl"
        write_vllm_custom_jsonl(path, texts, chosen)
        datasets.append(RateDataset(rate, path, tuple(chosen)))
    return datasets


def _tokenizer(
    model: Path,
) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str], int, int]:
    """encode (no special tokens), decode, vocabulary size, special tokens the server adds."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    specials = len(tokenizer("x").input_ids) - len(
        tokenizer("x", add_special_tokens=False).input_ids
    )
    return (
        lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
        lambda ids: str(tokenizer.decode(ids)),
        len(tokenizer),
        specials,
    )


@dataclass
class RunningSetup:
    """One setup's engines and proxy: started once, paused while another setup is measured."""

    setup: Setup
    engines: list[Started]
    proxy: Started

    @property
    def pd(self) -> bool:
        return bool(self.setup.prefill)


def _probe(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.served_model_name, "prompt": "warm up", "max_tokens": 2}


def start_setup(
    setup: Setup,
    settings: EngineSettings,
    args: argparse.Namespace,
    processes: ProcessSet,
    startup: dict[str, float | None],
) -> RunningSetup:
    print(f"{setup.name}: starting {setup.description} ...", file=sys.stderr, flush=True)
    engines = [
        start_engine(processes, e.role, e.core, settings, e.name, prefix_caching=True)
        for e in setup.engines
    ]
    for engine in engines:
        wait_engine(engine, args.startup_timeout)
    prefill = [s for s, e in zip(engines, setup.engines, strict=True) if e.role == "prefill"]
    decode = [s for s, e in zip(engines, setup.engines, strict=True) if e.role != "prefill"]
    proxy = start_proxy(processes, prefill, decode, f"proxy-{setup.name}")
    for engine in decode:  # each engine once, then the whole path
        wait_serving(engine, _probe(args), args.startup_timeout)
    wait_serving(proxy, _probe(args), args.startup_timeout)
    startup.update({engine.name: engine.ready_s for engine in engines})
    return RunningSetup(setup, engines, proxy)


def pause(running: RunningSetup) -> None:
    """SIGSTOP the setup's proxy, then its engines: idle vLLM engines busy-poll, so a setup
    that is not measured must not run at all."""
    for started in (running.proxy, *running.engines):
        signal_group(started.process.pid, signal.SIGSTOP)


def resume(running: RunningSetup, args: argparse.Namespace) -> None:
    """SIGCONT the engines, then the proxy once they answer; return once the proxy counts
    every engine healthy and a completion has gone through it.

    The proxy is continued last so that its health checks (and their timeouts, which ran on
    while it was stopped) meet engines that answer again; it ejects an instance only after
    several failed checks, and the wait below sees any that it did eject readmitted."""
    for started in running.engines:
        signal_group(started.process.pid, signal.SIGCONT)
    for engine in running.engines:
        wait_answering(engine, args.startup_timeout, "did not answer once continued")
    signal_group(running.proxy.process.pid, signal.SIGCONT)
    wait_all_healthy(running.proxy, len(running.engines), args.startup_timeout)
    wait_serving(running.proxy, _probe(args), args.startup_timeout)


def wait_all_healthy(proxy: Started, engines: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    healthy: float | None = None
    while time.monotonic() < deadline:
        healthy = metric_sum(proxy.url, "pdserve_instance_healthy")
        if healthy == engines:
            return
        time.sleep(0.5)
    raise BenchError(
        f"{proxy.name} counted {healthy} of {engines} engines healthy {timeout_s:g} s after "
        f"the setup was continued (log: {proxy.log_path})"
    )


def turns(running: Sequence[T], index: int) -> list[T]:
    """The setups' order at the ``index``-th rate: rotated by one each rate, so no setup is
    always measured first (just after a pause of its own) or last."""
    if not running:
        return []
    shift = index % len(running)
    return [*running[shift:], *running[:shift]]


def measure_rate(
    running: RunningSetup,
    index: int,
    dataset: RateDataset,
    settings: EngineSettings,
    args: argparse.Namespace,
    processes: ProcessSet,
) -> RatePoint:
    setup, engines, proxy = running.setup, running.engines, running.proxy
    print(
        f"  {setup.name:<16} {dataset.rate:g} req/s, {dataset.num_prompts} requests ...",
        file=sys.stderr,
        flush=True,
    )
    run = ServeRun(
        base_url=proxy.url,
        served_model_name=args.served_model_name,
        tokenizer=settings.model,
        dataset_jsonl=dataset.path,
        num_prompts=dataset.num_prompts,
        request_rate=dataset.rate,
        seed=args.seed,
        result_dir=processes.log_dir / "vllm-bench",
        result_filename=f"{setup.name}-rate{index}.json",
        ttft_slo_ms=args.ttft_slo_ms,
        tpot_slo_ms=args.tpot_slo_ms,
        label=setup.name,
    )
    load_1m = os.getloadavg()[0]
    before = read_counters(proxy, engines)
    timeout = args.request_timeout + 3 * dataset.num_prompts / dataset.rate + 120
    try:
        result = run_serve(run, processes.log_dir / "vllm-bench.log", timeout)
    except VllmBenchError as exc:
        raise BenchError(str(exc)) from None
    delta = settled_delta(proxy, engines, before, dataset.num_prompts, running.pd)
    slo = (args.ttft_slo_ms, args.tpot_slo_ms)
    point = rate_point(setup, dataset, run, result, delta, slo, load_1m)
    for started in (*engines, proxy):
        started.raise_if_exited(f"during the {setup.name} runs")
    return point


def profile_in_run(args: argparse.Namespace, model: Path, processes: ProcessSet) -> dict[str, Any]:
    """``pdserve plan profile`` with its defaults, on the second core, while every setup is
    paused: the profile ``pdserve plan validate`` replays this run's requests on."""
    from benchmarks.planner import profile as plan_profile

    parser = argparse.ArgumentParser()
    plan_profile.add_arguments(parser)
    profile_args = parser.parse_args(["--core", str(args.cores[1])] + ["--quick"] * args.quick)
    plan_profile.apply_quick(profile_args)
    profile_args.model = model
    if args.model is None:
        profile_args.preset = args.preset
    print("profiling one engine for pdserve plan validate ...", file=sys.stderr, flush=True)
    workdir = processes.log_dir / "profile"
    workdir.mkdir(exist_ok=True)
    profile = plan_profile.run_profile(profile_args, workdir)
    if args.model is None:  # run_profile names the model it was handed; say what it is
        profile = replace(profile, model=f"generated {args.preset} preset")
    profile.save(args.profile_out)
    return {"path": str(args.profile_out), "created": profile.created}


# -- the benchmark --------------------------------------------------------------------------


def engine_settings(args: argparse.Namespace, model: Path) -> EngineSettings:
    longest = args.max_prompt_tokens + args.max_output_tokens
    block = args.block_size
    max_model_len = args.max_model_len or -(-(longest + 1) // block) * block
    return EngineSettings(
        model=model,
        served_model_name=args.served_model_name,
        block_size=block,
        dtype=args.dtype,
        max_model_len=max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        secret=secrets.token_hex(16),
    )


def attainment_at(point: RatePoint, ttft_slo_ms: float, tpot_slo_ms: float) -> float:
    """The share of ``point``'s requests that meet other SLOs than the run's."""
    if not point.ttfts_ms:
        return 0.0
    met = sum(
        1
        for ttft, tpot in zip(point.ttfts_ms, point.tpots_ms, strict=True)
        if ttft is not None and tpot is not None and ttft <= ttft_slo_ms and tpot <= tpot_slo_ms
    )
    return met / len(point.ttfts_ms)


def slo_grid(
    points: Sequence[RatePoint],
    ttft_slos_ms: Sequence[float],
    tpot_slos_ms: Sequence[float],
    target: float,
) -> list[dict[str, Any]]:
    """Goodput of PD and of the 2 aggregated engines, and their ratio, for other SLO pairs:
    where PD stops paying."""
    rows = []
    for ttft in ttft_slos_ms:
        for tpot in tpot_slos_ms:
            goodputs = {
                name: gp.goodput(
                    ((p.rate, attainment_at(p, ttft, tpot)) for p in points if p.setup == name),
                    target,
                )
                for name in ("pd", "aggregated")
            }
            rows.append(
                {
                    "ttft_slo_ms": ttft,
                    "tpot_slo_ms": tpot,
                    "goodput_req_per_s": goodputs,
                    "pd_over_aggregated": gp.ratio(goodputs["pd"], goodputs["aggregated"]),
                }
            )
    return rows


def summarise(points: Sequence[RatePoint], setups: Sequence[str], target: float) -> dict[str, Any]:
    """Each setup's goodput, and PD's over each aggregated setup's."""
    goodputs = {
        name: gp.goodput(((p.rate, p.attainment) for p in points if p.setup == name), target)
        for name in setups
    }
    ratios = {
        f"pd_over_{name}": gp.ratio(goodputs["pd"], goodputs[name])
        for name in setups
        if name != "pd" and "pd" in goodputs
    }
    return {"goodput_req_per_s": goodputs, "ratios": ratios}


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    processes = ProcessSet(workdir)
    points: list[RatePoint] = []
    load: dict[str, Any] = {"before": os.getloadavg()}
    profiled: dict[str, Any] | None = None
    startup: dict[str, float | None] = {}
    setups = build_setups(args.cores, args.wide)
    try:
        with signals_as_interrupt():
            model = args.model
            if model is None:
                from deploy.tiny_model import PRESETS, make_tiny_model

                model = make_tiny_model(workdir / f"{args.preset}-model", PRESETS[args.preset])
            settings = engine_settings(args, model)
            spec, requests = workload_from_args(args)
            datasets = build_datasets(model, requests, args, workdir)
            running: list[RunningSetup] = []
            for setup in setups:
                running.append(start_setup(setup, settings, args, processes, startup))
                pause(running[-1])
            load["sweep_start"] = os.getloadavg()
            for index, dataset in enumerate(datasets):
                for turn in turns(running, index):
                    resume(turn, args)
                    points.append(measure_rate(turn, index, dataset, settings, args, processes))
                    pause(turn)
            load["after"] = os.getloadavg()
            if args.profile_out is not None:
                profiled = profile_in_run(args, model, processes)
    finally:
        processes.stop_all()
    order = {setup.name: i for i, setup in enumerate(setups)}
    points.sort(key=lambda point: (order[point.setup], point.rate))
    used = requests[: max(d.num_prompts for d in datasets)]
    return {
        "benchmark": "pd_vs_aggregated",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "indicative": load["before"][0] > 1.0,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": load,
        },
        "config": {
            "model": f"generated {args.preset} preset" if args.model is None else str(args.model),
            "served_model_name": args.served_model_name,
            "setups": {setup.name: setup.description for setup in setups},
            "rates": list(args.rates),
            "prompts_per_rate": {f"{d.rate:g}": d.num_prompts for d in datasets},
            "arrivals": "Poisson (vllm bench serve --burstiness 1)",
            "ttft_slo_ms": args.ttft_slo_ms,
            "tpot_slo_ms": args.tpot_slo_ms,
            "attainment_target": args.attainment,
            "workload": {
                "source": TRACE_SOURCE if args.workload_jsonl is None else str(args.workload_jsonl),
                "spec": asdict(spec),
                "measured": summary(used),
            },
            "prefix_caching": True,
            "api": "completions, streamed, ignore_eos, temperature 0",
            "block_size": settings.block_size,
            "dtype": settings.dtype,
            "max_model_len": settings.max_model_len,
            "kv_cache_gib": settings.kv_cache_gib,
            "proxy_and_load_generator_cores": "unbound",
            "schedule": "setups take turns rate by rate, the others paused (SIGSTOP)",
        },
        "profile": profiled,
        "startup_s": startup,
        "leftover_processes": processes.leftovers,
        "runs": [asdict(point) for point in points],
        "summary": summarise(points, [s.name for s in setups], args.attainment),
        "slo_grid": slo_grid(points, GRID_TTFT_SLOS_MS, GRID_TPOT_SLOS_MS, args.attainment),
    }


def format_table(report: dict[str, Any]) -> str:
    config = report["config"]
    workload = config["workload"]["measured"]
    header = (
        f"{'setup':<16} {'rate':>5} {'reqs':>4} {'fail':>4} "
        f"{'TTFT p50':>8} {'p90':>7} {'p99':>7} {'TPOT p50':>8} {'p90':>6} {'p99':>6} "
        f"{'E2E p50':>8} {'p99':>7} {'req/s':>6} {'tok/s':>6} {'SLO met':>7}"
    )
    lines = [
        f"model: {config['model']}; SLOs: TTFT <= {config['ttft_slo_ms']:g} ms and TPOT <= "
        f"{config['tpot_slo_ms']:g} ms; goodput at >= {config['attainment_target']:.0%} met",
        f"workload: prompt tokens p50 {workload['prompt_tokens']['p50']} / p90 "
        f"{workload['prompt_tokens']['p90']}, output tokens p50 "
        f"{workload['output_tokens']['p50']} / p90 {workload['output_tokens']['p90']}, "
        f"{workload['shared_prefix_request_fraction']:.0%} of requests share a prefix "
        f"({workload['shared_prefix_token_fraction']:.0%} of prompt tokens); Poisson arrivals",
        "latencies in ms (vllm bench serve)",
        header,
        "-" * len(header),
    ]
    for run in sorted(report["runs"], key=lambda r: (r["rate"], SETUP_NAMES.index(r["setup"]))):
        ttft, tpot, e2e = run["ttft_ms"], run["tpot_ms"], run["e2e_ms"]
        lines.append(
            f"{run['setup']:<16} {run['rate']:>5g} {run['num_prompts']:>4} {run['failed']:>4} "
            f"{ttft['p50']:>8.0f} {ttft['p90']:>7.0f} {ttft['p99']:>7.0f} "
            f"{tpot['p50']:>8.1f} {tpot['p90']:>6.1f} {tpot['p99']:>6.1f} "
            f"{e2e['p50']:>8.0f} {e2e['p99']:>7.0f} {run['request_throughput']:>6.2f} "
            f"{run['output_throughput']:>6.0f} {run['attainment']:>7.0%}"
        )
    result = report["summary"]
    lines.append("")
    lines.append(
        "goodput (req/s): "
        + ", ".join(f"{name} {value:g}" for name, value in result["goodput_req_per_s"].items())
    )
    for name, value in result["ratios"].items():
        lines.append(
            f"{name.replace('_', ' ')}: " + ("unbounded" if value is None else f"{value:.2f}x")
        )
    grid = report.get("slo_grid") or []
    if grid:
        lines.append("goodput at other SLOs (same runs), pd / aggregated req/s:")
        tpots = sorted({row["tpot_slo_ms"] for row in grid})
        lines.append(f"  {'TTFT SLO':>9} " + " ".join(f"{'TPOT ' + f'{t:g}':>14}" for t in tpots))
        for ttft in sorted({row["ttft_slo_ms"] for row in grid}):
            cells = []
            for tpot in tpots:
                row = next(r for r in grid if (r["ttft_slo_ms"], r["tpot_slo_ms"]) == (ttft, tpot))
                good = row["goodput_req_per_s"]
                cells.append(f"{good['pd']:g} / {good['aggregated']:g}".rjust(14))
            lines.append(f"  {ttft:>9g} " + " ".join(cells))
    pd_runs = [r for r in report["runs"] if r["pd_path_ok"] is not None]
    bad = [r for r in pd_runs if not r["pd_path_ok"]]
    pulls = sum(r["counters"].get("kv_pulls", 0) for r in pd_runs)
    lines.append(
        f"PD path check: {'ok' if not bad else 'NOT OK'} ({len(pd_runs)} runs, {pulls:.0f} KV "
        "pulls, no fallback or recompute)"
        if not bad
        else "PD path check: NOT OK: "
        + "; ".join(f"{r['rate']:g} req/s: {r['pd_path_detail']}" for r in bad)
    )
    if report["indicative"]:
        lines.append(
            "note: other work was running on the box before the benchmark started; "
            "the figures are indicative only"
        )
    return "\n".join(lines)


def tpot_values(run: dict[str, Any]) -> list[float]:
    """TPOT of each answered request with more than one output token."""
    return [
        tpot
        for tpot, request in zip(run["tpots_ms"], run["requests"], strict=True)
        if tpot is not None and request[1] > 1
    ]


def plot(report: dict[str, Any], png: Path) -> bool:
    """SLO attainment and TTFT against rate, and the TPOT CDF at one rate; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = report["runs"]
    setups = [name for name in SETUP_NAMES if any(r["setup"] == name for r in runs)]
    rates = sorted({r["rate"] for r in runs})
    cdf_rate = report["config"].get("cdf_rate") or rates[len(rates) // 2]
    fig, (attain, ttft, cdf) = plt.subplots(1, 3, figsize=(15, 4.5))
    for name in setups:
        mine = sorted((r for r in runs if r["setup"] == name), key=lambda r: r["rate"])
        x = [r["rate"] for r in mine]
        attain.plot(x, [100 * r["attainment"] for r in mine], marker="o", label=name)
        (line,) = ttft.plot(x, [r["ttft_ms"]["p50"] for r in mine], marker="o", label=f"{name} p50")
        ttft.plot(x, [r["ttft_ms"]["p90"] for r in mine], marker="x", linestyle="--",
                  color=line.get_color(), label=f"{name} p90")  # fmt: skip
        at_rate = [r for r in mine if r["rate"] == cdf_rate]
        values = sorted(tpot_values(at_rate[0])) if at_rate else []
        if values:
            cdf.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    config = report["config"]
    target = 100 * config["attainment_target"]
    attain.axhline(target, color="grey", linestyle=":", label=f"{target:.0f} % target")
    attain.set(xlabel="request rate (req/s)", ylabel="requests meeting both SLOs (%)",
               title=f"SLO attainment (TTFT <= {config['ttft_slo_ms']:g} ms, "
               f"TPOT <= {config['tpot_slo_ms']:g} ms)", ylim=(0, 105))  # fmt: skip
    ttft.axhline(config["ttft_slo_ms"], color="grey", linestyle=":", label="TTFT SLO")
    ttft.set(xlabel="request rate (req/s)", ylabel="TTFT (ms)", title="TTFT", yscale="log")
    cdf.axvline(config["tpot_slo_ms"], color="grey", linestyle=":", label="TPOT SLO")
    cdf.set(xlabel="TPOT (ms)", ylabel="share of requests", title=f"TPOT CDF at {cdf_rate:g} req/s")
    for axis in (attain, ttft, cdf):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


# -- command line ---------------------------------------------------------------------------


def rate_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates like 0.5,1,2, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite rates > 0, got {text!r}")
    return sorted(set(values))


def core_pair(text: str) -> tuple[int, int]:
    """argparse type of ``--cores``: two distinct core numbers, e.g. ``0,1``."""
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two cores like 0,1, got {text!r}") from None
    if first == second or min(first, second) < 0:
        raise argparse.ArgumentTypeError(f"expected two distinct cores, got {text!r}")
    return first, second


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _share(text: str) -> float:
    value = _positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text!r}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """The options of a benchmark that starts vLLM engines on two cores behind pdserve
    proxies and writes a JSON report: the model, the engines, timeouts, logs and output."""
    from deploy.tiny_model import add_model_arguments

    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--served-model-name", default="pdserve-bench")
    parser.add_argument("--cores", type=core_pair, default=(0, 1), help="two cores (default 0,1)")
    parser.add_argument("--request-timeout", type=_positive, default=300.0, help="seconds")
    parser.add_argument(
        "--startup-timeout", type=_positive, default=600.0, help="seconds per engine start"
    )
    parser.add_argument("--kv-cache-gib", type=_positive_int, default=1)
    parser.add_argument("--block-size", type=_positive_int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep the engines', proxies' and vllm bench's logs here (default: a temporary "
        "directory, removed after a successful run)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help=f"JSON report (default {default_out}); the plot goes next to it",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, DEFAULT_OUT)
    parser.add_argument(
        "--rates",
        type=rate_list,
        default=list(DEFAULT_RATES),
        help="request rates, req/s (default " + ",".join(f"{r:g}" for r in DEFAULT_RATES) + ")",
    )
    parser.add_argument(
        "--seconds-per-rate",
        type=_positive,
        default=60.0,
        help="requests per rate = rate x this, within the bounds below",
    )
    parser.add_argument("--min-prompts", type=_positive_int, default=20)
    parser.add_argument("--max-prompts", type=_positive_int, default=200)
    parser.add_argument("--ttft-slo-ms", type=_positive, default=DEFAULT_TTFT_SLO_MS)
    parser.add_argument("--tpot-slo-ms", type=_positive, default=DEFAULT_TPOT_SLO_MS)
    parser.add_argument(
        "--attainment",
        type=_share,
        default=gp.DEFAULT_ATTAINMENT,
        help="share of requests that must meet both SLOs (default 0.9)",
    )
    parser.add_argument(
        "--wide", action="store_true", help="also measure one aggregated engine on both cores"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: tiny model, one rate, a few short requests",
    )
    parser.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="default: the longest prompt plus the longest output, rounded up to a block",
    )
    parser.add_argument(
        "--profile-out",
        type=Path,
        default=None,
        help="also profile one engine (pdserve plan profile's defaults, second core) after "
        "the sweep, in the same run, and write the profile here (about 4 minutes more)",
    )
    add_workload_arguments(parser)


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: every stage once, in a few minutes (the suite's smoke run)."""
    if not args.quick:
        return
    args.preset = "tiny"
    args.rates = [2.0]
    args.min_prompts = args.max_prompts = 6
    args.max_prompt_tokens = min(args.max_prompt_tokens, 256)
    args.max_output_tokens = min(args.max_output_tokens, 16)
    args.shared_prefix_tokens = min(args.shared_prefix_tokens, 32)


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would only fail after a minute of engine start-up."""
    from deploy.cli import CliError

    if args.min_prompts > args.max_prompts:
        raise CliError("--min-prompts must not exceed --max-prompts")
    if args.model is not None:
        config_file = args.model / "config.json"
        if not config_file.is_file():
            raise CliError(f"--model: {args.model} is not a HF model directory (no config.json)")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"--model: cannot read {config_file}: {exc}") from None
        limit = config.get("max_position_embeddings")
        needed = args.max_prompt_tokens + args.max_output_tokens
        if isinstance(limit, int) and needed > limit:
            raise CliError(
                f"--max-prompt-tokens {args.max_prompt_tokens} + --max-output-tokens "
                f"{args.max_output_tokens} exceeds the model's max_position_embeddings {limit}"
            )
    if args.max_model_len is not None and args.max_model_len < (
        args.max_prompt_tokens + args.max_output_tokens
    ):
        raise CliError("--max-model-len must hold the longest prompt plus the longest output")
    if args.workload_jsonl is not None and not args.workload_jsonl.is_file():
        raise CliError(f"--workload-jsonl: {args.workload_jsonl} is not a file")
    check_cores_and_linux(args.cores)


def check_cores_and_linux(wanted: Sequence[int]) -> None:
    """CliError unless every core of ``wanted`` is this process's and /proc exists."""
    from deploy.cli import CliError

    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    missing = [core for core in wanted if cores and core not in cores]
    if missing:
        raise CliError(f"--cores: core(s) {missing} are not available to this process")
    if not Path("/proc").is_dir():
        raise CliError("this benchmark manages process groups and reads /proc: it needs Linux")


def run_in_workdir(
    args: argparse.Namespace,
    name: str,
    benchmark: Callable[[argparse.Namespace, Path], dict[str, Any]],
    errors: tuple[type[Exception], ...],
) -> dict[str, Any]:
    """``benchmark(args, workdir)`` in a fresh work directory (under ``--log-dir`` and kept
    when given; else removed unless the run failed), its report written to ``--out`` with
    its plot; an error of ``errors`` becomes a one-line CliError naming the logs."""
    from deploy.cli import CliError

    keep_logs = args.log_dir is not None
    if keep_logs:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.log_dir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix=f"pdserve-bench-{name}-"))
    try:
        report = benchmark(args, workdir)
    except errors as exc:
        keep_logs = True
        raise CliError(f"{exc} (logs kept in {workdir})") from None
    except BaseException:
        keep_logs = True
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run(args: argparse.Namespace) -> int:
    apply_quick(args)
    check_args(args)
    report = run_in_workdir(args, "pd", run_benchmark, (BenchError, WorkloadError))
    png = args.out.with_suffix(".png")
    drew = plot(report, png)
    print(format_table(report))
    print(f"\nwrote {args.out}" + (f" and {png}" if drew else ""))
    status = 0
    inexact = [r for r in report["runs"] if not r["lengths_exact"]]
    if inexact:
        print(f"{len(inexact)} run(s) sent prompts of other lengths than drawn", file=sys.stderr)
        status = 1
    failed = [r for r in report["runs"] if r["failed"]]
    if failed:
        print(f"{len(failed)} run(s) had failed requests", file=sys.stderr)
        status = 1
    if any(r["pd_path_ok"] is False for r in report["runs"]):
        print("the PD runs did not all go through prefill + KV transfer", file=sys.stderr)
        status = 1
    if report["leftover_processes"]:
        print(f"processes outlived their stop: {report['leftover_processes']}", file=sys.stderr)
        status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
