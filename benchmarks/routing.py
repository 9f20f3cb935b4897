"""Cache-aware routing on a shared-prefix workload: ``kv_cache`` vs ``prefix_affinity`` vs
``least_load``, disaggregated and aggregated, on the same cores.

Setups, engines started once with prefix caching on and KV cache events published:

* **2P2D**: two prefill and two decode engines behind a pdserve proxy (prefill-0 and
  decode-0 on the first core of ``--cores``, prefill-1 and decode-1 on the second);
* **2agg**: two aggregated engines behind a pdserve proxy, one per core (only the decode
  pool exists, so only ``decode_policy`` applies).

Each setup runs every routing variant (the proxy's ``prefill_policy`` and ``decode_policy``
both set to the variant's policy): the proxy is restarted with the variant's config (cheap),
the engines stay up, and their prefix caches are emptied (``POST /reset_prefix_cache``, which
vLLM serves with ``VLLM_SERVER_DEV_MODE=1`` in the engine's environment) so every variant
starts cold on the same prompts. ``kv_cache+bypass`` (the proxy's ``prefill_bypass``) is one
more variant for 2P2D where the proxy has that option.

The load is vLLM's own serving benchmark (``vllm bench serve``, :mod:`benchmarks.vllm_bench`)
with its ``prefix_repetition`` dataset: ``--num-prefixes`` random prefixes, each shared by
``--num-prompts / --num-prefixes`` prompts that differ in their suffix, shuffled, at a
Poisson ``--rate``. Every run's command is in the JSON.

Per setup and variant: TTFT p50/p90 (vLLM's), prompt tokens the engines computed and their
prefix-cache hit rate (the engines' own ``vllm:`` counters, deltas around the run), the
proxy's requests by path (``pdserve_requests_total``), and the proxy's CPU time per request
(``/proc/<pid>/stat``): ``kv_cache`` tokenizes every prompt and indexes the engines' KV
events, the other policies do neither.

By default one setup's engines are up at a time, its variants measured back to back on them:
six engines of the small preset at once (about 3 GB each) outgrow a 24 GB box, and the
comparison that matters here is between the variants on the same engines.
``--setups-together`` starts every engine once instead and lets the setups take turns as in
:mod:`benchmarks.pd_vs_aggregated` (the one measured runs, the other is stopped with SIGSTOP,
the first setup of each variant rotates).

    pdserve bench routing [--rate 5] [--num-prompts 144] [--num-prefixes 36] [--quick]
    python -m benchmarks.routing --help
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import sys
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.pd_vs_aggregated import (
    BenchError,
    EngineRole,
    EngineSettings,
    ProcessSet,
    Setup,
    Started,
    _http,
    _positive,
    _positive_int,
    add_engine_arguments,
    check_cores_and_linux,
    counter_delta,
    metric_sum,
    run_in_workdir,
    signals_as_interrupt,
    start_engine,
    start_proxy,
    turns,
    wait_all_healthy,
    wait_answering,
    wait_engine,
    wait_serving,
)
from benchmarks.vllm_bench import ServeRun, VllmBenchError, run_serve
from deploy.worker_launch import advertised_kv_events, signal_group

DEFAULT_OUT = Path("benchmarks/results/routing/routing.json")
SETUP_NAMES = ("2P2D", "2agg")
# Sized for the small preset on two cores: 36 prefixes x 4 prompts, so a policy that spreads a
# prefix over both engines pays a second cold prefill for most of them. At 1.5 req/s a 2-core
# x86 box kept TTFT near its idle value (p50 about 90 ms in 2P2D) whatever the policy; at 5 req/s
# requests queue (p50 150-170 ms) and the whole run took under 6 minutes.
DEFAULT_RATE = 5.0
DEFAULT_NUM_PROMPTS = 144
DEFAULT_NUM_PREFIXES = 36
DEFAULT_PREFIX_LEN = 768
DEFAULT_SUFFIX_LEN = 128
DEFAULT_OUTPUT_LEN = 32
# Requests by the proxy's path label; cache_bypass exists where the proxy has prefill_bypass.
PATHS = ("disaggregated", "aggregated", "fallback", "prefill_fallback", "cache_bypass")
# The engines' counters read around each run: (metric, labels).
ENGINE_COUNTERS: dict[str, tuple[str, dict[str, str] | None]] = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", None),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", None),
    "prompt_tokens": ("vllm:prompt_tokens_total", None),
    # Prompt tokens the engine ran through the model itself: neither a local prefix-cache hit
    # nor pulled from a prefill engine (vLLM's PromptTokenStats).
    "computed_tokens": ("vllm:prompt_tokens_by_source_total", {"source": "local_compute"}),
}


@dataclass(frozen=True)
class Variant:
    """One routing configuration of the proxy, compared with the others on every setup."""

    name: str
    policy: str  # prefill_policy and decode_policy
    # The policy routes on the engines' prefix caches: the proxy tokenizes every prompt and
    # subscribes to the engines' KV events.
    tokenizes: bool
    bypass: bool = False  # prefill_bypass: skip the prefill leg on a decode cache hit
    pd_only: bool = False  # meaningless without a prefill pool
    # The policy's options, where a variant is the policy with other weights.
    options: tuple[tuple[str, float], ...] = ()

    @property
    def available(self) -> bool:
        """Whether this proxy has the config fields the variant needs."""
        if not self.bypass:
            return True
        from proxy.config import ProxyConfig

        return "prefill_bypass" in ProxyConfig.model_fields


# Adding a variant is one line here.
VARIANTS: tuple[Variant, ...] = (
    Variant("kv_cache", "kv_cache", tokenizes=True),
    Variant("prefix_affinity", "prefix_affinity", tokenizes=False),
    Variant("least_load", "least_load", tokenizes=False),
    Variant("kv_cache+bypass", "kv_cache", tokenizes=True, bypass=True, pd_only=True),
    # The policy's default load_weight before it was tuned on this benchmark.
    Variant("kv_cache-lw1", "kv_cache", tokenizes=True, options=(("load_weight", 1.0),)),
)


def build_setups(cores: tuple[int, int]) -> list[Setup]:
    first, second = (str(core) for core in cores)
    return [
        Setup(
            "2P2D",
            f"prefill-0 + decode-0 on core {first}, prefill-1 + decode-1 on core {second}, "
            "behind the proxy",
            (
                EngineRole("prefill-0", "prefill", first),
                EngineRole("decode-0", "decode", first),
                EngineRole("prefill-1", "prefill", second),
                EngineRole("decode-1", "decode", second),
            ),
        ),
        Setup(
            "2agg",
            f"2 aggregated engines (cores {first} and {second}) behind the proxy",
            (
                EngineRole("aggregated-0", "aggregated", first),
                EngineRole("aggregated-1", "aggregated", second),
            ),
        ),
    ]


def runs_of(setups: Sequence[Setup], variants: Sequence[Variant]) -> list[tuple[Setup, Variant]]:
    """Every (setup, variant) pair measured, variants in table order."""
    return [
        (setup, variant)
        for variant in variants
        for setup in setups
        if setup.prefill or not variant.pd_only
    ]


# -- the proxy's config ---------------------------------------------------------------------


def proxy_config(
    setup: Setup,
    engines: Sequence[Started],
    variant: Variant,
    model: Path,
    bypass_max_uncached_tokens: int,
) -> dict[str, Any]:
    """The ``proxy:`` section the proxy of ``setup`` gets for ``variant``."""
    pools: dict[str, list[dict[str, Any]]] = {"prefill": [], "decode": []}
    for role, engine in zip(setup.engines, engines, strict=True):
        entry: dict[str, Any] = {"url": engine.url}
        # Only the cache-aware variants subscribe: the others run as users configure them,
        # so their proxy CPU is that of routing without the KV index.
        events = advertised_kv_events(engine.spec) if engine.spec is not None else None
        if variant.tokenizes and events is not None:
            entry["kv_events"] = events.to_json()
        pools["prefill" if role.role == "prefill" else "decode"].append(entry)
    config: dict[str, Any] = {
        # No admin listener, so no fixed port to collide on.
        "admin": {"port": None},
        "prefill": pools["prefill"],
        "decode": pools["decode"],
        "decode_policy": {"name": variant.policy, "options": dict(variant.options)},
    }
    if pools["prefill"]:
        config["prefill_policy"] = {"name": variant.policy, "options": dict(variant.options)}
    if variant.tokenizes:
        config["routing_tokenizer"] = {"model_dir": str(model)}
    if variant.bypass:
        config["prefill_bypass"] = {"max_uncached_tokens": bypass_max_uncached_tokens}
    return config


def proxy_config_text(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump({"proxy": config}, sort_keys=False)


# -- counters -------------------------------------------------------------------------------


def read_engine_counters(engine: Started) -> dict[str, float]:
    return {
        key: metric_sum(engine.url, name, labels) or 0.0
        for key, (name, labels) in ENGINE_COUNTERS.items()
    }


def read_proxy_counters(proxy: Started) -> dict[str, float]:
    counters = {
        path: metric_sum(proxy.url, "pdserve_requests_total", {"path": path}) or 0.0
        for path in PATHS
    }
    counters["tokenize_s"] = metric_sum(proxy.url, "pdserve_routing_tokenize_seconds_sum") or 0.0
    # Proof that the KV index followed the engines during the run.
    counters["kv_event_batches"] = (
        metric_sum(proxy.url, "pdserve_kv_event_batches_applied_total") or 0.0
    )
    return counters


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far, threads included."""
    # The command name, in parentheses, may hold spaces; the fields after it are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def summarise_counters(
    setup: Setup,
    engines: dict[str, dict[str, float]],
    proxy: dict[str, float],
    requests: int,
    proxy_cpu_s: float,
    input_tokens: float,
) -> dict[str, Any]:
    """One run's figures from the counters' deltas: ``engines`` by engine name, ``proxy``,
    and the prompt tokens sent (``input_tokens``, vLLM bench's count).

    ``hit_rate`` is the share of the prompt tokens sent that no engine computed: one figure
    for every setup, wherever a request was prefilled (a prefill engine, or a decode engine
    serving it whole under prefill_bypass). ``hit_rate_by_pool`` is vLLM's own (prefix-cache
    hits over queries) per pool; a PD decode engine's counts cover prompts it pulled too.
    """
    pools: dict[str, list[str]] = {}
    for role in setup.engines:
        pools.setdefault("decode" if role.role == "aggregated" else role.role, []).append(role.name)
    prompt_pool = "prefill" if "prefill" in pools else "decode"
    computed = sum(e["computed_tokens"] for e in engines.values())

    def pool_sum(pool: str, key: str) -> float:
        return sum(engines[name][key] for name in pools.get(pool, []))

    def hit_rate(pool: str) -> float | None:
        queries = pool_sum(pool, "prefix_cache_queries")
        return pool_sum(pool, "prefix_cache_hits") / queries if queries else None

    per_request = max(requests, 1)
    return {
        "hit_rate": max(0.0, 1.0 - computed / input_tokens) if input_tokens else None,
        "hit_rate_by_pool": {pool: hit_rate(pool) for pool in pools},
        "prefill_tokens_computed": computed,
        "input_tokens": input_tokens,
        "uncached_prompt_tokens": pool_sum(prompt_pool, "prefix_cache_queries")
        - pool_sum(prompt_pool, "prefix_cache_hits"),
        "prompt_tokens": pool_sum(prompt_pool, "prompt_tokens"),
        "paths": {path: proxy[path] for path in PATHS if proxy.get(path)},
        "proxy_cpu_us_per_request": proxy_cpu_s * 1e6 / per_request,
        "tokenize_ms_per_request": proxy.get("tokenize_s", 0.0) * 1e3 / per_request,
        "kv_event_batches": proxy.get("kv_event_batches", 0.0),
    }


