"""PD disaggregation against one aggregated engine: the same streamed load through both.

Two setups of real vLLM CPU engines on the same model (the generated tiny model, or
``--model DIR``):

* **pd**: one prefill worker (KV producer, ``--prefill-core``) and one decode worker
  (KV consumer, ``--decode-core``) behind the real pdserve proxy (``pdserve proxy``);
* **aggregated**: one plain vLLM engine (no connector, ``--aggregated-core``).

For every prompt length and concurrency, :mod:`benchmarks.loadgen` runs the same
closed-loop streamed ``/v1/completions`` load (token-id prompts of exactly that length,
``max_tokens`` output tokens with ``ignore_eos``) against each setup, and the table shows
TTFT p50/p99, inter-token latency p50/p99, E2E p50 and request and token rates side by side.

Fairness: prefix caching is off on all engines, because the load generator repeats one
prompt per point and a cache hit would turn prefill (and the KV transfer) into a no-op.
By default the aggregated phase runs after the PD engines are stopped, so it has the box to
itself (``--aggregated-phase idle`` keeps all three engines up and runs each phase with the
other setup idle). With the default cores PD runs on two cores and the aggregated engine
on one: the figures compare engine-for-core, not equal hardware; give the aggregated
engine more with ``--aggregated-core 0-1`` where that is allowed.

After the PD phase the proxy's ``pdserve_requests_total`` and the workers'
``pdserve_kv_transfer_bytes_total`` are read back, so the report says whether the PD runs
really went through the prefill leg and a KV transfer rather than a fallback.

Everything the benchmark starts runs in its own process group and is stopped on exit, on
errors, on Ctrl-C and on SIGTERM/SIGHUP; the report lists any process group that outlived
its stop (there should be none).

    pdserve bench pd [--prompt-tokens 64,512,1024] [--concurrency 1,4] [--duration 20]
    python -m benchmarks.pd_vs_aggregated --help
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from benchmarks.loadgen import LoadResult, LoadSpec, run_load
from deploy.worker_launch import (
    WorkerConfigError,
    WorkerSpec,
    free_port,
    group_alive,
    start_worker,
    stop_process_group,
    stop_worker,
    wait_until_ready,
)

DEFAULT_OUT = Path("benchmarks/results/pd_vs_aggregated.json")
SETUPS = ("pd", "aggregated")
AggregatedPhase = Literal["stopped", "idle"]

# Prompts are cut from this text, repeated, so they are ordinary tokens of the tokenizer.
_PROMPT_TEXT = (
    "Prefill reads the whole prompt at once and writes the key and value cache for every "
    "token; decode then produces one token at a time and reads that cache again and again. "
    "The quick brown fox jumps over the lazy dog, and the weather today is sunny with a "
    "light breeze from the west. Explain how a computer network sends data from one machine "
    "to another, step by step, in simple words. "
)

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


def start_engine(processes: ProcessSet, role: str, core: str, settings: EngineSettings) -> Started:
    spec = WorkerSpec(
        role=role,  # type: ignore[arg-type]  # one of the three roles, checked by validate
        model=settings.model,
        api_port=free_port(),
        kv_port=free_port() if role == "prefill" else None,
        cpu_core=core,
        kv_cache_gib=settings.kv_cache_gib,
        secret=settings.secret,
        served_model_name=settings.served_model_name,
        block_size=settings.block_size,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        enable_prefix_caching=False,
    )
    log_path = processes.log_dir / f"{role}.log"
    try:
        process = start_worker(spec, log_path=log_path)
    except WorkerConfigError as exc:
        raise BenchError(f"{role} engine: {exc}") from None
    return processes.add(
        Started(role, spec.url, process, log_path, stopper=lambda p: stop_worker(p, grace_s=20.0))
    )


def wait_engine(started: Started, timeout_s: float) -> None:
    try:
        wait_until_ready(started.url, timeout_s, proc=started.process, log_path=started.log_path)
    except (RuntimeError, TimeoutError) as exc:
        first_line = str(exc).splitlines()[0]
        raise BenchError(f"{started.name} engine did not start: {first_line}") from None
    started.ready_s = time.monotonic() - started.started_at


def start_proxy(processes: ProcessSet, prefill: Started, decode: Started) -> Started:
    port = free_port()
    config = processes.log_dir / "proxy.yaml"
    config.write_text(_PROXY_CONFIG)
    argv = [sys.executable, "-m", "deploy.cli", "proxy", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    argv += ["--prefill", prefill.url, "--decode", decode.url]
    log_path = processes.log_dir / "proxy.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
    return processes.add(Started("proxy", f"http://127.0.0.1:{port}", process, log_path))


def wait_serving(started: Started, probe: dict[str, Any], timeout_s: float) -> None:
    """Until one full completion goes through ``started`` (for the proxy: P then D)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise BenchError(
                f"{started.name} exited with status {started.process.returncode} "
                f"(log: {started.log_path})"
            )
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


