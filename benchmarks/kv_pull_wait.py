"""How long a KV pull waits for a prefill instance's block server while its engine computes.

The block server answers reads from threads of the prefill engine's worker process, the
process that also runs the forward passes. If the GIL or the engine's step loop starves those
threads, a decode instance's pull waits for the engine instead of the network. This benchmark
starts one real prefill engine (``--prefill-core``, default core 0) and one real decode engine
(``--decode-core``, default 1) on the same model (the generated tiny model, or ``--model DIR``)
and measures, per pull of one request's blocks:

* **wait**: from sending the ``read`` frame to receiving the server's ``data`` header. It
  includes waiting for the hold to reach the server (the engine step after the prefill answer
  registers it) and any time the server's thread waits for the CPU or the GIL;
* **pull**: from sending the ``read`` to the last byte of the blocks.

Phases:

1. **idle**: ``--pulls`` handoffs (prefill leg of a ``--handoff-blocks``-block prompt, then
   this process pulls the blocks itself over an authenticated block connection, releasing
   them) with nothing else running on the prefill engine;
2. **computing**: the same, while ``--load-concurrency`` background clients keep the prefill
   engine busy with full prefills of ``--load-tokens``-token prompts (plain completions,
   ``max_tokens`` 1, back to back; prefix caching is off, so every one computes);
3. **through the decode**: under the same load, ``--decode-requests`` real PD handoffs: the
   prefill leg, then the same prompt with the returned ``kv_transfer_params`` to the decode
   engine, which pulls the blocks with the real connector. Afterwards the decode's
   ``pdserve_kv_recomputed_requests_total`` and ``pdserve_kv_transfer_failures_total`` are read
   from its /metrics: their sum, the recompute count, must be 0.

Prints a table, writes ``kv_pull_wait.json`` and (with matplotlib) ``kv_pull_wait.png`` (the
CDF of the wait in both phases) to ``--out-dir``. Exits 1 if anything recomputed, failed or
outlived its stop. Every engine runs in its own process group and is stopped on exit, on
errors, on Ctrl-C and on SIGTERM/SIGHUP.

    pdserve bench kv --engine-only [--engine-quick] [--engine-model DIR]
    python -m benchmarks.kv_pull_wait [--quick] [--model DIR] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import json
import math
import os
import platform
import secrets
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.loadgen import percentile
from benchmarks.pd_vs_aggregated import (
    BenchError,
    EngineSettings,
    ProcessSet,
    Started,
    _http,
    _positive,
    _positive_int,
    metric_sum,
    signals_as_interrupt,
    start_engine,
    wait_engine,
)
from deploy.cli import CliError
from kv_transfer import params as kvp

if TYPE_CHECKING:
    from kv_transfer.block_client import BlockConnection
    from kv_transfer.wire import KVFingerprint

DEFAULT_OUT_DIR = Path("benchmarks/results")
JSON_NAME = "kv_pull_wait.json"
PNG_NAME = "kv_pull_wait.png"
PHASES = ("idle", "computing")

# The decode engine's counters (kv_transfer/stats.py; not imported: it imports vLLM).
RECOMPUTED_REQUESTS = "pdserve_kv_recomputed_requests_total"
TRANSFER_FAILURES = "pdserve_kv_transfer_failures_total"
TRANSFERS = "pdserve_kv_transfer_seconds_count"

# dtype flag -> (str(torch dtype) in the engine's KV fingerprint, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("torch.float32", 4),
    "bfloat16": ("torch.bfloat16", 2),
    "float16": ("torch.float16", 2),
}
# (full, --quick) defaults of the counts.
PULLS = (40, 10)
DECODE_REQUESTS = (20, 5)
WARMUP = (3, 1)


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse._ActionsContainer, prefix: str = "") -> None:
    """This benchmark's options, each named ``--{prefix}NAME``.

    ``pdserve bench kv`` embeds them with ``prefix="engine-"`` (its own ``--block-size`` and
    ``--dtype`` mean something else); :func:`options` strips the prefix again.
    """
    dest_prefix = prefix.replace("-", "_")

    def option(name: str, **kwargs: Any) -> None:
        parser.add_argument(
            f"--{prefix}{name}", dest=dest_prefix + name.replace("-", "_"), **kwargs
        )

    option("model", type=Path, default=None, help="local HF model directory (default: tiny model)")
    option("served-model-name", default="tiny", help="default tiny")
    option(
        "quick",
        action="store_true",
        help=f"fewer samples: {PULLS[1]} pulls per phase, {DECODE_REQUESTS[1]} decode requests",
    )
    option(
        "pulls", type=_positive_int, default=None,
        help=f"handoffs pulled per phase (default {PULLS[0]}, --{prefix}quick {PULLS[1]})",
    )  # fmt: skip
    option(
        "decode-requests", type=_positive_int, default=None,
        help=f"PD handoffs through the decode engine under load (default {DECODE_REQUESTS[0]}, "
        f"--{prefix}quick {DECODE_REQUESTS[1]})",
    )  # fmt: skip
    option(
        "warmup", type=int, default=None,
        help=f"unrecorded handoffs first (default {WARMUP[0]}, --{prefix}quick {WARMUP[1]})",
    )  # fmt: skip
    option(
        "handoff-blocks", type=_positive_int, default=4,
        help="KV blocks per handed-off prompt (prompt tokens = blocks x block size; default 4)",
    )  # fmt: skip
    option(
        "load-tokens", type=_positive_int, default=2000,
        help="prompt tokens of each background prefill (default 2000)",
    )  # fmt: skip
    option(
        "load-concurrency", type=_positive_int, default=2,
        help="background prefills in flight (default 2)",
    )  # fmt: skip
    option("decode-tokens", type=_positive_int, default=4, help="output tokens of a decode leg")
    option("prefill-core", default="0", help="VLLM_CPU_OMP_THREADS_BIND of the prefill engine")
    option("decode-core", default="1", help="VLLM_CPU_OMP_THREADS_BIND of the decode engine")
    option("block-size", type=_positive_int, default=32, help="KV block size (default 32)")
    option("dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    option("kv-cache-gib", type=_positive_int, default=1)
    option("request-timeout", type=_positive, default=120.0, help="seconds per HTTP request")
    option("startup-timeout", type=_positive, default=600.0, help="seconds per engine start")
    option(
        "log-dir", type=Path, default=None,
        help="keep the engines' logs here (default: a temporary directory, removed after a "
        "clean run)",
    )  # fmt: skip
    option(
        "out-dir", type=Path, default=None,
        help=f"where {JSON_NAME} and {PNG_NAME} go (default {DEFAULT_OUT_DIR})",
    )  # fmt: skip


def options(args: argparse.Namespace, prefix: str = "") -> argparse.Namespace:
    """This benchmark's options out of ``args``, without ``prefix``."""
    own = argparse.ArgumentParser(add_help=False)
    add_arguments(own)
    dest_prefix = prefix.replace("-", "_")
    return argparse.Namespace(
        **{action.dest: getattr(args, dest_prefix + action.dest) for action in own._actions}
    )


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the counts left unset from the full or the ``--quick`` defaults."""
    pick = 1 if args.quick else 0
    if args.pulls is None:
        args.pulls = PULLS[pick]
    if args.decode_requests is None:
        args.decode_requests = DECODE_REQUESTS[pick]
    if args.warmup is None:
        args.warmup = WARMUP[pick]
    if args.out_dir is None:
        args.out_dir = DEFAULT_OUT_DIR


# -- the model's KV geometry ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGeometry:
    """What the KV fingerprint and the block bytes need from the model's config.json."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelGeometry:
        if "num_hidden_layers" not in config and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]
        try:
            heads = int(config["num_attention_heads"])
            head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
            limit = config.get("max_position_embeddings")
            return cls(
                num_layers=int(config["num_hidden_layers"]),
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                max_positions=limit if isinstance(limit, int) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CliError(f"model config lacks the attention sizes: {exc!r}") from None

    @classmethod
    def of(cls, model: Path) -> ModelGeometry:
        config_file = model / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"model: cannot read {config_file}: {exc}") from None
        if not isinstance(config, dict):
            raise CliError(f"model: {config_file} is not a JSON object")
        return cls.from_config(config)

    def fingerprint(self, served_model_name: str, dtype: str, block_size: int) -> KVFingerprint:
        """The prefill engine's fingerprint (kv_transfer/worker.py, CPU layout)."""
        from kv_transfer import wire

        return wire.KVFingerprint(
            model=served_model_name,
            dtype=DTYPES[dtype][0],
            block_size=block_size,
            layout="LBHNC",
            num_layers=self.num_layers,
            block_shape=(self.num_kv_heads, block_size, 2 * self.head_dim),
            tp_size=1,
            tp_rank=0,
        )

    def block_bytes(self, dtype: str, block_size: int) -> int:
        """KV bytes of one block over all layers."""
        per_layer = self.num_kv_heads * block_size * 2 * self.head_dim * DTYPES[dtype][1]
        return self.num_layers * per_layer