# -- running --------------------------------------------------------------------------------


@dataclass
class RunningEngines:
    setup: Setup
    engines: list[Started]


@dataclass
class RoutingRun:
    setup: str
    variant: str
    policy: str
    rate: float
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    ttft_ms: dict[str, float]  # p50, p90, p99 (vLLM's)
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]
    hit_rate: float | None
    hit_rate_by_pool: dict[str, float | None]
    prefill_tokens_computed: float
    input_tokens: float  # prompt tokens sent (vllm bench serve's total_input_tokens)
    uncached_prompt_tokens: float
    prompt_tokens: float
    paths: dict[str, float]
    proxy_cpu_us_per_request: float
    tokenize_ms_per_request: float
    kv_event_batches: float
    command: str
    proxy_config: dict[str, Any]
    engine_counters: dict[str, dict[str, float]] = field(default_factory=dict)


def dataset_argv(args: argparse.Namespace) -> tuple[str, ...]:
    """``vllm bench serve``'s options for the shared-prefix workload."""
    return (
        "--dataset-name", "prefix_repetition",
        "--prefix-repetition-prefix-len", str(args.prefix_len),
        "--prefix-repetition-suffix-len", str(args.suffix_len),
        "--prefix-repetition-num-prefixes", str(args.num_prefixes),
        "--prefix-repetition-output-len", str(args.output_len),
    )  # fmt: skip