# -- prompts --------------------------------------------------------------------------------


def prompt_token_ids(model: Path, lengths: Sequence[int]) -> dict[int, list[int]]:
    """Token-id prompts of exactly each length, cut from ordinary text of the model's tokenizer."""
    encode = _encoder(model)
    longest = max(lengths)
    text = _PROMPT_TEXT
    ids = encode(text)
    if not ids:
        raise BenchError(f"model: the tokenizer of {model} encodes the prompt text to nothing")
    while len(ids) < longest:
        text += _PROMPT_TEXT
        ids = encode(text)
    return {length: ids[:length] for length in lengths}


def _encoder(model: Path) -> Callable[[str], list[int]]:
    tokenizer_file = model / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(tokenizer_file))
        return lambda text: list(fast.encode(text, add_special_tokens=False).ids)
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(str(model))
    return lambda text: list(slow.encode(text, add_special_tokens=False))


# -- measuring ------------------------------------------------------------------------------


@dataclass
class PointResult:
    setup: str  # pd | aggregated
    prompt_tokens: int
    concurrency: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    requests_per_s: float
    # ignore_eos makes every successful request produce exactly max_tokens tokens.
    output_tokens_per_s: float
    # SSE content chunks per request: fewer than max_tokens when vLLM sends several tokens
    # in one chunk (it does when its output loop falls behind), so ITL is per chunk.
    chunks_per_request: float
    # Milliseconds; None when nothing succeeded.
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None  # gaps between content chunks
    itl_p99_ms: float | None
    # Time per output token after the first: (mean E2E - mean TTFT) / (max_tokens - 1),
    # exact for means, and immune to chunk coalescing.
    tpot_mean_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    load_average_1m: float  # at the start of the point: other work on the box
    status_counts: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)


def _ms(stats: Any, attr: str) -> float | None:
    return None if stats is None else float(getattr(stats, attr)) * 1000.0


def point_result(
    setup: str,
    prompt_tokens: int,
    concurrency: int,
    max_tokens: int,
    result: LoadResult,
    load_1m: float,
) -> PointResult:
    tpot = None
    if result.e2e is not None and result.ttft is not None and max_tokens > 1:
        tpot = (result.e2e.mean - result.ttft.mean) / (max_tokens - 1) * 1000.0
    return PointResult(
        setup=setup,
        prompt_tokens=prompt_tokens,
        concurrency=concurrency,
        requests=result.requests,
        ok=result.ok,
        errors=result.errors,
        wall_s=result.wall_s,
        requests_per_s=result.requests_per_s,
        output_tokens_per_s=result.ok * max_tokens / result.wall_s if result.wall_s > 0 else 0.0,
        chunks_per_request=result.content_events_per_request,
        ttft_p50_ms=_ms(result.ttft, "p50"),
        ttft_p99_ms=_ms(result.ttft, "p99"),
        itl_p50_ms=_ms(result.itl, "p50"),
        itl_p99_ms=_ms(result.itl, "p99"),
        tpot_mean_ms=tpot,
        e2e_p50_ms=_ms(result.e2e, "p50"),
        e2e_p99_ms=_ms(result.e2e, "p99"),
        load_average_1m=load_1m,
        status_counts=result.status_counts,
        error_samples=result.error_samples,
    )


def load_spec(url: str, prompt: list[int], concurrency: int, args: argparse.Namespace) -> LoadSpec:
    return LoadSpec(
        base_url=url,
        api="completions",
        stream=True,
        concurrency=concurrency,
        duration_s=args.duration,
        requests=args.max_requests,
        warmup_per_worker=args.warmup,
        model=args.served_model_name,
        max_tokens=args.max_tokens,
        # Token ids give the exact prompt length; ignore_eos the exact output length, so
        # both setups do the same work whatever the random weights would emit.
        extra_body={"prompt": prompt, "ignore_eos": True},
        timeout_s=args.request_timeout,
    )


