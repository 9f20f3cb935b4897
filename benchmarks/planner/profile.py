"""``pdserve plan profile``: measure one engine of a model on this hardware, once.

One plain vLLM engine (prefix caching off, so every sample computes what it says) on one
core, with the engine settings pdserve's workers use, then:

* **prefill**: the time to first token of one request of N prompt tokens (``max_tokens`` 1),
  for N from 32 to the longest prompt: one engine step that prefills N tokens, plus the
  request's way in and out, which a client also waits for;
* **decode**: B streams started together on prompts of C tokens; once all of them are
  decoding, the median gap between tokens is one decode step of batch B (recorded at the
  window's mean context, C plus half the output);
* **KV pull**: the connector's real block server and client pulling the KV of N tokens
  (:class:`benchmarks.kv_transfer.Bench`), laid out as the engine's cache.

The profile JSON (:mod:`benchmarks.planner.profile_model`) feeds ``pdserve plan simulate``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.kv_pull_wait import DTYPES, ModelGeometry
from benchmarks.planner.profile_model import DecodeSample, KvPullSample, PrefillSample, Profile

DEFAULT_OUT = Path("benchmarks/results/plan_profile.json")
PREFILL_TOKENS = (32, 64, 128, 256, 512, 768, 1024, 1536)
DECODE_BATCHES = (1, 2, 4, 8, 16)
DECODE_CONTEXTS = (64, 256, 1024)
KV_PULL_TOKENS = (128, 512, 1536)
DECODE_TOKENS = 40  # per stream: enough steps after the last stream joins


def hardware_description(core: str) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU core {core} ({model}), VLLM_CPU_OMP_THREADS_BIND={core}"


def kv_dtype(model: Path) -> str:
    """The model's dtype as the engine runs it with ``--dtype auto`` (float32 if unstated)."""
    config = json.loads((model / "config.json").read_text())
    dtype = str(config.get("torch_dtype") or "float32")
    return dtype if dtype in DTYPES else "bfloat16"


def kv_bytes_per_token(model: Path) -> int:
    """KV bytes one token occupies over all layers (K and V)."""
    return ModelGeometry.of(model).block_bytes(kv_dtype(model), block_size=1)


