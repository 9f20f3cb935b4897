"""``pdserve bench faults``: what one fault at a time costs the clients of a real cluster.

Starts ``pdserve up`` (2 prefill + 2 decode on a local Ray cluster, the tiny model unless
``--model`` names a local HF directory) and keeps a steady mixed load on its proxy:
streamed and non-streamed, chat and completions. Then, one phase per fault:

* ``kill-decode`` / ``kill-prefill``: SIGKILL of one engine's process group (a crash);
* ``stop-decode``: SIGSTOP of one decode engine for ``--stop-s`` seconds, then SIGCONT;
* ``client-disconnects``: every ``--disconnect-every``-th streamed request is abandoned
  by its client after the first event;
* ``kv-port-refused``: TCP to one prefill's KV port is answered with a reset for
  ``--refuse-s`` seconds (an iptables rule on loopback: needs root and iptables).

Before the first fault, every prompt of the load is answered once by the fault-free cluster;
every answer a client gets during a phase must equal it (greedy decoding, float32 model).

Per phase: requests sent, succeeded, failed before the first byte (a clean HTTP error),
failed mid-stream (an SSE error event or a cut stream), hung (no byte for longer than the
proxy's deadlines plus a margin: must be 0), succeeded answers that differ from the
fault-free one (must be 0), requests the proxy moved to another decode instance (before the
first byte or mid-stream), KV blocks held on each prefill instance 5 s after the load
stopped (must be 0), the proxy's KV hand-off outcomes, and how long the faulted instance
was out of the proxy's rotation. Prints a table, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks.pd_vs_aggregated import metric_sum
from deploy.cli import CliError
from deploy.status_cli import kv_blocks_held
from deploy.worker_launch import port_is_free
from kv_transfer.config import DEFAULT_LEASE_S

FAULTS = ("kill-decode", "kill-prefill", "stop-decode", "client-disconnects", "kv-port-refused")
QUICK_FAULTS = ("client-disconnects", "stop-decode", "kv-port-refused")
MODEL_NAME = "tiny-llama"
# The bench cluster's proxy deadlines. The prefill leg and the decode's first byte get
# LEG_TIMEOUT_S: while an engine restarts, its peers share two cores with it and answer
# slowly, and a request that waits is not lost. A stream silent for STALL_S moves to the
# other decode instance: shorter than the SIGSTOP fault, so a stopped decode's streams move.
# A client waits at most prefill + first byte for its first byte (the request's deadline,
# moves included) and stall_s between two; a silence HANG_MARGIN_S past those is a hang:
# something the proxy failed to bound.
LEG_TIMEOUT_S = 120.0
STALL_S = 10.0
HANG_MARGIN_S = 10.0
HANG_LIMIT_S = 2 * LEG_TIMEOUT_S + HANG_MARGIN_S
# The load cycles through this many prompts per request kind, so each has a fault-free answer.
PROMPTS = 64
IPTABLES_TAG = "pdserve-bench-faults"
KINDS = ("completions", "completions-stream", "chat", "chat-stream")


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


# -- the cluster --------------------------------------------------------------------------


@dataclass
class ClusterPorts:
    proxy: int
    admin: int
    prefill: int
    kv: int
    decode: int

    @classmethod
    def pick(cls, replicas: int) -> ClusterPorts:
        # Below the kernel's ephemeral range (32768+), where Ray and every client connection
        # take ports: a block free now stays free until the workers bind it. Each pool
        # reserves port .. port + max_replicas - 1.
        for _ in range(200):
            base = random.randrange(20000, 30000, 10)
            if all(port_is_free("127.0.0.1", p) for p in range(base, base + 2 + 3 * replicas)):
                return cls(base, base + 1, base + 2, base + 2 + replicas, base + 2 + 2 * replicas)
        raise BenchError("no free block of ports in 20000-30000")


@dataclass
class Cluster:
    """A `pdserve up` this benchmark started, and how to reach its parts."""

    process: subprocess.Popen[str]
    directory: Path
    ports: ClusterPorts
    lines: list[str] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports.proxy}"

    def url(self, role: str, index: int) -> str:
        port = self.ports.prefill if role == "prefill" else self.ports.decode
        return f"http://127.0.0.1:{port + index}"

    def kv_port(self, index: int) -> int:
        return self.ports.kv + index

    def worker_pid(self, name: str) -> int:
        return int((self.state_dir / "pids" / f"{name}.pid").read_text().strip())

    def rotation(self) -> dict[str, bool]:
        """url -> healthy, as the proxy sees its instances now."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.ports.admin}/admin/instances", timeout=5
        ) as response:
            entries = json.load(response)["instances"]
        return {e["url"]: bool(e["healthy"]) and not e.get("draining") for e in entries}