def measure(
    setup: str,
    service: Started,
    watched: Sequence[Started],
    prompts: dict[int, list[int]],
    args: argparse.Namespace,
) -> list[PointResult]:
    import uvloop

    results = []
    for prompt_tokens in args.prompt_tokens:
        for concurrency in args.concurrency:
            print(
                f"  {setup:<10} prompt {prompt_tokens:>5}  c={concurrency:<3} "
                f"up to {args.duration:g}s ...",
                file=sys.stderr,
                flush=True,
            )
            load_1m = os.getloadavg()[0]
            spec = load_spec(service.url, prompts[prompt_tokens], concurrency, args)
            result = uvloop.run(run_load(spec))
            results.append(
                point_result(setup, prompt_tokens, concurrency, args.max_tokens, result, load_1m)
            )
            for process in watched:
                if process.process.poll() is not None:
                    raise BenchError(
                        f"{process.name} exited with status {process.process.returncode} "
                        f"during the {setup} runs (log: {process.log_path})"
                    )
    return results


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


def pd_check(proxy: Started, prefill: Started, decode: Started) -> dict[str, Any]:
    """Whether the PD runs went through the prefill leg and a KV transfer."""
    counts = {
        path: metric_sum(proxy.url, "pdserve_requests_total", {"path": path})
        for path in ("disaggregated", "aggregated", "fallback")
    }
    check: dict[str, Any] = {
        "proxy_requests_by_path": counts,
        "decode_kv_transfer_bytes": metric_sum(decode.url, "pdserve_kv_transfer_bytes_total"),
        "prefill_kv_transfer_bytes": metric_sum(prefill.url, "pdserve_kv_transfer_bytes_total"),
    }
    moved = max(check["decode_kv_transfer_bytes"] or 0.0, check["prefill_kv_transfer_bytes"] or 0.0)
    # "aggregated" (prompt under disagg_min_prompt_tokens) and "fallback" (no healthy prefill
    # instance) both skip the prefill leg: either means the PD figures are not pure PD.
    skipped = (counts["aggregated"] or 0.0) + (counts["fallback"] or 0.0)
    check["ok"] = bool(counts["disaggregated"]) and not skipped and moved > 0
    return check


# -- the benchmark --------------------------------------------------------------------------


def engine_settings(args: argparse.Namespace, model: Path) -> EngineSettings:
    longest = max(args.prompt_tokens) + args.max_tokens
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


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    processes = ProcessSet(workdir)
    results: list[PointResult] = []
    load: dict[str, Any] = {"before": os.getloadavg()}
    startup: dict[str, float | None] = {}
    check: dict[str, Any] = {}
    phase: AggregatedPhase = args.aggregated_phase
    try:
        with signals_as_interrupt():
            model = args.model
            if model is None:
                from deploy.tiny_model import make_tiny_model

                model = make_tiny_model(workdir / "tiny-model")
            settings = engine_settings(args, model)
            prompts = prompt_token_ids(model, args.prompt_tokens)
            probe = {
                "model": args.served_model_name,
                "prompt": prompts[min(args.prompt_tokens)],
                "max_tokens": 2,
            }
            print(f"starting engines (logs in {workdir}) ...", file=sys.stderr, flush=True)
            prefill = start_engine(processes, "prefill", args.prefill_core, settings)
            decode = start_engine(processes, "decode", args.decode_core, settings)
            aggregated = None
            if phase == "idle":
                aggregated = start_engine(processes, "aggregated", args.aggregated_core, settings)
            for engine in (prefill, decode):
                wait_engine(engine, args.startup_timeout)
            proxy = start_proxy(processes, prefill, decode)
            wait_serving(proxy, probe, args.startup_timeout)
            startup.update(prefill=prefill.ready_s, decode=decode.ready_s, proxy=proxy.ready_s)

            load["pd_start"] = os.getloadavg()
            results += measure("pd", proxy, (prefill, decode, proxy), prompts, args)
            check = pd_check(proxy, prefill, decode)
            if phase == "stopped":
                for started in (proxy, decode, prefill):
                    processes.stop(started)
                aggregated = start_engine(processes, "aggregated", args.aggregated_core, settings)
            assert aggregated is not None
            wait_engine(aggregated, args.startup_timeout)
            wait_serving(aggregated, probe, args.startup_timeout)
            startup["aggregated"] = aggregated.ready_s

            load["aggregated_start"] = os.getloadavg()
            results += measure("aggregated", aggregated, (aggregated,), prompts, args)
            load["after"] = os.getloadavg()
    finally:
        processes.stop_all()
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
            "model": "generated tiny model" if args.model is None else str(args.model),
            "served_model_name": args.served_model_name,
            "prompt_tokens": args.prompt_tokens,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "duration_s": args.duration,
            "max_requests": args.max_requests,
            "warmup_per_worker": args.warmup,
            "api": "completions",
            "stream": True,
            "ignore_eos": True,
            "prefix_caching": False,
            "block_size": settings.block_size,
            "dtype": settings.dtype,
            "max_model_len": settings.max_model_len,
            "kv_cache_gib": settings.kv_cache_gib,
            "cores": {
                "prefill": args.prefill_core,
                "decode": args.decode_core,
                "aggregated": args.aggregated_core,
                "proxy_and_load_generator": "unbound",
            },
            "aggregated_phase": phase_description(phase),
        },
        "startup_s": startup,
        "pd_check": check,
        "leftover_processes": processes.leftovers,
        "runs": [asdict(result) for result in results],
        "comparison": compare(results),
    }