def _probe(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.served_model_name, "prompt": "warm up", "max_tokens": 2}


def start_engines(
    setup: Setup, settings: EngineSettings, args: argparse.Namespace, processes: ProcessSet
) -> RunningEngines:
    print(f"{setup.name}: starting {setup.description} ...", file=sys.stderr, flush=True)
    engines = [
        start_engine(
            processes,
            role.role,
            role.core,
            settings,
            f"{setup.name}-{role.name}",
            prefix_caching=True,
            kv_events=True,
            # POST /reset_prefix_cache is a dev-mode endpoint.
            env={"VLLM_SERVER_DEV_MODE": "1"},
        )
        for role in setup.engines
    ]
    for engine in engines:
        wait_engine(engine, args.startup_timeout)
    for engine, role in zip(engines, setup.engines, strict=True):
        if role.role != "prefill":  # a prefill engine is checked through the proxy
            wait_serving(engine, _probe(args), args.startup_timeout)
    return RunningEngines(setup, engines)


def pause(running: RunningEngines) -> None:
    """Idle vLLM engines busy-poll: a setup not measured must not run at all."""
    for engine in running.engines:
        signal_group(engine.process.pid, signal.SIGSTOP)


def resume(running: RunningEngines, args: argparse.Namespace) -> None:
    for engine in running.engines:
        signal_group(engine.process.pid, signal.SIGCONT)
    for engine in running.engines:
        wait_answering(engine, args.startup_timeout, "did not answer once continued")