def write_topology(
    directory: Path, ports: ClusterPorts, prefill: int, decode: int, model: str | None
) -> Path:
    replicas = max(prefill, decode)
    # No cpu_cores: the controller spreads the engines over the node's cores evenly (a
    # per-pool list would start both pools' first instances on the same core).
    pool = {"max_replicas": replicas, "resources": {"cpus": 0.25}}
    topology: dict[str, Any] = {
        "served_model_name": MODEL_NAME,
        "prefill": {**pool, "replicas": prefill, "port": ports.prefill, "kv_port": ports.kv},
        "decode": {**pool, "replicas": decode, "port": ports.decode},
        "proxy": {
            "port": ports.proxy,
            "admin": {"port": ports.admin},
            "timeouts": {
                "prefill_s": LEG_TIMEOUT_S,
                "first_byte_s": LEG_TIMEOUT_S,
                "stall_s": STALL_S,
            },
            "retries": {"deadline_s": 2 * LEG_TIMEOUT_S},
            "health": {"interval_s": 0.5, "failures_to_eject": 2, "successes_to_readmit": 1},
        },
        "ray": {"namespace": f"pdserve-faults-{os.getpid()}", "temp_dir": str(directory / "r")},
        "controller": {"reconcile_interval_s": 0.5, "restart_backoff_s": 0.5},
    }
    if model:
        topology["model"] = model
    import yaml

    path = directory / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    return path