def phase_description(phase: AggregatedPhase) -> str:
    if phase == "stopped":
        return "PD engines and proxy stopped: the aggregated engine ran alone"
    return "all engines up: each setup measured while the other one was idle"


def compare(results: Sequence[PointResult]) -> list[dict[str, Any]]:
    """PD over aggregated, per point: below 1 means PD is lower (latency) or lower (rate)."""
    by_key = {(r.setup, r.prompt_tokens, r.concurrency): r for r in results}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    rows = []
    for (setup, prompt_tokens, concurrency), pd in by_key.items():
        agg = by_key.get(("aggregated", prompt_tokens, concurrency))
        if setup != "pd" or agg is None:
            continue
        rows.append(
            {
                "prompt_tokens": prompt_tokens,
                "concurrency": concurrency,
                "ttft_p50_pd_over_aggregated": ratio(pd.ttft_p50_ms, agg.ttft_p50_ms),
                "itl_p50_pd_over_aggregated": ratio(pd.itl_p50_ms, agg.itl_p50_ms),
                "e2e_p50_pd_over_aggregated": ratio(pd.e2e_p50_ms, agg.e2e_p50_ms),
                "requests_per_s_pd_over_aggregated": ratio(pd.requests_per_s, agg.requests_per_s),
            }
        )
    return rows


