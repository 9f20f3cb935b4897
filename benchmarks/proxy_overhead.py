"""What the proxy adds: latency at concurrency 1 and 64, and its own CPU per request.

Starts a fake prefill worker and a fake decode worker (``benchmarks.fake_worker``)
and the real proxy (``pdserve proxy``) as separate processes on loopback, then for
each mode (non-stream, stream) and concurrency runs the same closed-loop load

* directly against the fake decode worker (one hop: the floor), and
* through the proxy (prefill leg, then decode leg),

and reports p50/p99 latency of both, the difference ("added"), and the proxy's CPU
time per request: utime + stime of the proxy process (all threads, plus any child
processes) from ``/proc/<pid>/stat`` before and after, divided by the requests.

Target ``proxy-nomig`` is a second pdserve proxy with ``retries.mid_stream: false``,
measured in the same rounds: the CPU the mid-stream migration's bookkeeping costs a
streamed request is the difference between ``proxy`` and it (``mid_stream_cpu`` in the
JSON, the last table).

Load client: ``wrk`` when installed (C, cheap, the method behind the peer figures in
the project's performance notes; latency is end to end, stream or not), else the
aiohttp client of :mod:`benchmarks.loadgen`, which also measures TTFT. Choose with
``--client``. Everything is bounded in time and stops by itself; every process it
starts is stopped on exit, also on Ctrl-C.

    pdserve bench proxy [--duration 10] [--concurrency 1,64] [--out PATH]
    python -m benchmarks.proxy_overhead --help
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadSpec, run_load
from deploy.worker_launch import free_port, stop_process_group

DEFAULT_OUT = Path("benchmarks/results/proxy_overhead.json")
# Like the peer runs: a 12-word prompt, 16 output tokens (16 SSE content chunks).
DEFAULT_PROMPT = "Explain in one short paragraph why the sky looks blue on a clear day."
MODES = ("nonstream", "stream")
TARGETS = ("proxy", "proxy-nomig", "baseline")
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(Exception):
    """The benchmark cannot run (a process failed to start, a tool is missing)."""


# -- processes ----------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Services:
    """Processes this benchmark started; each runs in its own process group."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Service] = []

    def start(self, name: str, argv: list[str], url: str) -> Service:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        service = Service(name, url, process, log_path)
        self.running.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.running):
            stop_process_group(service.process, grace_s=5.0, kill_wait_s=5.0)
        self.running.clear()