async def _stream_times(
    session: Any, url: str, model: str, prompt: list[int], max_tokens: int
) -> list[float]:
    """perf_counter times of each content chunk of one streamed completion."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
        "temperature": 0, "stream": True,
    }  # fmt: skip
    times = []
    async with session.post(url + "/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        async for line in response.content:
            if line.startswith(b"data:") and b"[DONE]" not in line:
                times.append(time.perf_counter())
    return times


async def _measure(
    url: str, model: str, vocab: int, args: argparse.Namespace
) -> tuple[list[PrefillSample], list[DecodeSample]]:
    import aiohttp

    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:
        # Ids above the special tokens; distinct prompts, and prefix caching is off anyway.
        return [rng.randrange(4, vocab) for _ in range(n)]

    prefill: list[PrefillSample] = []
    decode: list[DecodeSample] = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _stream_times(session, url, model, prompt(16), 4)  # warm-up
        for tokens in args.prefill_tokens:
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                times = await _stream_times(session, url, model, prompt(tokens), 1)
                seconds.append(times[0] - started)
            prefill.append(PrefillSample(tokens, 1, statistics.median(seconds)))
            print(f"  prefill {tokens:>5} tokens: {prefill[-1].seconds * 1000:.1f} ms",
                  file=sys.stderr, flush=True)  # fmt: skip
        for context in args.decode_contexts:
            for batch in args.decode_batches:
                streams = await asyncio.gather(
                    *(_stream_times(session, url, model, prompt(context), DECODE_TOKENS)
                      for _ in range(batch))
                )  # fmt: skip
                # Only the gaps while every stream was decoding: after the last one's first
                # token (its prefill done), before the first one's last token.
                start = max(times[0] for times in streams)
                end = min(times[-1] for times in streams)
                gaps = [
                    later - earlier
                    for times in streams
                    for earlier, later in itertools.pairwise(times)
                    if earlier >= start and later <= end
                ]
                if len(gaps) < 3:
                    continue
                # Mid-window, each stream's context is its prompt plus half its output.
                mean_context = context + DECODE_TOKENS // 2
                decode.append(DecodeSample(batch, mean_context, statistics.median(gaps)))
                step_ms = decode[-1].seconds * 1000
                print(f"  decode batch {batch:>3} context {context:>5}: {step_ms:.1f} ms",
                      file=sys.stderr, flush=True)  # fmt: skip
    return prefill, decode


def measure_kv_pull(
    model: Path, block_size: int, token_counts: Sequence[int]
) -> list[KvPullSample]:
    """The connector's pull of each token count's blocks, through its real block server."""
    from benchmarks.kv_transfer import Bench, Geometry

    model_geometry = ModelGeometry.of(model)
    geometry = Geometry(
        model_geometry.num_layers, model_geometry.num_kv_heads, block_size,
        model_geometry.head_dim, kv_dtype(model),
    )  # fmt: skip
    most = max(-(-tokens // block_size) for tokens in token_counts)
    bench = Bench(geometry, most, buffer_bytes=4 * 1024 * 1024)
    samples = []
    try:
        for tokens in token_counts:
            blocks = -(-tokens // block_size)
            ids = list(range(blocks))
            bench.connector(ids, ids)  # warm the pooled connection
            seconds = statistics.median(bench.connector(ids, ids) for _ in range(5))
            nbytes = blocks * geometry.block_nbytes * geometry.num_layers
            samples.append(KvPullSample(nbytes, seconds))
    finally:
        bench.close()
    return samples


def run_profile(args: argparse.Namespace, workdir: Path) -> Profile:
    from benchmarks.pd_vs_aggregated import (
        EngineSettings,
        ProcessSet,
        signals_as_interrupt,
        start_engine,
        wait_engine,
    )
    from deploy.worker_launch import role_settings

    processes = ProcessSet(workdir)
    try:
        with signals_as_interrupt():
            model = args.model
            if model is None:
                from deploy.tiny_model import PRESETS, make_tiny_model

                model = make_tiny_model(workdir / f"{args.preset}-model", PRESETS[args.preset])
            longest = max(max(args.prefill_tokens), max(args.decode_contexts) + DECODE_TOKENS)
            settings = EngineSettings(
                model=model, served_model_name="pdserve-profile", block_size=args.block_size,
                dtype="auto", max_model_len=-(-(longest + 1) // args.block_size) * args.block_size,
                kv_cache_gib=args.kv_cache_gib, secret="",
            )  # fmt: skip
            print(f"starting one engine on core {args.core} ...", file=sys.stderr, flush=True)
            engine = start_engine(
                processes, "aggregated", args.core, settings, "profile", prefix_caching=False
            )
            wait_engine(engine, args.startup_timeout)
            config = json.loads((model / "config.json").read_text())
            prefill, decode = asyncio.run(
                _measure(engine.url, "pdserve-profile", int(config["vocab_size"]), args)
            )
            processes.stop(engine)
            print("KV pulls through the block server ...", file=sys.stderr, flush=True)
            kv_pull = measure_kv_pull(model, args.block_size, args.kv_pull_tokens)
    finally:
        processes.stop_all()
    engine_limits = role_settings("aggregated")
    return Profile(
        model=f"generated {args.preset} preset" if args.model is None else str(args.model),
        hardware=hardware_description(args.core),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        block_size=args.block_size,
        kv_bytes_per_token=kv_bytes_per_token(model),
        max_num_batched_tokens=engine_limits.max_num_batched_tokens or 8192,
        max_num_seqs=engine_limits.max_num_seqs or 256,
        prefill=prefill,
        decode=decode,
        kv_pull=kv_pull,
        proxy_overhead_s=args.proxy_overhead_ms / 1000.0,
    )


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64,512, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deploy.tiny_model import add_model_arguments

    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--core", default="1", help="VLLM_CPU_OMP_THREADS_BIND (default 1)")
    parser.add_argument("--prefill-tokens", type=_int_list, default=list(PREFILL_TOKENS))
    parser.add_argument("--decode-batches", type=_int_list, default=list(DECODE_BATCHES))
    parser.add_argument("--decode-contexts", type=_int_list, default=list(DECODE_CONTEXTS))
    parser.add_argument("--kv-pull-tokens", type=_int_list, default=list(KV_PULL_TOKENS))
    parser.add_argument("--repeats", type=int, default=3, help="prefill runs per size (median)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument(
        "--proxy-overhead-ms",
        type=float,
        default=0.0,
        help="added per leg in simulations (pdserve bench proxy measures it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny model, few sizes, one repeat"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep the engine's log here (default: removed after success)",
    )


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: every stage once, in under a minute (the suite's smoke runs)."""
    if args.quick:
        args.preset, args.repeats = "tiny", 1
        args.prefill_tokens, args.decode_batches = [32, 256], [1, 4]
        args.decode_contexts, args.kv_pull_tokens = [64], [128, 512]


def run(args: argparse.Namespace) -> int:
    from benchmarks.pd_vs_aggregated import BenchError
    from deploy.cli import CliError

    apply_quick(args)
    if args.repeats < 1:
        raise CliError("--repeats must be >= 1")
    if args.model is not None and not (args.model / "config.json").is_file():
        raise CliError(f"--model: {args.model} is not a HF model directory (no config.json)")
    keep = args.log_dir is not None
    if keep:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pdserve-plan-profile-", dir=args.log_dir))
    try:
        profile = run_profile(args, workdir)
    except (BenchError, RuntimeError, OSError) as exc:
        keep = True
        raise CliError(f"{exc} (logs kept in {workdir})") from None
    except BaseException:
        keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    profile.save(args.out)
    ratio = _prefill_decode_ratio(profile)
    counts = (
        f"{len(profile.prefill)} prefill, {len(profile.decode)} decode, "
        f"{len(profile.kv_pull)} KV pull samples"
    )
    if ratio:
        counts += f"; a 512-token prefill takes {ratio:.0f}x a decode step at batch 8"
    print(f"wrote {args.out}: {counts}")
    return 0


def _prefill_decode_ratio(profile: Profile) -> float | None:
    prefill = {s.prompt_tokens: s.seconds for s in profile.prefill if s.batch == 1}
    decode = [s.seconds for s in profile.decode if s.batch == 8]
    if 512 not in prefill or not decode:
        return None
    return prefill[512] / min(decode)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