def format_table(report: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = (
        f"{'setup':<10} {'prompt':>6} {'conc':>4} {'reqs':>5} {'err':>4} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'TPOT':>6} "
        f"{'E2E p50':>8} "
        f"{'req/s':>7} {'tok/s':>7}"
    )
    config = report["config"]
    cores = config["cores"]
    lines = [
        f"model: {config['model']}  max_tokens {config['max_tokens']}  stream, ignore_eos, "
        "prefix caching off; latencies in ms",
        "ITL = gap between SSE chunks; TPOT = mean time per output token after the first",
        f"cores: prefill {cores['prefill']}, decode {cores['decode']}, "
        f"aggregated {cores['aggregated']}; aggregated phase: {config['aggregated_phase']}",
        header,
        "-" * len(header),
    ]
    runs = sorted(
        report["runs"],
        key=lambda r: (r["prompt_tokens"], r["concurrency"], SETUPS.index(r["setup"])),
    )
    for run in runs:
        lines.append(
            f"{run['setup']:<10} {run['prompt_tokens']:>6} {run['concurrency']:>4} "
            f"{run['requests']:>5} {run['errors']:>4} "
            f"{num(run['ttft_p50_ms']):>9} {num(run['ttft_p99_ms']):>9} "
            f"{num(run['itl_p50_ms']):>8} {num(run['itl_p99_ms']):>8} "
            f"{num(run['tpot_mean_ms']):>6} {num(run['e2e_p50_ms']):>8} "
            f"{num(run['requests_per_s'], 2):>7} {num(run['output_tokens_per_s']):>7}"
        )
    check = report["pd_check"]
    if check:
        paths = check["proxy_requests_by_path"]
        lines.append(
            f"\nPD path check: {'ok' if check['ok'] else 'NOT OK'} (proxy requests "
            f"disaggregated={num(paths['disaggregated'], 0)} "
            f"fallback={num(paths['fallback'], 0)}; KV bytes pulled by decode="
            f"{num(check['decode_kv_transfer_bytes'], 0)})"
        )
    load = report["machine"]["load_average"]
    lines.append(
        f"load average (1 min) before {load['before'][0]:.1f}, at PD start "
        f"{load.get('pd_start', [float('nan')])[0]:.1f}, at aggregated start "
        f"{load.get('aggregated_start', [float('nan')])[0]:.1f}"
    )
    if report["indicative"]:
        lines.append(
            "note: other work was running on the box before the benchmark started; "
            "the figures are indicative only"
        )
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return sorted(set(values))


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help="local HF model directory (default: tiny model)"
    )
    parser.add_argument("--served-model-name", default="pdserve-bench")
    parser.add_argument(
        "--prompt-tokens", type=_int_list, default=[64, 512, 1024], help="default 64,512,1024"
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 4], help="default 1,4")
    parser.add_argument("--max-tokens", type=_positive_int, default=32, help="output tokens")
    parser.add_argument(
        "--duration", type=_positive, default=20.0, help="seconds per point (default 20)"
    )
    parser.add_argument(
        "--max-requests", type=_positive_int, default=200, help="per point cap (default 200)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="warm-up requests per client")
    parser.add_argument("--request-timeout", type=_positive, default=120.0, help="seconds")
    parser.add_argument(
        "--startup-timeout", type=_positive, default=600.0, help="seconds per engine start"
    )
    parser.add_argument("--prefill-core", default="0", help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument("--decode-core", default="1", help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument("--aggregated-core", default="0", help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument(
        "--aggregated-phase",
        choices=["stopped", "idle"],
        default="stopped",
        help="during the aggregated runs the PD engines are stopped (default) or idle",
    )
    parser.add_argument("--kv-cache-gib", type=_positive_int, default=1)
    parser.add_argument("--block-size", type=_positive_int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--max-model-len", type=_positive_int, default=None,
        help="default: the longest prompt plus max tokens, rounded up to a block",
    )  # fmt: skip
    parser.add_argument(
        "--log-dir", type=Path, default=None,
        help="keep the engines' and proxy's logs here (default: a temporary directory, "
        "removed after a successful run)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would only fail after a minute of engine start-up."""
    from deploy.cli import CliError

    if args.warmup < 0:
        raise CliError("--warmup must be >= 0")
    if args.model is not None:
        config_file = args.model / "config.json"
        if not config_file.is_file():
            raise CliError(f"--model: {args.model} is not a HF model directory (no config.json)")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"--model: cannot read {config_file}: {exc}") from None
        limit = config.get("max_position_embeddings")
        needed = max(args.prompt_tokens) + args.max_tokens
        if isinstance(limit, int) and needed > limit:
            raise CliError(
                f"--prompt-tokens: {max(args.prompt_tokens)} + --max-tokens {args.max_tokens} "
                f"exceeds the model's max_position_embeddings {limit}"
            )
    if args.max_model_len is not None and args.max_model_len < max(args.prompt_tokens) + (
        args.max_tokens
    ):
        raise CliError("--max-model-len must hold the longest prompt plus --max-tokens")
    if not Path("/proc").is_dir():
        raise CliError("this benchmark manages process groups and needs Linux")


def run(args: argparse.Namespace) -> int:
    from deploy.cli import CliError

    check_args(args)
    keep_logs = args.log_dir is not None
    if keep_logs:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="pd-vs-aggregated-", dir=args.log_dir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="pdserve-bench-pd-"))
    try:
        report = run_benchmark(args, workdir)
    except BenchError as exc:
        keep_logs = True
        raise CliError(f"{exc} (logs kept in {workdir})") from None
    except BaseException:
        keep_logs = True
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    status = 0
    failed = [r for r in report["runs"] if r["errors"] or not r["ok"]]
    if failed:
        print(f"{len(failed)} point(s) had errors; see error_samples in the JSON", file=sys.stderr)
        status = 1
    if not report["pd_check"].get("ok"):
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