def reset_prefix_caches(engines: Sequence[Started], timeout_s: float) -> None:
    """Empty every engine's prefix cache, so each variant starts cold on the same prompts.

    vLLM refuses while blocks are held; a prefill engine holds a request's blocks until its
    decode has pulled them or their lease ran out, so the reset is retried until then."""
    for engine in engines:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                answer = json.loads(_http(engine.url + "/reset_prefix_cache", {}))
            except (OSError, ValueError) as exc:
                answer = {"error": str(exc)}
            if answer.get("success") is True:
                break
            engine.raise_if_exited()
            if time.monotonic() >= deadline:
                hint = (
                    " (is VLLM_SERVER_DEV_MODE=1 set?)"
                    if "HTTP Error 404" in str(answer.get("error"))
                    else ""
                )
                raise BenchError(
                    f"{engine.name}: prefix cache not reset within {timeout_s:g} s: "
                    f"{answer}{hint} (log: {engine.log_path})"
                )
            time.sleep(0.5)


# The proxy subscribes to new instances' KV events every kv_events.sync_interval_s (1 s) and
# reads their hash settings every 2 s. Neither shows on its /metrics while the caches are
# empty (the index lists an instance from its first event), so the wait is those periods.
KV_SUBSCRIBE_WAIT_S = 3.0