def check_args(args: argparse.Namespace) -> ModelGeometry | None:
    """Refuse what would only fail after a minute of engine start-up."""
    if args.warmup < 0:
        raise CliError("--warmup must be >= 0")
    if not Path("/proc").is_dir():
        raise CliError("this benchmark manages process groups and needs Linux")
    if args.model is None:
        return None
    if not (args.model / "config.json").is_file():
        raise CliError(f"model: {args.model} is not a HF model directory (no config.json)")
    geometry = ModelGeometry.of(args.model)
    needed = max_model_len(args) - args.block_size
    if geometry.max_positions is not None and needed > geometry.max_positions:
        raise CliError(
            f"prompts of {needed} tokens exceed the model's max_position_embeddings "
            f"{geometry.max_positions}: lower --load-tokens or --handoff-blocks"
        )
    return geometry


def handoff_tokens(args: argparse.Namespace) -> int:
    return int(args.handoff_blocks * args.block_size)


def max_model_len(args: argparse.Namespace) -> int:
    longest = max(args.load_tokens + 1, handoff_tokens(args) + args.decode_tokens)
    return -(-(longest + 1) // args.block_size) * args.block_size


# -- statistics and the report ----------------------------------------------------------------


@dataclass
class PhaseSamples:
    """One phase's measurements, in seconds."""

    phase: str
    waits_s: list[float] = field(default_factory=list)
    pulls_s: list[float] = field(default_factory=list)
    prefill_legs_s: list[float] = field(default_factory=list)
    bytes_per_pull: int = 0
    errors: list[str] = field(default_factory=list)


def _ms_percentile(values_s: Sequence[float], q: float) -> float | None:
    if not values_s:
        return None
    return round(percentile(sorted(values_s), q) * 1000.0, 3)


def summarize(samples: PhaseSamples) -> dict[str, Any]:
    """The phase's row of the report, with the raw samples (ms) for the CDF."""
    return {
        "phase": samples.phase,
        "pulls": len(samples.waits_s),
        "errors": len(samples.errors),
        "wait_p50_ms": _ms_percentile(samples.waits_s, 50),
        "wait_p99_ms": _ms_percentile(samples.waits_s, 99),
        "wait_max_ms": _ms_percentile(samples.waits_s, 100),
        "pull_p50_ms": _ms_percentile(samples.pulls_s, 50),
        "pull_p99_ms": _ms_percentile(samples.pulls_s, 99),
        "prefill_leg_p50_ms": _ms_percentile(samples.prefill_legs_s, 50),
        "prefill_leg_p99_ms": _ms_percentile(samples.prefill_legs_s, 99),
        "bytes_per_pull": samples.bytes_per_pull,
        "waits_ms": [round(s * 1000.0, 4) for s in samples.waits_s],
        "pulls_ms": [round(s * 1000.0, 4) for s in samples.pulls_s],
        "error_samples": samples.errors[:5],
    }


def format_table(report: Mapping[str, Any]) -> str:
    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    config = report["config"]
    header = (
        f"{'phase':<10} {'pulls':>5} {'err':>4} {'wait p50 ms':>11} {'wait p99 ms':>11} "
        f"{'pull p50 ms':>11} {'pull p99 ms':>11}"
    )
    lines = [
        f"model: {config['model']}  {config['handoff_tokens']}-token prompts "
        f"({config['handoff_blocks']} blocks of {config['block_size']}, "
        f"{config['dtype']}); cores: prefill {config['prefill_core']}, "
        f"decode {config['decode_core']}",
        "wait = read sent -> server's data header; pull = read sent -> last block byte",
        header,
        "-" * len(header),
    ]
    for phase in PHASES:
        row = report["phases"].get(phase)
        if row is None:
            continue
        lines.append(
            f"{phase:<10} {row['pulls']:>5} {row['errors']:>4} {num(row['wait_p50_ms']):>11} "
            f"{num(row['wait_p99_ms']):>11} {num(row['pull_p50_ms']):>11} "
            f"{num(row['pull_p99_ms']):>11}"
        )
    load = report.get("load") or {}
    if load:
        lines.append(
            f"load during 'computing': {load['concurrency']} x {load['prompt_tokens']}-token "
            f"prefills back to back, {load['requests']} done ({load['errors']} errors), "
            f"one prefill p50 {num(load['latency_p50_ms'], 1)} ms, "
            f"{num(load['prefill_tokens_per_s'], 0)} prompt tokens/s"
        )
    decode = report.get("decode") or {}
    if decode:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(decode["outcomes"].items())) or "none"
        lines.append(
            f"through the decode under load: {decode['ok']}/{decode['requests']} requests ok, "
            f"recompute count {num(decode['recompute_count'], 0)} (recomputed requests "
            f"{num(decode['recomputed_requests'], 0)}, failed pulls "
            f"{num(decode['transfer_failures'], 0)}); outcomes: {outcomes}"
        )
    return "\n".join(lines)