def start_cluster(prefill: int, decode: int, model: str | None, ready_timeout_s: float) -> Cluster:
    # Ray's socket paths live under its temp dir and must stay short (108 bytes).
    directory = Path(tempfile.mkdtemp(prefix="pdf-", dir="/tmp"))
    ports = ClusterPorts.pick(max(prefill, decode))
    topology = write_topology(directory, ports, prefill, decode, model)
    pdserve = str(Path(sys.executable).with_name("pdserve"))
    process = subprocess.Popen(
        [pdserve, "up", "-c", str(topology), "--state-dir", str(directory / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        start_new_session=True,
    )
    cluster = Cluster(process, directory, ports)
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            cluster.lines.append(line.rstrip())
            if "] serving " in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + ready_timeout_s
    while not ready.wait(1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_cluster(cluster)
            tail = "\n".join(cluster.lines[-15:])
            raise BenchError(f"pdserve up did not become ready:\n{tail}")
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    if cluster.process.poll() is None:
        cluster.process.send_signal(signal.SIGTERM)
        try:
            cluster.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.process.pid, signal.SIGKILL)
            cluster.process.wait()
    shutil.rmtree(cluster.directory, ignore_errors=True)


# -- the load -----------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    failed_before_first_byte: int = 0
    failed_mid_stream: int = 0
    hung: int = 0
    disconnected_by_client: int = 0
    differs: int = 0  # succeeded, but not with the fault-free answer
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: str, detail: str = "") -> None:
        self.sent += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        if detail:
            self.errors[f"{outcome}: {detail[:120]}"] += 1


@dataclass(frozen=True)
class Answer:
    outcome: str  # a Tally field
    detail: str = ""
    text: str = ""


class Load:
    """``concurrency`` clients sending the four request kinds round-robin until stopped.
    ``disconnect_every`` > 0 makes every n-th streamed request end at its first event."""

    def __init__(
        self,
        api: str,
        concurrency: int,
        max_tokens: int,
        fault_free: dict[tuple[str, int], str] | None = None,
    ) -> None:
        self._api = api
        self._concurrency = concurrency
        self._max_tokens = max_tokens
        self._hang_s = HANG_LIMIT_S
        self._fault_free = fault_free or {}
        self.tally = Tally()
        self.disconnect_every = 0
        self._streams = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._open()
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self._concurrency)]

    def swap_tally(self) -> Tally:
        tally, self.tally = self.tally, Tally()
        return tally

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _open(self) -> None:
        # sock_read bounds every wait for a byte, the response headers included.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._hang_s, sock_read=self._hang_s
        )
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def fault_free_answers(self) -> dict[tuple[str, int], str]:
        """Every (kind, prompt) of the load answered once, ``concurrency`` at a time (no
        clients running: ``start`` is not called)."""
        if self._session is None:
            self._open()
        gate = asyncio.Semaphore(self._concurrency)

        async def one(kind: str, prompt: int) -> Answer:
            async with gate:
                return await self.ask(kind, prompt)

        keys = [(kind, prompt) for kind in KINDS for prompt in range(PROMPTS)]
        answers = await asyncio.gather(*(one(*key) for key in keys))
        failed = [
            f"{kind} prompt {prompt}: {a.outcome} {a.detail}"
            for (kind, prompt), a in zip(keys, answers, strict=True)
            if a.outcome != "ok"
        ]
        if failed:
            raise BenchError(f"the fault-free cluster failed {len(failed)} requests: {failed[0]}")
        return {key: answer.text for key, answer in zip(keys, answers, strict=True)}

    async def _client(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            kind = KINDS[turn % len(KINDS)]
            prompt = turn % PROMPTS
            turn += 1
            abandon = False
            if kind.endswith("stream"):
                self._streams += 1
                abandon = self.disconnect_every > 0 and self._streams % self.disconnect_every == 0
            self.record(kind, prompt, await self.ask(kind, prompt, abandon))
            await asyncio.sleep(0.05)  # a steady trickle: restarting engines share the cores

    def record(self, kind: str, prompt: int, answer: Answer) -> None:
        """Count ``answer``; a succeeded one is compared with the fault-free answer."""
        self.tally.add(answer.outcome, answer.detail)
        expected = self._fault_free.get((kind, prompt))
        if answer.outcome == "ok" and expected is not None and answer.text != expected:
            self.tally.differs += 1
            self.tally.errors[f"differs: {kind} prompt {prompt}: {answer.text[:60]!r}"] += 1

    async def ask(self, kind: str, prompt: int, abandon: bool = False) -> Answer:
        stream = kind.endswith("stream")
        chat = kind.startswith("chat")
        body: dict[str, Any] = {
            "model": MODEL_NAME,
            "max_tokens": self._max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        text = f"Request {prompt}: tell me about the weather in a city by the sea."
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return await self._exchange(path, orjson.dumps(body), stream, abandon)

    async def _exchange(self, path: str, body: bytes, stream: bool, abandon: bool) -> Answer:
        if self._session is None:
            raise BenchError("Load.start() first")
        got_bytes = False
        try:
            async with self._session.post(
                self._api + path, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                if response.status != 200:
                    payload = await response.read()
                    return Answer("failed_before_first_byte", f"{response.status} {payload[:80]!r}")
                if not stream:
                    return Answer("ok", text=_text_of(orjson.loads(await response.read())))
                done = False
                parts: list[str] = []
                while True:
                    line = await response.content.readline()
                    if not line:
                        break
                    got_bytes = True
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                    elif data.startswith(b'{"error"'):
                        return Answer("failed_mid_stream", data[:80].decode("utf-8", "replace"))
                    elif abandon:
                        response.close()  # the client goes away mid-stream
                        return Answer("disconnected_by_client")
                    else:
                        parts.append(_text_of(orjson.loads(data)))
                if not done:
                    return Answer("failed_mid_stream", "stream ended without data: [DONE]")
                return Answer("ok", text="".join(parts))
        except TimeoutError:
            return Answer("hung", f"no byte for {self._hang_s:.0f} s")
        except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            outcome = "failed_mid_stream" if got_bytes else "failed_before_first_byte"
            return Answer(outcome, f"{type(exc).__name__}: {exc}")


def _text_of(payload: dict[str, Any]) -> str:
    """The text of a completion or chat answer, or of one of their stream chunks."""
    parts = []
    for choice in payload.get("choices") or []:
        if "text" in choice:
            parts.append(choice["text"] or "")
        else:
            message = choice.get("delta") or choice.get("message") or {}
            parts.append(message.get("content") or "")
    return "".join(parts)


# -- faults -------------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    target: str  # instance name, or "" for faults of the clients
    inject: Callable[[], None]
    lift: Callable[[], None]
    lasts_s: float  # how long the fault is left in place before lift()


def iptables_available() -> str | None:
    """None when the kv-port-refused fault can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (an iptables rule on loopback)"
    if shutil.which("iptables") is None:
        return "needs iptables (apt-get install iptables)"
    return None


def _iptables(action: str, port: int, missing_ok: bool = False) -> None:
    result = subprocess.run(
        [
            "iptables",
            action,
            "INPUT",
            "-i",
            "lo",
            "-p",
            "tcp",
            "--dport",
            str(port),
            "-m",
            "comment",
            "--comment",
            IPTABLES_TAG,
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 and not missing_ok:
        raise BenchError(f"iptables {action} failed: {result.stderr.strip()}")


def build_fault(name: str, cluster: Cluster, load: Load, args: argparse.Namespace) -> Fault:
    def signal_group(instance: str, signum: signal.Signals) -> Callable[[], None]:
        def send() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cluster.worker_pid(instance), signum)

        return send

    def nothing() -> None:
        return None

    if name == "kill-decode":
        return Fault(name, "decode-0", signal_group("decode-0", signal.SIGKILL), nothing, 0.0)
    if name == "kill-prefill":
        return Fault(name, "prefill-0", signal_group("prefill-0", signal.SIGKILL), nothing, 0.0)
    if name == "stop-decode":
        target = f"decode-{args.decode - 1}"
        return Fault(
            name,
            target,
            signal_group(target, signal.SIGSTOP),
            signal_group(target, signal.SIGCONT),
            args.stop_s,
        )
    if name == "client-disconnects":

        def every_nth() -> None:
            load.disconnect_every = args.disconnect_every

        def never() -> None:
            load.disconnect_every = 0

        return Fault(name, "", every_nth, never, args.refuse_s)
    if name == "kv-port-refused":
        port = cluster.kv_port(0)
        return Fault(
            name,
            "prefill-0",
            lambda: _iptables("-I", port),
            lambda: _iptables("-D", port, missing_ok=True),
            args.refuse_s,
        )
    raise BenchError(f"unknown fault {name!r}")


# -- one phase ----------------------------------------------------------------------------


@dataclass
class PhaseResult:
    fault: str
    target: str
    sent: int
    ok: int
    failed_before_first_byte: int
    failed_mid_stream: int
    hung: int
    disconnected_by_client: int
    kv_blocks_held_after: dict[str, int | None]
    out_of_rotation_s: float | None  # None: the instance never left the rotation
    back_in_rotation_s: float | None  # from the fault to healthy again; None: never left
    kv_handoffs: dict[str, float]
    errors: dict[str, int]
    skipped: str | None = None
    # Read again one lease later when blocks were held 5 s after the load: what is left then
    # is a leak, not a lease of a request the fault hit running out (None: not read again).
    kv_blocks_held_after_lease: dict[str, int | None] | None = None
    # Succeeded answers that differ from the fault-free cluster's answer to the same prompt.
    differs_from_fault_free: int = 0
    # Requests the proxy moved to another decode instance during the phase, by stage.
    moved: dict[str, float] = field(default_factory=dict)


def _handoffs(cluster: Cluster) -> dict[str, float]:
    from proxy.metrics import HANDOFF_OUTCOMES

    return {
        str(o): metric_sum(cluster.api, "pdserve_kv_handoffs_total", {"outcome": str(o)}) or 0.0
        for o in HANDOFF_OUTCOMES
    }


def _moves(cluster: Cluster) -> dict[str, float]:
    return {
        stage: metric_sum(cluster.api, "pdserve_migrations_total", {"stage": stage}) or 0.0
        for stage in ("before_first_byte", "mid_stream")
    }


async def wait_all_in_rotation(cluster: Cluster, urls: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            rotation = await asyncio.to_thread(cluster.rotation)
            if all(rotation.get(url) for url in urls):
                return
        if time.monotonic() > deadline:
            raise BenchError(f"instances not all back in rotation within {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


async def run_phase(
    cluster: Cluster, load: Load, fault: Fault, args: argparse.Namespace
) -> PhaseResult:
    await asyncio.sleep(args.baseline_s)
    before = await asyncio.to_thread(_handoffs, cluster)
    moves_before = await asyncio.to_thread(_moves, cluster)
    load.swap_tally()
    target_url = cluster.url(*_role_index(fault.target)) if fault.target else ""
    started = time.monotonic()
    lifted = False
    try:
        await asyncio.to_thread(fault.inject)
        deadline = started + args.max_phase_s
        left_at, back_at, lifted = await _watch(
            cluster, fault, target_url, started, deadline, args.recovery_s
        )
    finally:
        if not lifted:
            await asyncio.to_thread(fault.lift)
    tally = load.swap_tally()
    after = await asyncio.to_thread(_handoffs, cluster)
    moves_after = await asyncio.to_thread(_moves, cluster)
    return PhaseResult(
        fault=fault.name,
        target=fault.target or "clients",
        sent=tally.sent,
        ok=tally.ok,
        failed_before_first_byte=tally.failed_before_first_byte,
        failed_mid_stream=tally.failed_mid_stream,
        hung=tally.hung,
        disconnected_by_client=tally.disconnected_by_client,
        kv_blocks_held_after={},
        out_of_rotation_s=None
        if left_at is None
        else round((back_at or time.monotonic()) - left_at, 1),
        back_in_rotation_s=None if back_at is None else round(back_at - started, 1),
        kv_handoffs={k: after[k] - before[k] for k in after},
        errors=dict(tally.errors.most_common(5)),
        differs_from_fault_free=tally.differs,
        moved={k: moves_after[k] - moves_before[k] for k in moves_after},
    )


async def _watch(
    cluster: Cluster,
    fault: Fault,
    target_url: str,
    started: float,
    deadline: float,
    recovery_s: float,
) -> tuple[float | None, float | None, bool]:
    """Lift the fault when its time is up; note when the target left the proxy's rotation
    and when it came back. Returns (left_at, back_at, lifted)."""
    left_at: float | None = None
    back_at: float | None = None
    lifted = False
    while True:
        now = time.monotonic()
        if not lifted and now - started >= fault.lasts_s:
            await asyncio.to_thread(fault.lift)
            lifted = True
        if target_url:
            with contextlib.suppress(OSError, ValueError):
                healthy = (await asyncio.to_thread(cluster.rotation)).get(target_url, False)
                if not healthy and left_at is None:
                    left_at = now
                if healthy and left_at is not None and back_at is None:
                    back_at = now
        recovered = left_at is None or back_at is not None
        if lifted and recovered and now - started >= fault.lasts_s + recovery_s:
            return left_at, back_at, lifted
        if now > deadline:
            return left_at, back_at, lifted
        await asyncio.sleep(0.25)


def _role_index(name: str) -> tuple[str, int]:
    role, _, index = name.rpartition("-")
    return role, int(index)


async def run_faults(cluster: Cluster, args: argparse.Namespace) -> list[PhaseResult]:
    all_urls = [cluster.url("prefill", i) for i in range(args.prefill)] + [
        cluster.url("decode", i) for i in range(args.decode)
    ]
    results: list[PhaseResult] = []
    await wait_all_in_rotation(cluster, all_urls, args.max_phase_s)
    fault_free = await _fault_free_answers(cluster, args)
    for name in args.faults:
        if name == "kv-port-refused" and (why := iptables_available()) is not None:
            results.append(_skipped(name, "prefill-0", why))
            continue
        await wait_all_in_rotation(cluster, all_urls, args.max_phase_s)
        load = Load(cluster.api, args.concurrency, args.max_tokens, fault_free)
        await load.start()
        try:
            fault = build_fault(name, cluster, load, args)
            result = await run_phase(cluster, load, fault, args)
        finally:
            await load.stop()
        _add_late(result, load.tally)  # requests that ended while the load stopped
        await asyncio.sleep(5.0)
        result.kv_blocks_held_after = await _blocks_held(cluster, args.prefill)
        if _held(result):
            await asyncio.sleep(DEFAULT_LEASE_S)
            result.kv_blocks_held_after_lease = await _blocks_held(cluster, args.prefill)
        print(format_row(result), flush=True)
        results.append(result)
    return results


async def _fault_free_answers(
    cluster: Cluster, args: argparse.Namespace
) -> dict[tuple[str, int], str]:
    load = Load(cluster.api, args.concurrency, args.max_tokens)
    try:
        return await load.fault_free_answers()
    finally:
        await load.stop()


def _add_late(result: PhaseResult, tally: Tally) -> None:
    result.sent += tally.sent
    result.ok += tally.ok
    result.failed_before_first_byte += tally.failed_before_first_byte
    result.failed_mid_stream += tally.failed_mid_stream
    result.hung += tally.hung
    result.disconnected_by_client += tally.disconnected_by_client
    result.differs_from_fault_free += tally.differs
    for error, count in tally.errors.items():
        result.errors[error] = result.errors.get(error, 0) + count


async def _blocks_held(cluster: Cluster, prefill: int) -> dict[str, int | None]:
    return {
        f"prefill-{i}": await asyncio.to_thread(kv_blocks_held, cluster.url("prefill", i))
        for i in range(prefill)
    }


def _skipped(name: str, target: str, why: str) -> PhaseResult:
    return PhaseResult(name, target, 0, 0, 0, 0, 0, 0, {}, None, None, {}, {}, skipped=why)


# -- report -------------------------------------------------------------------------------

HEADER = (
    f"{'fault':<20} {'target':<10} {'sent':>5} {'ok':>5} {'fail<1B':>7} {'fail-mid':>8} "
    f"{'hung':>4} {'client-gone':>11} {'differs':>7} {'moved<1B':>8} {'moved-mid':>9} "
    f"{'recomputed':>10} {'kv-held-5s':>10} {'+lease':>6} {'back-in':>8}"
)


def format_row(r: PhaseResult) -> str:
    if r.skipped:
        return f"{r.fault:<20} {r.target:<10} skipped: {r.skipped}"
    back = _back_text(r) or "-"
    later = "-" if r.kv_blocks_held_after_lease is None else str(_held(r, after_lease=True))
    return (
        f"{r.fault:<20} {r.target:<10} {r.sent:>5} {r.ok:>5} {r.failed_before_first_byte:>7} "
        f"{r.failed_mid_stream:>8} {r.hung:>4} {r.disconnected_by_client:>11} "
        f"{r.differs_from_fault_free:>7} {int(r.moved.get('before_first_byte', 0)):>8} "
        f"{int(r.moved.get('mid_stream', 0)):>9} "
        f"{int(r.kv_handoffs.get('recomputed', 0)):>10} {_held(r):>10} {later:>6} {back:>8}"
    )


def _back_text(r: PhaseResult) -> str:
    """How long the target was out of rotation: '' if it never left."""
    if r.back_in_rotation_s is not None:
        return f"{r.back_in_rotation_s:.1f} s"
    if r.out_of_rotation_s is not None:
        return f">{r.out_of_rotation_s:.0f} s"  # not back when the phase ended
    return ""


def format_table(results: list[PhaseResult]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in results)])


def plot(results: list[PhaseResult], path: Path) -> bool:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ModuleNotFoundError:
        return False
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    shown = [r for r in results if not r.skipped]
    parts = (
        ("ok", "succeeded", "#4c9a2a"),
        ("disconnected_by_client", "left by the client", "#9aa5b1"),
        ("failed_before_first_byte", "failed before 1st byte", "#e3a21a"),
        ("failed_mid_stream", "failed mid-stream", "#d9534f"),
        ("hung", "hung", "#000000"),
    )
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [f"{r.fault}\n({r.target})" for r in shown]
    bottom = [0.0] * len(shown)
    for attr, label, colour in parts:
        values = [getattr(r, attr) / max(r.sent, 1) * 100 for r in shown]
        ax.bar(names, values, bottom=bottom, label=label, color=colour)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, r in enumerate(shown):
        held = f"{_held(r)}"
        if r.kv_blocks_held_after_lease is not None:
            held += f" ({_held(r, after_lease=True)} a lease later)"
        back = _back_text(r)
        label = f"n={r.sent}, differ {r.differs_from_fault_free}\nKV held {held}"
        label += f"\nback in {back}" if back else ""
        ax.text(i, 101, label, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 130)
    ax.set_ylabel("% of requests sent during the phase")
    ax.set_title("pdserve under one fault at a time (2P2D, steady mixed load)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local HF model directory (default: tiny)")
    parser.add_argument("--prefill", type=int, default=2, help="prefill instances (default 2)")
    parser.add_argument("--decode", type=int, default=2, help="decode instances (default 2)")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order (default {','.join(FAULTS)})",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="clients (default 4)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--baseline-s", type=float, default=5.0, help="load before each fault")
    parser.add_argument(
        "--recovery-s",
        type=float,
        default=15.0,
        help="load after the fault is lifted and the instance is back (default 15: more "
        "than the KV lease, so blocks of requests the fault hit have expired)",
    )
    parser.add_argument(
        "--max-phase-s",
        type=float,
        default=900.0,
        help="longest wait for a killed instance to be back in rotation (default 900: on two "
        "shared cores a vLLM restart under load takes 4-7 minutes)",
    )
    parser.add_argument("--stop-s", type=float, default=20.0, help="SIGSTOP length (default 20)")
    parser.add_argument("--refuse-s", type=float, default=20.0, help="KV port refused for")
    parser.add_argument("--disconnect-every", type=int, default=3)
    parser.add_argument("--ready-timeout-s", type=float, default=1200.0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1P1D, faults {','.join(QUICK_FAULTS)}, short phases",
    )
    parser.add_argument("--out", default="benchmarks/results/faults.json")


def _apply_quick(args: argparse.Namespace) -> None:
    if not args.quick:
        return
    args.prefill = args.decode = 1
    args.faults = ",".join(QUICK_FAULTS)
    args.baseline_s = 2.0
    args.recovery_s = 12.0
    args.stop_s = 5.0
    args.refuse_s = 5.0
    args.concurrency = 2


def run(args: argparse.Namespace) -> int:
    _apply_quick(args)
    args.faults = [f.strip() for f in str(args.faults).split(",") if f.strip()]
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        raise CliError(f"--faults: unknown {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    if args.prefill < 1 or args.decode < 1:
        raise CliError("--prefill and --decode must be >= 1")
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise CliError(f"--model: {args.model} has no config.json")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"starting pdserve up: {args.prefill}P{args.decode}D ...", flush=True)
    try:
        cluster = start_cluster(args.prefill, args.decode, args.model, args.ready_timeout_s)
    except BenchError as exc:
        raise CliError(str(exc)) from None
    print(f"cluster ready in {time.monotonic() - started:.0f} s\n{HEADER}", flush=True)
    try:
        results = asyncio.run(run_faults(cluster, args))
    except BenchError as exc:
        raise CliError(str(exc)) from None
    finally:
        stop_cluster(cluster)
    report = {
        "benchmark": "faults",
        "topology": f"{args.prefill}P{args.decode}D",
        "model": args.model or "tiny (generated)",
        "concurrency": args.concurrency,
        "proxy_leg_timeouts_s": LEG_TIMEOUT_S,
        "proxy_stall_s": STALL_S,
        "prompts_per_kind": PROMPTS,
        "hang_limit_s": HANG_LIMIT_S,
        "phases": [asdict(r) for r in results],
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = out.with_suffix(".png")
    drew = plot(results, png)
    print(f"\n{format_table(results)}\n\nwrote {out}" + (f" and {png}" if drew else ""))
    bad = [
        r.fault
        for r in results
        if r.hung or r.differs_from_fault_free or _held(r, after_lease=True)
    ]
    if bad:
        print(
            "FAILED: hung requests, answers that differ from the fault-free run, or KV blocks "
            f"held past their lease after: {', '.join(bad)}"
        )
        return 1
    return 0


def _held(result: PhaseResult, after_lease: bool = False) -> int:
    """Blocks held 5 s after the phase's load, or (``after_lease``) one lease later."""
    held = result.kv_blocks_held_after
    if after_lease:
        held = result.kv_blocks_held_after_lease or {}
    return sum(v for v in held.values() if v is not None)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