def settle(proxy: Started, before: dict[str, float], requests: int) -> dict[str, float]:
    """The proxy's counters once they count every request: it records a request after the
    client has its last byte."""
    deadline = time.monotonic() + 30.0
    while True:
        delta = counter_delta(before, read_proxy_counters(proxy))
        if sum(delta[path] for path in PATHS) >= requests or time.monotonic() >= deadline:
            return delta
        time.sleep(0.5)


def _percentiles(result: dict[str, Any], metric: str) -> dict[str, float]:
    return {f"p{q}": float(result.get(f"p{q}_{metric}_ms") or 0.0) for q in (50, 90, 99)}


def measure(
    running: RunningEngines,
    variant: Variant,
    settings: EngineSettings,
    args: argparse.Namespace,
    processes: ProcessSet,
) -> RoutingRun:
    setup, engines = running.setup, running.engines
    print(f"  {setup.name:<5} {variant.name} ...", file=sys.stderr, flush=True)
    reset_prefix_caches(engines, args.reset_timeout)
    config = proxy_config(setup, engines, variant, settings.model, args.bypass_max_uncached_tokens)
    name = f"proxy-{setup.name}-{variant.name.replace('+', '-')}"
    proxy = start_proxy(processes, (), (), name, proxy_config_text(config))
    try:
        wait_all_healthy(proxy, len(engines), args.startup_timeout)
        if variant.tokenizes:
            # Before it, kv_cache would route on load alone and be measured as something else.
            time.sleep(KV_SUBSCRIBE_WAIT_S)
        wait_serving(proxy, _probe(args), args.startup_timeout)
        run = ServeRun(
            base_url=proxy.url,
            served_model_name=args.served_model_name,
            tokenizer=settings.model,
            dataset_jsonl=None,
            dataset_argv=dataset_argv(args),
            num_prompts=args.num_prompts,
            request_rate=args.rate,
            seed=args.seed,
            result_dir=processes.log_dir / "vllm-bench",
            result_filename=f"{name}.json",
            # Not judged here; vLLM's goodput flags need some.
            ttft_slo_ms=args.ttft_slo_ms,
            tpot_slo_ms=args.tpot_slo_ms,
            label=f"{setup.name} {variant.name}",
        )
        engines_before = {e.name: read_engine_counters(e) for e in engines}
        proxy_before = read_proxy_counters(proxy)
        cpu_before = process_cpu_s(proxy.process.pid)
        timeout = args.request_timeout + 3 * args.num_prompts / args.rate + 120
        try:
            result = run_serve(run, processes.log_dir / "vllm-bench.log", timeout)
        except VllmBenchError as exc:
            raise BenchError(str(exc)) from None
        proxy_delta = settle(proxy, proxy_before, args.num_prompts)
        cpu_s = process_cpu_s(proxy.process.pid) - cpu_before
        engine_deltas = {
            e.name: counter_delta(engines_before[e.name], read_engine_counters(e)) for e in engines
        }
        for started in (*engines, proxy):
            started.raise_if_exited()
    finally:
        processes.stop(proxy)
    short = {
        role.name: engine_deltas[e.name] for role, e in zip(setup.engines, engines, strict=True)
    }
    input_tokens = float(result.get("total_input_tokens") or 0.0)
    figures = summarise_counters(setup, short, proxy_delta, args.num_prompts, cpu_s, input_tokens)
    return RoutingRun(
        setup=setup.name,
        variant=variant.name,
        policy=variant.policy,
        rate=args.rate,
        num_prompts=args.num_prompts,
        completed=int(result.get("completed", 0)),
        failed=int(result.get("failed", 0)),
        duration_s=float(result.get("duration", 0.0)),
        request_throughput=float(result.get("request_throughput", 0.0)),
        ttft_ms=_percentiles(result, "ttft"),
        tpot_ms=_percentiles(result, "tpot"),
        e2e_ms=_percentiles(result, "e2el"),
        command=run.command(),
        proxy_config=config,
        engine_counters=short,
        **figures,
    )


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    processes = ProcessSet(workdir)
    setups = build_setups(args.cores)
    variants = [v for v in VARIANTS if v.name in args.variants]
    results: list[RoutingRun] = []
    load: dict[str, Any] = {"before": os.getloadavg()}
    startup: dict[str, float | None] = {}
    started_at = time.monotonic()
    try:
        with signals_as_interrupt():
            model = args.model
            if model is None:
                from deploy.tiny_model import PRESETS, make_tiny_model

                model = make_tiny_model(workdir / f"{args.preset}-model", PRESETS[args.preset])
            settings = engine_settings(args, model)
            if args.setups_together:
                running: list[RunningEngines] = []
                for setup in setups:
                    running.append(start_engines(setup, settings, args, processes))
                    startup.update({e.name: e.ready_s for e in running[-1].engines})
                    pause(running[-1])
                load["sweep_start"] = os.getloadavg()
                for index, variant in enumerate(variants):
                    for turn in turns(running, index):
                        if variant.pd_only and not turn.setup.prefill:
                            continue
                        resume(turn, args)
                        results.append(measure(turn, variant, settings, args, processes))
                        pause(turn)
            else:
                # Six engines of the small preset outgrow 24 GB of memory: one setup's engines
                # at a time, its variants back to back on the same engines.
                for setup in setups:
                    one = start_engines(setup, settings, args, processes)
                    startup.update({e.name: e.ready_s for e in one.engines})
                    for variant in variants:
                        if setup.prefill or not variant.pd_only:
                            results.append(measure(one, variant, settings, args, processes))
                    for engine in one.engines:
                        processes.stop(engine)
            load["after"] = os.getloadavg()
    finally:
        processes.stop_all()
    order = {name: i for i, name in enumerate(SETUP_NAMES)}
    by_variant = {v.name: i for i, v in enumerate(VARIANTS)}
    results.sort(key=lambda r: (order[r.setup], by_variant[r.variant]))
    return {
        "benchmark": "routing",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(time.monotonic() - started_at, 1),
        "indicative": load["before"][0] > 1.0,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": load,
        },
        "config": {
            "model": f"generated {args.preset} preset" if args.model is None else str(args.model),
            "setups": {setup.name: setup.description for setup in setups},
            "variants": [asdict(v) for v in variants],
            "skipped_variants": [v.name for v in VARIANTS if v.name not in args.variants],
            "rate": args.rate,
            "arrivals": "Poisson (vllm bench serve --burstiness 1)",
            "workload": {
                "dataset": "prefix_repetition (vllm bench serve)",
                "num_prompts": args.num_prompts,
                "num_prefixes": args.num_prefixes,
                "prefix_len": args.prefix_len,
                "suffix_len": args.suffix_len,
                "output_len": args.output_len,
                "seed": args.seed,
            },
            "prefix_caching": True,
            "cache_between_variants": "emptied (POST /reset_prefix_cache on every engine)",
            "block_size": settings.block_size,
            "max_model_len": settings.max_model_len,
            "kv_cache_gib": settings.kv_cache_gib,
            "bypass_max_uncached_tokens": args.bypass_max_uncached_tokens,
            "schedule": "variant by variant, setups taking turns, the other paused (SIGSTOP)"
            if args.setups_together
            else "setup by setup (one setup's engines up at a time), variants in table order",
            "proxy_and_load_generator_cores": "unbound",
        },
        "startup_s": startup,
        "leftover_processes": processes.leftovers,
        "runs": [asdict(r) for r in results],
    }