def wait_ready(service: Service, probe: str, timeout_s: float, body: bytes | None = None) -> None:
    """Poll ``probe`` until it answers 200; fail with the service's log tail otherwise."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise BenchError(
                f"{service.name} exited with status {service.process.returncode}:\n"
                f"{service.log_tail()}"
            )
        request = urllib.request.Request(
            service.url + probe,
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST" if body is not None else "GET",
        )
        try:
            with urllib.request.urlopen(request, timeout=2.0) as response:
                if response.status == 200:
                    response.read()
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise BenchError(
        f"{service.name} at {service.url}{probe} not ready after {timeout_s:g}s ({last}):\n"
        f"{service.log_tail()}"
    )


# -- CPU accounting -------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        tree.extend(frontier)
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # exited: its time is lost, which only under-reports
        # Fields after the command name (which may hold spaces): state is field 3,
        # utime and stime are fields 14 and 15.
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


# -- load clients ---------------------------------------------------------------------------


@dataclass
class RunResult:
    target: str  # direct | proxy | baseline
    mode: str  # nonstream | stream
    concurrency: int
    client: str
    requests: int
    errors: int
    requests_per_s: float
    # Milliseconds. latency = end to end (for stream: last byte).
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    proxy_cpu_us_per_request: float | None = None
    workers_cpu_us_per_request: float | None = None
    error_samples: list[str] = field(default_factory=list)
    round: int = 0


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def request_body(api: str, stream: bool, prompt: str, max_tokens: int, model: str) -> bytes:
    return LoadSpec(
        base_url="http://unused",
        api="chat" if api == "chat" else "completions",
        stream=stream,
        prompt=prompt,
        max_tokens=max_tokens,
        model=model,
    ).body()


def aiohttp_spec(
    url: str, mode: str, concurrency: int, duration_s: float, args: argparse.Namespace
) -> LoadSpec:
    return LoadSpec(
        base_url=url,
        api=args.api,
        stream=mode == "stream",
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_per_worker=0,
        model=args.model,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        timeout_s=30.0,
    )


def warm_aiohttp(url: str, mode: str, concurrency: int, args: argparse.Namespace) -> None:
    import uvloop

    spec = aiohttp_spec(url, mode, concurrency, 1.0, args)
    spec.duration_s, spec.requests = None, 5 * concurrency
    uvloop.run(run_load(spec))


def run_aiohttp(
    url: str, mode: str, concurrency: int, duration_s: float, args: argparse.Namespace
) -> RunResult:
    import uvloop

    result = uvloop.run(run_load(aiohttp_spec(url, mode, concurrency, duration_s, args)))
    e2e, ttft = result.e2e, result.ttft
    return RunResult(
        target="",
        mode=mode,
        concurrency=concurrency,
        client="aiohttp",
        requests=result.requests,
        errors=result.errors,
        requests_per_s=result.requests_per_s,
        p50_ms=_ms(e2e.p50) if e2e else None,
        p90_ms=_ms(e2e.p90) if e2e else None,
        p99_ms=_ms(e2e.p99) if e2e else None,
        ttft_p50_ms=_ms(ttft.p50) if ttft else None,
        ttft_p99_ms=_ms(ttft.p99) if ttft else None,
        error_samples=result.error_samples,
    )


_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "PDSERVE_RESULT {{\\"requests\\": %d, \\"duration_us\\": %d, \\"status_errors\\": %d, "
    .. "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"timeout\\": %d, "
    .. "\\"p50_us\\": %d, \\"p90_us\\": %d, \\"p99_us\\": %d}}\\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def _lua_string(data: bytes) -> str:
    return "[==[" + data.decode() + "]==]"


def _wrk(
    url: str,
    mode: str,
    concurrency: int,
    seconds: int,
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    body = request_body(args.api, mode == "stream", args.prompt, args.max_tokens, args.model)
    script = workdir / f"wrk_{mode}.lua"
    script.write_text(_WRK_SCRIPT.format(body=_lua_string(body)))
    path = "/v1/completions" if args.api == "completions" else "/v1/chat/completions"
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s"]
    argv += ["-s", str(script), url + path]
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    for line in completed.stdout.splitlines():
        if line.startswith("PDSERVE_RESULT "):
            parsed: dict[str, Any] = json.loads(line.removeprefix("PDSERVE_RESULT "))
            return parsed
    raise BenchError(f"wrk gave no result (status {completed.returncode}): {completed.stderr}")


def warm_wrk(
    url: str, mode: str, concurrency: int, args: argparse.Namespace, workdir: Path
) -> None:
    _wrk(url, mode, concurrency, 1, args, workdir)


def run_wrk(
    url: str,
    mode: str,
    concurrency: int,
    duration_s: float,
    args: argparse.Namespace,
    workdir: Path,
) -> RunResult:
    stats = _wrk(url, mode, concurrency, max(1, round(duration_s)), args, workdir)
    errors = sum(stats[k] for k in ("status_errors", "connect", "read", "write", "timeout"))
    return RunResult(
        target="",
        mode=mode,
        concurrency=concurrency,
        client="wrk",
        requests=stats["requests"],
        errors=errors,
        requests_per_s=stats["requests"] / (stats["duration_us"] / 1e6),
        p50_ms=stats["p50_us"] / 1000.0,
        p90_ms=stats["p90_us"] / 1000.0,
        p99_ms=stats["p99_us"] / 1000.0,
        error_samples=[f"wrk errors: {stats}"] if errors else [],
    )


# -- baseline -----------------------------------------------------------------------------
# A deliberately plain aiohttp + uvloop PD proxy (pooled keep-alive session, P then D,
# D's body relayed chunk by chunk, no health, metrics or policies). It is the "plain
# aiohttp proxy" the project must beat, measured in the same run on the same box, so
# the comparison does not depend on how busy the machine was on another day.


def _baseline_app(prefill_url: str, decode_url: str) -> Any:
    import aiohttp
    import orjson
    from aiohttp import web

    state: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        state["session"] = aiohttp.ClientSession(connector=connector)

    async def on_cleanup(app: web.Application) -> None:
        await state["session"].close()

    async def generate(request: web.Request) -> web.StreamResponse:
        session = state["session"]
        body = orjson.loads(await request.read())
        prefill = dict(body)
        prefill.update(stream=False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        prefill.pop("stream_options", None)
        async with session.post(prefill_url + request.path, data=orjson.dumps(prefill)) as p:
            params = orjson.loads(await p.read())["kv_transfer_params"]
        body["kv_transfer_params"] = params
        async with session.post(decode_url + request.path, data=orjson.dumps(body)) as d:
            response = web.StreamResponse(status=d.status)
            response.content_type = d.content_type
            await response.prepare(request)
            async for chunk in d.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/health", health)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def baseline_proxy_main(argv: Sequence[str] | None = None) -> None:
    """``python -c 'from benchmarks.proxy_overhead import baseline_proxy_main as m; m()' ...``"""
    import uvloop
    from aiohttp import web

    parser = argparse.ArgumentParser(prog="baseline-proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefill", required=True)
    parser.add_argument("--decode", required=True)
    args = parser.parse_args(argv)
    uvloop.install()
    web.run_app(
        _baseline_app(args.prefill, args.decode),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
    )


def baseline_argv(port: int, prefill_url: str, decode_url: str) -> list[str]:
    code = "from benchmarks.proxy_overhead import baseline_proxy_main as m; m()"
    argv = [sys.executable, "-c", code, "--port", str(port)]
    return [*argv, "--prefill", prefill_url, "--decode", decode_url]


# -- profiling ----------------------------------------------------------------------------


def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Sample the proxy's on-CPU Python stacks for ``seconds`` (py-spy exits by itself)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise BenchError("--py-spy: py-spy is not installed (pip install py-spy)")
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking"]
    argv += ["--format", "raw", "--duration", str(max(1, round(seconds))), "--output", str(out)]
    # Its own group, so stop_process_group reaches it if it overstays.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def summarize_stacks(path: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Top frames by self and by inclusive share of samples, from py-spy's raw output."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"self": [], "inclusive": []}
    return {
        "self": [(f, 100.0 * c / total) for f, c in self_counts.most_common(top)],
        "inclusive": [(f, 100.0 * c / total) for f, c in inclusive.most_common(top)],
    }


# -- the benchmark --------------------------------------------------------------------------


def fake_worker_argv(role: str, port: int, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.fake_worker", "--role", role]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--model", args.model]
    if role == "decode" and args.token_delay_ms:
        argv += ["--token-delay-ms", str(args.token_delay_ms)]
    return argv


def proxy_argv(
    port: int, prefill_url: str, decode_url: str, config_path: Path, args: argparse.Namespace
) -> list[str]:
    argv = [sys.executable, "-m", "deploy.cli", "proxy", "--config", str(config_path)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    argv += ["--prefill", prefill_url, "--decode", decode_url]
    argv += ["--prefill-policy", args.prefill_policy, "--decode-policy", args.decode_policy]
    return argv


# Only what the flags cannot say: no admin listener (no fixed port to collide on).
_PROXY_CONFIG = "proxy:\n  admin:\n    port: null\n"
_NO_MIGRATION_CONFIG = _PROXY_CONFIG + "  retries:\n    mid_stream: false\n"


def choose_client(requested: str) -> str:
    has_wrk = shutil.which("wrk") is not None
    if requested == "wrk" and not has_wrk:
        raise BenchError("--client wrk: wrk is not installed (Debian: apt-get install -y wrk)")
    if requested == "auto":
        if has_wrk:
            return "wrk"
        print(
            "wrk not found (Debian: apt-get install -y wrk); using the aiohttp client",
            file=sys.stderr,
        )
        return "aiohttp"
    return requested


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP become KeyboardInterrupt so the finally-blocks stop our processes."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    client = choose_client(args.client)
    workdir = Path(tempfile.mkdtemp(prefix="pdserve-bench-proxy-"))
    services = Services(workdir)
    results: list[RunResult] = []
    profiles: dict[str, Any] = {}
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        with _terminate_on_signals():
            prefill_port, decode_port, proxy_port = free_port(), free_port(), free_port()
            baseline_port = free_port()
            prefill = services.start(
                "fake-prefill",
                fake_worker_argv("prefill", prefill_port, args),
                f"http://127.0.0.1:{prefill_port}",
            )
            decode = services.start(
                "fake-decode",
                fake_worker_argv("decode", decode_port, args),
                f"http://127.0.0.1:{decode_port}",
            )
            config_path = workdir / "proxy.yaml"
            config_path.write_text(_PROXY_CONFIG)
            proxy = services.start(
                "proxy",
                proxy_argv(proxy_port, prefill.url, decode.url, config_path, args),
                f"http://127.0.0.1:{proxy_port}",
            )
            proxies = {"proxy": proxy}
            if "proxy-nomig" in args.targets:
                nomig_port = free_port()
                nomig_config = workdir / "proxy-nomig.yaml"
                nomig_config.write_text(_NO_MIGRATION_CONFIG)
                proxies["proxy-nomig"] = services.start(
                    "proxy-nomig",
                    proxy_argv(nomig_port, prefill.url, decode.url, nomig_config, args),
                    f"http://127.0.0.1:{nomig_port}",
                )
            if "baseline" in args.targets:
                proxies["baseline"] = services.start(
                    "baseline-proxy",
                    baseline_argv(baseline_port, prefill.url, decode.url),
                    f"http://127.0.0.1:{baseline_port}",
                )
            probe = request_body(args.api, False, args.prompt, args.max_tokens, args.model)
            path = "/v1/completions" if args.api == "completions" else "/v1/chat/completions"
            for service in (prefill, decode):
                wait_ready(service, "/health", args.startup_timeout)
            wait_ready(decode, path, args.startup_timeout, probe)
            for service in proxies.values():
                wait_ready(service, "/health", args.startup_timeout)
                # A proxy is ready for traffic when a full PD request goes through.
                wait_ready(service, path, args.startup_timeout, probe)
            targets = [("direct", decode)] + [
                (name, proxies[name]) for name in TARGETS if name in proxies
            ]

            # Rounds alternate the targets point by point, so slow drift in what else
            # runs on the box hits direct, proxy and baseline alike.
            points = itertools.product(args.modes, args.concurrency, range(args.repeat), targets)
            for mode, concurrency, round_index, (target, service) in points:
                duration = args.duration if concurrency > 1 else args.duration_c1
                print(
                    f"  {target:<11} {mode:<9} c={concurrency:<3} {duration:g}s "
                    f"round {round_index + 1}/{args.repeat} ...",
                    file=sys.stderr,
                    flush=True,
                )
                # Warm-up (connections, the proxy's upstream pool) stays
                # outside the CPU window.
                if client == "wrk":
                    warm_wrk(service.url, mode, concurrency, args, workdir)
                else:
                    warm_aiohttp(service.url, mode, concurrency, args)
                proxy_pids = process_tree(service.process.pid)
                worker_pids = process_tree(prefill.process.pid) + process_tree(decode.process.pid)
                proxy_cpu, worker_cpu = cpu_seconds(proxy_pids), cpu_seconds(worker_pids)
                profiler = None
                if args.py_spy and target != "direct" and round_index == 0:
                    stacks = args.py_spy / f"{target}-{mode}-c{concurrency}.txt"
                    profiler = start_py_spy(service.process.pid, duration, stacks)
                if client == "wrk":
                    result = run_wrk(service.url, mode, concurrency, duration, args, workdir)
                else:
                    result = run_aiohttp(service.url, mode, concurrency, duration, args)
                proxy_cpu = cpu_seconds(proxy_pids) - proxy_cpu
                worker_cpu = cpu_seconds(worker_pids) - worker_cpu
                if profiler is not None:
                    profiles[f"{target}-{mode}-c{concurrency}"] = _finish_profile(
                        profiler, stacks, duration
                    )
                result.target, result.round = target, round_index
                if result.requests:
                    if target != "direct":
                        result.proxy_cpu_us_per_request = proxy_cpu / result.requests * 1e6
                    result.workers_cpu_us_per_request = worker_cpu / result.requests * 1e6
                results.append(result)
                for running in proxies.values():
                    if running.process.poll() is not None:
                        raise BenchError(f"{running.name} exited:\n{running.log_tail()}")
    finally:
        services.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "proxy_overhead",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "config": {
            "client": client,
            "api": args.api,
            "prompt": args.prompt,
            "max_tokens": args.max_tokens,
            "duration_s": args.duration,
            "duration_c1_s": args.duration_c1,
            "token_delay_ms": args.token_delay_ms,
            "prefill_policy": args.prefill_policy,
            "decode_policy": args.decode_policy,
            "targets": ["direct", *args.targets],
            "repeat": args.repeat,
        },
        "runs": [asdict(result) for result in results],
        "added": added_latency(results),
        "mid_stream_cpu": mid_stream_cpu(results),
        # Present with --py-spy; the sampler shares the cores, so those runs' figures are
        # perturbed: profile and measure in separate runs.
        "profiles": profiles,
    }


def _finish_profile(profiler: subprocess.Popen[bytes], stacks: Path, duration: float) -> Any:
    try:
        _, stderr = profiler.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        stop_process_group(profiler, grace_s=5.0, kill_wait_s=5.0)
        return {"error": "py-spy did not finish"}
    if profiler.returncode != 0 or not stacks.exists():
        return {"error": f"py-spy failed: {stderr.decode(errors='replace')[-300:]}"}
    return {"stacks": str(stacks), **summarize_stacks(stacks)}


def _median(values: Sequence[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    middle = len(present) // 2
    if len(present) % 2:
        return present[middle]
    return (present[middle - 1] + present[middle]) / 2


def added_latency(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per proxied target and point: medians over rounds, minus direct's medians."""
    groups: dict[tuple[str, str, int], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.target, result.mode, result.concurrency), []).append(result)

    def median_of(runs: Sequence[RunResult], key: str) -> float | None:
        return _median([getattr(run, key) for run in runs])

    rows = []
    for (target, mode, concurrency), runs in groups.items():
        base = groups.get(("direct", mode, concurrency))
        if target == "direct" or base is None:
            continue
        row: dict[str, Any] = {
            "target": target,
            "mode": mode,
            "concurrency": concurrency,
            "rounds": len(runs),
        }
        for key in ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
            a, b = median_of(runs, key), median_of(base, key)
            row[f"added_{key}"] = None if a is None or b is None else a - b
        row["proxy_cpu_us_per_request"] = median_of(runs, "proxy_cpu_us_per_request")
        row["proxy_requests_per_s"] = median_of(runs, "requests_per_s")
        row["direct_requests_per_s"] = median_of(base, "requests_per_s")
        rows.append(row)
    return rows


