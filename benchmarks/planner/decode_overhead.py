"""``pdserve plan overhead``: what a decode step costs inside a 1P1D deployment, term by term.

The planner's profile measures one engine alone on its core. Inside a 1P1D setup a decode
instance's tokens also pay for the KV handoff, the proxy's relay and the prefill engine that
runs on the neighbouring core. This command isolates each term on real engines (prefill on
core 0, decode on core 1, whole process trees pinned, as ``pdserve bench pd`` starts them):
one stream at a time, so every step is a batch-1 decode step, with the modes interleaved so
load drift hits all alike. TPOT per stream = (last event - first event) / (events - 1),
measured by this client.

  alone       a plain request straight to the decode engine, the prefill engine stopped
  engine      the same with the prefill engine running (idle) on the other core
  handoff     prefill leg to the prefill engine, then the decode leg with its kv_transfer_params
  proxy_agg   through the proxy with the decode engine only (the aggregated path)
  proxy_pd    through the proxy with both (the disaggregated path: handoff and relay)

Prints a table, writes JSON (default benchmarks/results/decode_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.pd_vs_aggregated import (
    BenchError,
    EngineSettings,
    ProcessSet,
    Started,
    core_pair,
    engine_settings,
    signals_as_interrupt,
    start_engine,
    start_proxy,
    wait_engine,
    wait_serving,
)
from deploy.cli import CliError
from deploy.tiny_model import PRESETS, add_model_arguments, make_tiny_model
from kv_transfer.params import DO_REMOTE_DECODE, FIELD

DEFAULT_OUTPUT = Path("benchmarks/results/decode_overhead.json")
MODES = ("alone", "engine", "handoff", "proxy_agg", "proxy_pd")
STARTUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ModeResult:
    mode: str
    tpot_ms: list[float]
    median_ms: float
    mean_ms: float
    vs_alone: float  # median over the ``alone`` median


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--streams", type=int, default=15, help="streams per mode (default 15)")
    parser.add_argument("--prompt-words", type=int, default=200, help="prompt length in words")
    parser.add_argument("--output-tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument(
        "--cores", type=core_pair, default=(0, 1), help="prefill core,decode core (default 0,1)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result path")
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 streams of 32 tokens")


def _check(args: argparse.Namespace) -> tuple[str, str]:
    if args.quick:
        args.preset, args.streams, args.output_tokens = "tiny", 3, 32
    if args.streams < 2 or args.output_tokens < 8 or args.prompt_words < 1:
        raise CliError("--streams must be >= 2, --output-tokens >= 8, --prompt-words >= 1")
    prefill_core, decode_core = args.cores
    return str(prefill_core), str(decode_core)


def stream_tpot_ms(url: str, body: dict[str, Any]) -> float:
    """One streamed completion; the client-side time per output token after the first."""
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    times: list[float] = []
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
    if len(times) < 2:
        raise BenchError(f"{url}: a stream of {len(times)} events; need at least 2")
    return (times[-1] - times[0]) / (len(times) - 1) * 1000.0


def summarise(samples: dict[str, list[float]]) -> list[ModeResult]:
    """Per mode the median and mean TPOT, and the median over the ``alone`` median."""
    alone = statistics.median(samples["alone"]) if samples.get("alone") else float("nan")
    results = []
    for mode in MODES:
        values = samples.get(mode, [])
        if not values:
            continue
        median = statistics.median(values)
        results.append(ModeResult(mode, values, median, statistics.mean(values), median / alone))
    return results


def format_table(results: Sequence[ModeResult]) -> str:
    lines = [f"{'mode':<10} {'streams':>7} {'TPOT p50 ms':>11} {'mean ms':>8} {'vs alone':>8}"]
    for r in results:
        lines.append(
            f"{r.mode:<10} {len(r.tpot_ms):>7d} {r.median_ms:>11.2f} {r.mean_ms:>8.2f} "
            f"{r.vs_alone:>8.2f}"
        )
    return "\n".join(lines)


def _measure(
    args: argparse.Namespace, settings: EngineSettings, cores: tuple[str, str], workdir: Path
) -> dict[str, list[float]]:
    processes = ProcessSet(workdir)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    words = " ".join(["hello"] * args.prompt_words)
    base = {"model": settings.served_model_name, "max_tokens": args.output_tokens}
    base |= {"ignore_eos": True, "temperature": 0}
    counter = iter(range(1_000_000))

    def body() -> dict[str, Any]:
        # A prompt no prefix cache holds: every stream prefills (or pulls) all of it.
        return {**base, "prompt": f"{next(counter)} {time.time()} {words}"}

    try:
        prefill = start_engine(processes, "prefill", cores[0], settings)
        decode = start_engine(processes, "decode", cores[1], settings)
        for engine in (prefill, decode):
            wait_engine(engine, STARTUP_TIMEOUT_S)
        proxy_pd = start_proxy(processes, [prefill], [decode])
        wait_serving(proxy_pd, {**body(), "max_tokens": 2}, STARTUP_TIMEOUT_S)
        # A second proxy on another port would need its own config file; one proxy is
        # restarted instead, after the interleaved modes that use the first.
        modes: dict[str, Callable[[], float]] = {
            "engine": lambda: stream_tpot_ms(decode.url, body()),
            "handoff": lambda: _handoff(prefill, decode, body()),
            "proxy_pd": lambda: stream_tpot_ms(proxy_pd.url, body()),
        }
        _interleave(modes, samples, args.streams)
        processes.stop(proxy_pd)
        proxy_agg = start_proxy(processes, [], [decode])
        wait_serving(proxy_agg, {**body(), "max_tokens": 2}, STARTUP_TIMEOUT_S)
        _interleave(
            {
                "proxy_agg": lambda: stream_tpot_ms(proxy_agg.url, body()),
                "engine": lambda: stream_tpot_ms(decode.url, body()),
            },
            samples,
            args.streams,
        )
        processes.stop(proxy_agg)
        processes.stop(prefill)
        _interleave({"alone": lambda: stream_tpot_ms(decode.url, body())}, samples, args.streams)
    finally:
        processes.stop_all()
    return samples


def _handoff(prefill: Started, decode: Started, body: dict[str, Any]) -> float:
    # The leg the proxy would send (kv_transfer.params names the protocol's keys).
    leg = {**body, "max_tokens": 1, "stream": False, FIELD: {DO_REMOTE_DECODE: True}}
    request = urllib.request.Request(
        prefill.url + "/v1/completions",
        data=json.dumps(leg).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        params = json.loads(response.read())[FIELD]
    return stream_tpot_ms(decode.url, {**body, FIELD: params})


def _interleave(
    modes: dict[str, Callable[[], float]], samples: dict[str, list[float]], streams: int
) -> None:
    for mode in modes:  # warm-up, not counted: first-request allocations
        modes[mode]()
    for _ in range(streams):
        for mode, measure in modes.items():
            samples[mode].append(measure())


def run(args: argparse.Namespace) -> int:
    cores = _check(args)
    # Engine logs and the generated model; removed after a good run, kept to read after a bad one.
    workdir = Path(tempfile.mkdtemp(prefix="pdserve-plan-overhead-"))
    load_before = os.getloadavg()
    try:
        with signals_as_interrupt():
            model = args.model or make_tiny_model(
                workdir / f"{args.preset}-model", PRESETS[args.preset]
            )
            args.max_prompt_tokens = args.prompt_words * 4 + 32
            args.max_output_tokens = args.output_tokens
            args.max_model_len, args.block_size, args.dtype = None, 128, "auto"
            args.kv_cache_gib, args.served_model_name = 1, "pdserve-overhead"
            settings = engine_settings(args, model)
            samples = _measure(args, settings, cores, workdir)
    except BenchError as exc:
        raise CliError(f"{exc} (logs kept in {workdir})") from None
    except (OSError, ValueError, KeyError) as exc:  # an engine or the proxy failed a request
        raise CliError(f"a measured request failed: {exc!r} (logs kept in {workdir})") from None
    except KeyboardInterrupt:
        print(f"interrupted; engines stopped, logs kept in {workdir}", flush=True)
        return 130
    shutil.rmtree(workdir, ignore_errors=True)
    results = summarise(samples)
    print(format_table(results))
    report = {
        "benchmark": "decode_overhead",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "load_average_before": load_before},
        "config": {
            "model": f"generated {args.preset} preset" if args.model is None else str(args.model),
            "cores": {"prefill": cores[0], "decode": cores[1]},
            "streams_per_mode": args.streams,
            "prompt_words": args.prompt_words,
            "output_tokens": args.output_tokens,
            "modes": __doc__.split("\n\n")[2] if __doc__ else "",
        },
        "results": [asdict(r) for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0