def write_png(report: Mapping[str, Any], path: Path) -> bool:
    """The wait CDF of both phases; False when matplotlib is not installed."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return False
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for phase in PHASES:
        row = report["phases"].get(phase)
        if not row or not row["waits_ms"]:
            continue
        waits = sorted(row["waits_ms"])
        fractions = [(i + 1) / len(waits) for i in range(len(waits))]
        axes.step(
            waits, fractions, where="post",
            label=f"{phase} (p50 {row['wait_p50_ms']:.2f} ms, p99 {row['wait_p99_ms']:.2f} ms)",
        )  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("pull wait: read sent -> data header (ms)")
    axes.set_ylabel("fraction of pulls")
    axes.set_title("KV pull wait on a prefill instance, idle vs computing")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def problems_of(report: Mapping[str, Any]) -> list[str]:
    """Everything that makes the run a failure, one line each."""
    problems = []
    decode = report.get("decode") or {}
    count = decode.get("recompute_count")
    if count is None:
        problems.append("the decode engine's /metrics carry no recompute or failure counters")
    elif count:
        problems.append(
            f"recompute count {count:g}, must be 0: recomputed requests "
            f"{decode.get('recomputed_requests') or 0:g}, "
            f"failed pulls {decode.get('transfer_failures') or 0:g}"
        )
    recomputed_outcomes = decode.get("outcomes", {}).get(kvp.Outcome.RECOMPUTED, 0)
    if recomputed_outcomes:
        problems.append(f"{recomputed_outcomes} decode answers report outcome 'recomputed'")
    if decode.get("errors"):
        problems.append(f"{decode['errors']} of {decode['requests']} decode requests failed")
    for phase in PHASES:
        row = report["phases"].get(phase) or {}
        if row.get("errors"):
            problems.append(f"{row['errors']} pulls failed in the {phase} phase")
        elif not row.get("pulls"):
            problems.append(f"no pull in the {phase} phase")
    load = report.get("load") or {}
    if load.get("errors"):
        problems.append(f"{load['errors']} background prefills failed")
    if report.get("leftover_processes"):
        problems.append(f"processes outlived their stop: {report['leftover_processes']}")
    return problems


# -- prompts --------------------------------------------------------------------------------

# Prompts are cut from this text, repeated, so they are ordinary tokens of the tokenizer.
_PROMPT_TEXT = (
    "Prefill reads the whole prompt at once and writes the key and value cache for every "
    "token; decode then produces one token at a time and reads that cache again and again. "
    "The quick brown fox jumps over the lazy dog, and the weather today is sunny with a "
    "light breeze from the west. Explain how a computer network sends data from one machine "
    "to another, step by step, in simple words. "
)


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


# -- talking to the engines -------------------------------------------------------------------


class PullError(Exception):
    """One pull failed; the connection it used is closed."""


class Puller:
    """Pulls a held request's blocks like a decode worker, timing the wait separately.

    One authenticated data connection per endpoint, reused (the decode's pool does the same),
    so the handshake is not part of any pull.
    """

    def __init__(self, secret: str, fingerprint: KVFingerprint, block_bytes: int) -> None:
        self._secret = secret.encode()
        self._fingerprint = fingerprint
        self._block_bytes = block_bytes
        self._conn: BlockConnection | None = None
        self._buffer = bytearray(0)

    def _connection(self, endpoint: tuple[str, int]) -> BlockConnection:
        from kv_transfer.block_client import BlockConnection, ClientSettings

        if self._conn is not None and self._conn.endpoint != endpoint:
            self.close()
        if self._conn is None:
            self._conn = BlockConnection(
                endpoint, ClientSettings(secret=self._secret), self._fingerprint
            )
        return self._conn

    def pull(self, remote: kvp.RemotePrefill, block_size: int) -> tuple[float, float, int]:
        """Read and release ``remote``'s prompt blocks: (wait s, pull s, bytes)."""
        from kv_transfer import wire

        count = math.ceil(remote.num_tokens / block_size) if remote.num_tokens > 0 else 0
        blocks = list(remote.block_ids[:count] if count else remote.block_ids)
        expected = len(blocks) * self._block_bytes
        try:
            conn = self._connection((remote.host, remote.port))
            started = time.perf_counter()
            wire.send_frame(
                conn.sock,
                {
                    "op": "read",
                    "req": remote.request_id,
                    "blocks": blocks,
                    "release": True,
                    "hold": remote.hold_token,
                },
            )
            header = wire.expect(wire.recv_frame(conn.sock), "data")
            answered = time.perf_counter()
            nbytes = header.get("nbytes")
            if nbytes != expected:
                raise wire.WireError(f"server announced {nbytes!r} bytes, expected {expected}")
            if len(self._buffer) < expected:
                self._buffer = bytearray(expected)
            wire.recv_into_exact(conn.sock, memoryview(self._buffer)[:expected])
            done = time.perf_counter()
        except (wire.WireError, wire.RemoteError) as exc:
            self.close()
            if isinstance(exc, wire.RemoteError) and exc.code == wire.ERR_HANDSHAKE:
                raise BenchError(
                    f"the prefill's block server refused this benchmark's KV fingerprint ({exc}); "
                    "is --model a plain decoder config with num_hidden_layers, "
                    "num_key_value_heads and head_dim?"
                ) from None
            raise PullError(f"{type(exc).__name__}: {exc}") from None
        return answered - started, done - started, expected

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _post(url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    try:
        answer = json.loads(_http(url + "/v1/completions", body, timeout_s=timeout_s))
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise PullError(f"HTTP {exc.code} from {url}: {detail}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise PullError(f"{url}: {type(exc).__name__}: {exc}") from None
    if not isinstance(answer, dict):
        raise PullError(f"{url} answered {str(answer)[:200]}")
    return answer


def prefill_leg(
    prefill: Started, model: str, prompt: list[int], timeout_s: float
) -> dict[str, Any]:
    """Run the prefill leg; return the ``kv_transfer_params`` of its answer."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "stream": False,
        kvp.FIELD: kvp.prefill_leg_params(),
    }
    answer = _post(prefill.url, body, timeout_s)
    params = answer.get(kvp.FIELD)
    if not isinstance(params, dict):
        raise BenchError(
            f"the prefill engine's answer carries no {kvp.FIELD}: is it a KV producer? "
            f"({str(answer)[:200]})"
        )
    return params


def rotations(ids: Sequence[int]) -> Iterator[list[int]]:
    """Distinct prompts of the same length: ``ids`` rotated by 1, 2, 3 ..."""
    shift = 0
    while True:
        shift = shift % len(ids) + 1
        yield [*ids[shift:], *ids[:shift]]


def run_pulls(
    phase: str,
    prefill: Started,
    puller: Puller,
    prompts: Iterator[list[int]],
    count: int,
    args: argparse.Namespace,
) -> PhaseSamples:
    samples = PhaseSamples(phase)
    for _ in range(count):
        try:
            started = time.perf_counter()
            params = prefill_leg(
                prefill, args.served_model_name, next(prompts), args.request_timeout
            )
            samples.prefill_legs_s.append(time.perf_counter() - started)
            wait, total, nbytes = puller.pull(kvp.RemotePrefill.parse(params), args.block_size)
        except (PullError, kvp.ParamsError) as exc:
            samples.errors.append(str(exc))
            continue
        samples.waits_s.append(wait)
        samples.pulls_s.append(total)
        samples.bytes_per_pull = nbytes
    return samples


class BackgroundLoad:
    """Keeps an engine busy: ``concurrency`` clients sending full prefills back to back."""

    def __init__(
        self, url: str, model: str, prompt: list[int], concurrency: int, timeout_s: float
    ) -> None:
        self._url = url
        self._model = model
        self._prompt = prompt
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._first = threading.Event()
        self.latencies_s: list[float] = []
        self.errors: list[str] = []
        self.started_at = 0.0
        self.stopped_at = 0.0
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(concurrency)
        ]

    def _client(self, index: int) -> None:
        prompts = rotations(self._prompt)
        for _ in range(index * 7):  # the clients' prompts differ from each other
            next(prompts)
        while not self._stop.is_set():
            body = {"model": self._model, "prompt": next(prompts), "max_tokens": 1}
            started = time.perf_counter()
            try:
                _post(self._url, body, self._timeout_s)
            except PullError as exc:
                if self._stop.is_set():
                    return
                with self._lock:
                    self.errors.append(str(exc))
                time.sleep(0.2)  # an engine that refuses must not be hammered
                continue
            with self._lock:
                self.latencies_s.append(time.perf_counter() - started)
            self._first.set()

    def __enter__(self) -> BackgroundLoad:
        self.started_at = time.perf_counter()
        for thread in self._threads:
            thread.start()
        # Measure only once prefills flow: the first one done means the engine is computing.
        try:
            if not self._first.wait(self._timeout_s):
                raise BenchError(
                    f"the background prefills got no answer in {self._timeout_s:g} s"
                    + (f" ({self.errors[-1]})" if self.errors else "")
                )
        except BaseException:
            self._stop.set()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped_at = time.perf_counter()
        self._stop.set()
        # Each client finishes its prefill in flight; they are daemons, so a stuck one (its
        # engine about to be stopped) does not hold the clean-up up.
        deadline = time.monotonic() + min(self._timeout_s, 30.0)
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def summary(self, prompt_tokens: int) -> dict[str, Any]:
        with self._lock:
            latencies, errors = list(self.latencies_s), list(self.errors)
        elapsed = max(self.stopped_at - self.started_at, 1e-9)
        return {
            "concurrency": len(self._threads),
            "prompt_tokens": prompt_tokens,
            "requests": len(latencies),
            "errors": len(errors),
            "error_samples": errors[:5],
            "latency_p50_ms": _ms_percentile(latencies, 50),
            "latency_p99_ms": _ms_percentile(latencies, 99),
            "prefill_tokens_per_s": round(len(latencies) * prompt_tokens / elapsed, 1),
            "seconds": round(elapsed, 3),
        }


@dataclass
class DecodeSamples:
    requests: int = 0
    latencies_s: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def run_decode(
    prefill: Started,
    decode: Started,
    prompts: Iterator[list[int]],
    count: int,
    args: argparse.Namespace,
) -> DecodeSamples:
    """Real PD handoffs: the prefill leg, then the decode engine pulls with the connector."""
    samples = DecodeSamples(requests=count)
    for _ in range(count):
        prompt = next(prompts)
        try:
            started = time.perf_counter()
            params = prefill_leg(prefill, args.served_model_name, prompt, args.request_timeout)
            body = {
                "model": args.served_model_name,
                "prompt": prompt,
                "max_tokens": args.decode_tokens,
                "ignore_eos": True,
                "stream": False,
                kvp.FIELD: params,
            }
            answer = _post(decode.url, body, args.request_timeout)
        except PullError as exc:
            samples.errors.append(str(exc))
            continue
        samples.latencies_s.append(time.perf_counter() - started)
        reported = answer.get(kvp.FIELD)
        outcome = reported.get(kvp.OUTCOME) if isinstance(reported, dict) else None
        samples.outcomes[str(outcome or "unreported")] += 1
    return samples


def decode_counters(decode: Started, expected: int, timeout_s: float = 20.0) -> dict[str, Any]:
    """The decode's recompute and failure counters once ``expected`` handoffs are counted.

    The connector's stats reach /metrics with the engine's step outputs, a little after the
    answers: poll until every handoff shows up as a transfer or a recompute (or time is up).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        transfers = metric_sum(decode.url, TRANSFERS)
        recomputed = metric_sum(decode.url, RECOMPUTED_REQUESTS)
        failures = metric_sum(decode.url, TRANSFER_FAILURES)
        seen = (transfers or 0.0) + (recomputed or 0.0)
        if seen >= expected or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    total = (
        None if recomputed is None and failures is None else (recomputed or 0.0) + (failures or 0.0)
    )
    return {
        "transfers": transfers,
        "recomputed_requests": recomputed,
        "transfer_failures": failures,
        "recompute_count": total,
    }


def _alive(*engines: Started) -> None:
    for engine in engines:
        if engine.process.poll() is not None:
            raise BenchError(
                f"{engine.name} engine exited with status {engine.process.returncode} "
                f"(log: {engine.log_path})"
            )


# -- the benchmark ----------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    processes = ProcessSet(workdir)
    load_average: dict[str, Any] = {"before": os.getloadavg()}
    phases: dict[str, dict[str, Any]] = {}
    startup: dict[str, float | None] = {}
    load_summary: dict[str, Any] = {}
    decode_report: dict[str, Any] = {}
    prefill_refusals: float | None = None
    puller: Puller | None = None
    try:
        with signals_as_interrupt():
            model = args.model
            if model is None:
                from deploy.tiny_model import make_tiny_model

                model = make_tiny_model(workdir / "tiny-model")
            geometry = ModelGeometry.of(model)
            settings = EngineSettings(
                model=model,
                served_model_name=args.served_model_name,
                block_size=args.block_size,
                dtype=args.dtype,
                max_model_len=max_model_len(args),
                kv_cache_gib=args.kv_cache_gib,
                secret=secrets.token_hex(16),
            )
            tokens = handoff_tokens(args)
            base = prompt_token_ids(model, [tokens, args.load_tokens])
            handoffs = rotations(base[tokens])
            _progress(f"starting engines (logs in {workdir}) ...")
            prefill = start_engine(processes, "prefill", args.prefill_core, settings)
            decode = start_engine(processes, "decode", args.decode_core, settings)
            for engine in (prefill, decode):
                wait_engine(engine, args.startup_timeout)
                startup[engine.name] = engine.ready_s
            puller = Puller(
                settings.secret,
                geometry.fingerprint(args.served_model_name, args.dtype, args.block_size),
                geometry.block_bytes(args.dtype, args.block_size),
            )

            _progress(f"  warm-up: {args.warmup} handoffs ...")
            warmup = run_pulls("warmup", prefill, puller, handoffs, args.warmup, args)
            if args.warmup and not warmup.waits_s:
                raise BenchError(f"no warm-up pull succeeded: {warmup.errors[-1]}")
            _alive(prefill, decode)

            load_average["idle_start"] = os.getloadavg()
            _progress(f"  idle: {args.pulls} handoffs ...")
            phases["idle"] = summarize(
                run_pulls("idle", prefill, puller, handoffs, args.pulls, args)
            )
            _alive(prefill, decode)

            load = BackgroundLoad(
                prefill.url,
                args.served_model_name,
                base[args.load_tokens],
                args.load_concurrency,
                args.request_timeout,
            )
            _progress(
                f"  computing: {args.pulls} handoffs under {args.load_concurrency} x "
                f"{args.load_tokens}-token prefills, then {args.decode_requests} through the "
                "decode ..."
            )
            with load:
                load_average["computing_start"] = os.getloadavg()
                computing = run_pulls("computing", prefill, puller, handoffs, args.pulls, args)
                decoded = run_decode(prefill, decode, handoffs, args.decode_requests, args)
            phases["computing"] = summarize(computing)
            load_summary = load.summary(args.load_tokens)
            _alive(prefill, decode)

            counters = decode_counters(decode, len(decoded.latencies_s))
            decode_report = {
                "requests": decoded.requests,
                "ok": len(decoded.latencies_s),
                "errors": len(decoded.errors),
                "error_samples": decoded.errors[:5],
                "latency_p50_ms": _ms_percentile(decoded.latencies_s, 50),
                "latency_p99_ms": _ms_percentile(decoded.latencies_s, 99),
                "outcomes": dict(decoded.outcomes),
                **counters,
            }
            prefill_refusals = metric_sum(prefill.url, TRANSFER_FAILURES)
            load_average["after"] = os.getloadavg()
    finally:
        if puller is not None:
            with contextlib.suppress(Exception):
                puller.close()
        processes.stop_all()
    return {
        "benchmark": "kv_pull_wait",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "indicative": load_average["before"][0] > 1.0,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": load_average,
        },
        "config": config_of(args),
        "startup_s": startup,
        "phases": phases,
        "load": load_summary,
        "decode": decode_report,
        "prefill_refused_reads": prefill_refusals,
        "leftover_processes": processes.leftovers,
    }


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "generated tiny model" if args.model is None else str(args.model),
        "served_model_name": args.served_model_name,
        "pulls_per_phase": args.pulls,
        "decode_requests": args.decode_requests,
        "warmup": args.warmup,
        "handoff_blocks": args.handoff_blocks,
        "handoff_tokens": handoff_tokens(args),
        "load_tokens": args.load_tokens,
        "load_concurrency": args.load_concurrency,
        "decode_tokens": args.decode_tokens,
        "block_size": args.block_size,
        "dtype": args.dtype,
        "kv_cache_gib": args.kv_cache_gib,
        "max_model_len": max_model_len(args),
        "prefix_caching": False,
        "prefill_core": args.prefill_core,
        "decode_core": args.decode_core,
    }


def report_and_status(report: dict[str, Any], out_dir: Path) -> int:
    """Print the table, write the JSON and PNG; 1 if the run found a problem."""
    report["problems"] = problems_of(report)
    print(format_table(report))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / JSON_NAME
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {json_path}")
    png_path = out_dir / PNG_NAME
    if write_png(report, png_path):
        print(f"wrote {png_path}")
    else:
        print("matplotlib is not installed: no wait CDF plot (pip install matplotlib for one)")
    if report["indicative"]:
        print("note: the box was busy before the benchmark started; figures are indicative")
    for problem in report["problems"]:
        print(f"kv_pull_wait: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


def run(args: argparse.Namespace) -> int:
    resolve_defaults(args)
    check_args(args)
    keep_logs = args.log_dir is not None
    if keep_logs:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="kv-pull-wait-", dir=args.log_dir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="pdserve-bench-kv-pull-wait-"))
    try:
        report = run_benchmark(args, workdir)
    except BenchError as exc:
        raise CliError(f"{exc} (logs kept in {workdir})") from None
    except BaseException:
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    status = report_and_status(report, args.out_dir)
    if status:
        print(f"logs kept in {workdir}", file=sys.stderr)
    elif not keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


def run_embedded(args: argparse.Namespace, prefix: str, default_out_dir: Path) -> int:
    """Run from another benchmark's command line, where the options carry ``prefix``."""
    own = options(args, prefix)
    if own.out_dir is None:
        own.out_dir = default_out_dir
    return run(own)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