def mid_stream_cpu(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per mode and concurrency: the proxy's CPU per request with mid-stream migration on
    (``proxy``) and off (``proxy-nomig``), medians over rounds, and how much more "on" costs."""
    cpu: dict[tuple[str, str, int], list[float | None]] = {}
    for result in results:
        key = (result.target, result.mode, result.concurrency)
        cpu.setdefault(key, []).append(result.proxy_cpu_us_per_request)
    rows = []
    for (target, mode, concurrency), values in cpu.items():
        if target != "proxy" or ("proxy-nomig", mode, concurrency) not in cpu:
            continue
        on, off = _median(values), _median(cpu["proxy-nomig", mode, concurrency])
        rows.append(
            {
                "mode": mode,
                "concurrency": concurrency,
                "on_us_per_request": on,
                "off_us_per_request": off,
                "increase_pct": None if not (on and off) else (on / off - 1) * 100,
            }
        )
    return rows


def format_table(report: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = (
        f"{'target':<11} {'mode':<9} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'ttft50':>8} {'ttft99':>8} {'proxy µs/req':>12} {'errors':>6}"
    )
    lines = [f"client: {report['config']['client']}", header, "-" * len(header)]
    for run in report["runs"]:
        lines.append(
            f"{run['target']:<11} {run['mode']:<9} {run['concurrency']:>4} "
            f"{run['requests_per_s']:>8.0f} {num(run['p50_ms']):>8} {num(run['p99_ms']):>8} "
            f"{num(run['ttft_p50_ms']):>8} {num(run['ttft_p99_ms']):>8} "
            f"{num(run['proxy_cpu_us_per_request'], 0):>12} {run['errors']:>6}"
        )
    lines.append("")
    added_header = (
        f"{'added over direct':<18} {'mode':<9} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'ttft50':>8} {'ttft99':>8} {'proxy µs/req':>12}"
    )
    lines += [added_header, "-" * len(added_header)]
    for row in report["added"]:
        lines.append(
            f"{row['target']:<18} {row['mode']:<9} {row['concurrency']:>4} "
            f"{num(row['added_p50_ms']):>8} "
            f"{num(row['added_p99_ms']):>8} {num(row['added_ttft_p50_ms']):>8} "
            f"{num(row['added_ttft_p99_ms']):>8} {num(row['proxy_cpu_us_per_request'], 0):>12}"
        )
    if report.get("mid_stream_cpu"):
        mig_header = (
            f"{'mid-stream migration':<20} {'mode':<9} {'conc':>4} {'on µs/req':>10} "
            f"{'off µs/req':>10} {'increase':>8}"
        )
        lines += ["", mig_header, "-" * len(mig_header)]
        for row in report["mid_stream_cpu"]:
            increase = row["increase_pct"]
            lines.append(
                f"{'proxy on vs off':<20} {row['mode']:<9} {row['concurrency']:>4} "
                f"{num(row['on_us_per_request'], 0):>10} {num(row['off_us_per_request'], 0):>10} "
                f"{'-' if increase is None else f'{increase:+.1f} %':>8}"
            )
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,64, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return modes


def _targets(text: str) -> list[str]:
    targets = [part.strip() for part in text.split(",") if part.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if not targets or bad or "proxy" not in targets:
        raise argparse.ArgumentTypeError(
            f"targets are proxy[,proxy-nomig][,baseline]; got {text!r}"
        )
    return targets


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=_int_list, default=[1, 64], help="default 1,64")
    parser.add_argument("--modes", type=_modes, default=list(MODES), help="nonstream,stream")
    parser.add_argument(
        "--duration", type=_positive, default=10.0, help="seconds per run at concurrency > 1"
    )
    parser.add_argument(
        "--duration-c1", type=_positive, default=5.0, help="seconds per run at concurrency 1"
    )
    parser.add_argument(
        "--targets",
        type=_targets,
        default=["proxy", "baseline"],
        help="proxies to measure besides direct: proxy (pdserve), proxy-nomig (pdserve with "
        "retries.mid_stream: false, for the migration's CPU cost in the same run), baseline "
        "(a plain aiohttp PD proxy, for a same-machine comparison); default proxy,baseline",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds per point; the summary takes medians"
    )
    parser.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto")
    parser.add_argument("--api", choices=["completions", "chat"], default="completions")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="pdserve-bench")
    parser.add_argument(
        "--token-delay-ms", type=float, default=0.0, help="fake decode pacing per token"
    )
    parser.add_argument("--prefill-policy", default="prefill_cost")
    parser.add_argument("--decode-policy", default="least_load")
    parser.add_argument("--startup-timeout", type=_positive, default=30.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        default=None,
        help="sample the proxy with py-spy during its runs, raw stacks into DIR "
        "(perturbs the figures; use for finding hot spots)",
    )


def run(args: argparse.Namespace) -> int:
    from deploy.cli import CliError

    if args.max_tokens < 1:
        raise CliError("--max-tokens must be >= 1")
    if args.repeat < 1:
        raise CliError("--repeat must be >= 1")
    if not Path("/proc/self/stat").exists():
        raise CliError("this benchmark reads CPU time from /proc and needs Linux")
    try:
        report = run_benchmark(args)
    except BenchError as exc:
        raise CliError(str(exc)) from None
    print(format_table(report))
    # Our own processes load the box during the runs, so only the figure from before says
    # whether other work was competing for the cores.
    before = report["machine"]["load_average_before"][0]
    if before > 1.0:
        print(
            f"\nnote: load average was {before:.1f} before the runs: other work shared the "
            "cores, so the figures are noisy; compare proxy with baseline, or rerun"
        )
    for name, profile in report["profiles"].items():
        print(f"\nhot spots, {name} (% of on-CPU samples, self):")
        for frame, share in profile.get("self", [])[:12]:
            print(f"  {share:5.1f}%  {frame}")
        if "error" in profile:
            print(f"  {profile['error']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    failed = [r for r in report["runs"] if r["errors"] or not r["requests"]]
    if failed:
        print(f"{len(failed)} run(s) had errors; see error_samples in the JSON", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.proxy_overhead", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    from deploy.cli import CliError

    try:
        return run(args)
    except CliError as exc:
        print(f"proxy_overhead: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