def engine_settings(args: argparse.Namespace, model: Path) -> EngineSettings:
    longest = args.prefix_len + args.suffix_len + args.output_len
    block = args.block_size
    return EngineSettings(
        model=model,
        served_model_name=args.served_model_name,
        block_size=block,
        dtype=args.dtype,
        # Room for a prompt that re-tokenizes a few tokens longer than drawn.
        max_model_len=-(-(longest + 64) // block) * block,
        kv_cache_gib=args.kv_cache_gib,
        secret=secrets.token_hex(16),
    )


# -- report ---------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def format_table(report: dict[str, Any]) -> str:
    config = report["config"]
    workload = config["workload"]
    header = (
        f"{'setup':<5} {'policy':<16} {'reqs':>4} {'fail':>4} {'TTFT p50':>8} {'p90':>7} "
        f"{'computed':>9} {'hit':>4} {'proxy us/req':>12} {'tok ms/req':>10}  paths"
    )
    lines = [
        f"model: {config['model']}; {workload['num_prompts']} requests at {config['rate']:g} "
        f"req/s (Poisson), {workload['num_prefixes']} shared prefixes of "
        f"{workload['prefix_len']} tokens + {workload['suffix_len']}-token suffixes, "
        f"{workload['output_len']} output tokens",
        "TTFT in ms (vllm bench serve); computed: prompt tokens the engines prefilled; hit: "
        "share of the prompt tokens sent served from a prefix cache; proxy: its CPU time per "
        "request; tok: its tokenizing time per request",
        header,
        "-" * len(header),
    ]
    for run in report["runs"]:
        paths = ", ".join(f"{path} {count:.0f}" for path, count in run["paths"].items())
        lines.append(
            f"{run['setup']:<5} {run['variant']:<16} {run['completed']:>4} {run['failed']:>4} "
            f"{run['ttft_ms']['p50']:>8.0f} {run['ttft_ms']['p90']:>7.0f} "
            f"{run['prefill_tokens_computed']:>9.0f} {_rate(run['hit_rate']):>4} "
            f"{run['proxy_cpu_us_per_request']:>12.0f} {run['tokenize_ms_per_request']:>10.2f}  "
            f"{paths or '-'}"
        )
    skipped = config.get("skipped_variants") or []
    if skipped:
        lines.append(f"not measured: {', '.join(skipped)}")
    if report.get("indicative"):
        lines.append(
            "note: other work was running on the box before the benchmark started; "
            "the figures are indicative only"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], png: Path) -> bool:
    """TTFT p50/p90, hit rate and proxy CPU per setup and variant; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = report["runs"]
    labels = [f"{r['setup']} {r['variant']}" for r in runs]
    x = list(range(len(runs)))
    fig, (ttft, hits, cpu) = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.4
    ttft.bar([i - width / 2 for i in x], [r["ttft_ms"]["p50"] for r in runs], width, label="p50")
    ttft.bar([i + width / 2 for i in x], [r["ttft_ms"]["p90"] for r in runs], width, label="p90")
    ttft.set(ylabel="TTFT (ms)", title="TTFT (vllm bench serve)")
    ttft.legend(fontsize=8)
    hits.bar(x, [100 * (r["hit_rate"] or 0.0) for r in runs], color="tab:green")
    hits.set(ylabel="prefix-cache hit rate (%)", title="prompt tokens served from a prefix cache",
             ylim=(0, 100))  # fmt: skip
    cpu.bar(x, [r["proxy_cpu_us_per_request"] for r in runs], color="tab:purple")
    cpu.set(ylabel="proxy CPU per request (us)", title="proxy CPU (kv_cache tokenizes)")
    for axis in (ttft, hits, cpu):
        axis.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
        axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


# -- command line ---------------------------------------------------------------------------


def variant_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = [v.name for v in VARIANTS]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected variants among {', '.join(known)}, got {text!r}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, DEFAULT_OUT)
    parser.add_argument("--rate", type=_positive, default=DEFAULT_RATE, help="req/s, Poisson")
    parser.add_argument("--num-prompts", type=_positive_int, default=DEFAULT_NUM_PROMPTS)
    parser.add_argument(
        "--num-prefixes",
        type=_positive_int,
        default=DEFAULT_NUM_PREFIXES,
        help="distinct shared prefixes; --num-prompts must be a multiple",
    )
    parser.add_argument("--prefix-len", type=_positive_int, default=DEFAULT_PREFIX_LEN)
    parser.add_argument("--suffix-len", type=_positive_int, default=DEFAULT_SUFFIX_LEN)
    parser.add_argument("--output-len", type=_positive_int, default=DEFAULT_OUTPUT_LEN)
    parser.add_argument("--seed", type=int, default=0, help="the dataset's prompts")
    parser.add_argument(
        "--variants",
        type=variant_list,
        default=None,
        help="comma-separated, default every variant this proxy supports: "
        + ", ".join(v.name for v in VARIANTS),
    )
    parser.add_argument(
        "--bypass-max-uncached-tokens",
        type=int,
        default=None,
        help="prefill_bypass.max_uncached_tokens of kv_cache+bypass (default: the suffix "
        "length plus one block, so a decode caching the prefix serves the request whole)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny model, a few short requests"
    )
    parser.add_argument(
        "--setups-together",
        action="store_true",
        help="start every setup's engines once and let the setups take turns, the other "
        "paused, variant by variant (six engines at once: about 20 GB with the small preset); "
        "default: one setup's engines at a time",
    )
    parser.add_argument("--ttft-slo-ms", type=_positive, default=2000.0, help=argparse.SUPPRESS)
    parser.add_argument("--tpot-slo-ms", type=_positive, default=50.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--reset-timeout",
        type=_positive,
        default=60.0,
        help="seconds to wait for an engine to empty its prefix cache",
    )


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: every setup and variant once, in a few minutes (the suite's smoke run)."""
    if not args.quick:
        return
    args.preset = "tiny"
    args.rate = 2.0
    args.num_prompts, args.num_prefixes = 6, 2
    args.prefix_len, args.suffix_len, args.output_len = 256, 32, 8
    if args.variants is None:  # the policies as shipped; re-weighted variants are for tuning
        args.variants = [v.name for v in VARIANTS if v.available and not v.options]


def apply_defaults(args: argparse.Namespace) -> None:
    if args.variants is None:
        args.variants = [v.name for v in VARIANTS if v.available]
    if args.bypass_max_uncached_tokens is None:
        args.bypass_max_uncached_tokens = args.suffix_len + args.block_size


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would only fail after minutes of engine start-up."""
    from deploy.cli import CliError

    if args.num_prompts % args.num_prefixes:
        # vLLM's prefix_repetition dataset draws num_prompts // num_prefixes per prefix.
        raise CliError(
            f"--num-prompts {args.num_prompts} must be a multiple of --num-prefixes "
            f"{args.num_prefixes}"
        )
    unavailable = [v.name for v in VARIANTS if v.name in args.variants and not v.available]
    if unavailable:
        raise CliError(f"--variants: this proxy has no prefill_bypass for {unavailable}")
    if args.bypass_max_uncached_tokens < 0:
        raise CliError("--bypass-max-uncached-tokens must be >= 0")
    if args.model is not None:
        config_file = args.model / "config.json"
        if not config_file.is_file():
            raise CliError(f"--model: {args.model} is not a HF model directory (no config.json)")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"--model: cannot read {config_file}: {exc}") from None
        limit = config.get("max_position_embeddings")
        needed = args.prefix_len + args.suffix_len + args.output_len
        if isinstance(limit, int) and needed > limit:
            raise CliError(
                f"--prefix-len + --suffix-len + --output-len ({needed}) exceeds the model's "
                f"max_position_embeddings {limit}"
            )
    check_cores_and_linux(args.cores)


def run(args: argparse.Namespace) -> int:
    apply_quick(args)
    apply_defaults(args)
    check_args(args)
    report = run_in_workdir(args, "routing", run_benchmark, (BenchError, urllib.error.URLError))
    png = args.out.with_suffix(".png")
    drew = plot(report, png)
    print(format_table(report))
    print(f"\nwrote {args.out}" + (f" and {png}" if drew else ""))
    status = 0
    failed = [r for r in report["runs"] if r["failed"] or r["completed"] < r["num_prompts"]]
    if failed:
        print(f"{len(failed)} run(s) had failed requests", file=sys.stderr)
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
