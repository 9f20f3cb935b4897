"""Session fixtures shared by the whole suite: the tiny model and real engines.

Every engine fixture starts its vLLM server at most once per session, only when a test asks for
it, and stops it at session end. Engines start in parallel where it is safe: each fixture first
launches its process and only then waits, so ``real_proxy`` pays for one engine start, not two.

Engines are started through ``python -m deploy.worker_cli`` (the ``pdserve worker`` command),
each bound to its own core with 1 GiB of KV cache; at teardown the command gets SIGTERM and the
fixture checks that no process of the server's group is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.tiny_model import make_tiny_model
from deploy.worker_launch import port_is_free, wait_until_ready

# P and D must agree on these; the aggregated baseline uses the same so outputs can match.
ENGINE_BLOCK_SIZE = 32
# float32 keeps greedy decoding exact across batch shapes (bfloat16 flips near-ties).
ENGINE_DTYPE = "float32"
MODEL_NAME = "tiny"
KV_SECRET = "pdserve-test-secret"
ENGINE_START_TIMEOUT_S = 600.0
PROCESS_GRACE_S = 30.0

_ENGINE_TIMINGS = pytest.StashKey[dict[str, float]]()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick, so parallel sessions do not collide)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port_is_free(host, port):
            return port


@dataclass
class RunningServer:
    """A server the fixtures started: its URL, log and process (a pdserve command)."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)
    start_seconds: float = 0.0

    def get(self, path: str, timeout_s: float = 10.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
            body: bytes = response.read()
            return body

    def post_json(self, path: str, body: dict[str, object], timeout_s: float = 120.0) -> dict:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            result: dict = json.loads(response.read())
            return result

    def metrics_text(self) -> str:
        return self.get("/metrics").decode()

    def metric(self, name: str) -> float | None:
        """Sum of all samples named ``name`` on /metrics (None if there is none)."""
        from prometheus_client.parser import text_string_to_metric_families

        total: float | None = None
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name:
                    total = (total or 0.0) + sample.value
        return total

    def server_group(self) -> int | None:
        """The process group of the vLLM server the command started (its child)."""
        for child in _children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                return os.getpgid(child)
        return None


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(part) for part in path.read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class ServerLauncher:
    """Starts commands in their own session and guarantees they are gone at the end."""

    def __init__(self, log_dir: Path, timings: dict[str, float]) -> None:
        self.log_dir = log_dir
        self.timings = timings
        self._servers: list[RunningServer] = []
        self._groups: dict[str, int] = {}

    def launch(self, name: str, argv: list[str], url: str, **extra: object) -> RunningServer:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        server = RunningServer(name=name, url=url, proc=proc, log_path=log_path, extra=extra)
        server.start_seconds = time.monotonic()
        self._servers.append(server)
        return server

    def wait_ready(self, server: RunningServer, probe: str = "/v1/models") -> RunningServer:
        if server.name in self.timings:
            return server
        started = server.start_seconds
        try:
            _wait_http(server, probe, ENGINE_START_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{server.name} did not start: {exc}\n{_tail(server.log_path)}")
        self.timings[server.name] = time.monotonic() - started
        group = server.server_group()
        if group is not None:
            self._groups[server.name] = group
        return server

    def stop(self, server: RunningServer) -> list[str]:
        """SIGTERM the command; return problems found (leftover processes, bad exit)."""
        problems: list[str] = []
        group = self._groups.get(server.name) or server.server_group()
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=PROCESS_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            problems.append(f"{server.name}: did not exit within {PROCESS_GRACE_S + 10:.0f} s")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        if group is not None:
            deadline = time.monotonic() + 5.0
            while _group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_alive(group):
                problems.append(f"{server.name}: processes of group {group} outlived SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        if server.proc.returncode not in (0, -signal.SIGTERM):
            problems.append(f"{server.name}: exit status {server.proc.returncode}")
        return problems

    def stop_all(self) -> list[str]:
        problems: list[str] = []
        for server in reversed(self._servers):
            problems += self.stop(server)
        self._servers.clear()
        return problems


def _wait_http(server: RunningServer, probe: str, timeout_s: float) -> None:
    if probe == "/v1/models":
        wait_until_ready(server.url, timeout_s, proc=server.proc, log_path=server.log_path)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"exited with status {server.proc.returncode}")
        try:
            server.get(probe, timeout_s=2.0)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{server.url}{probe} not answering after {timeout_s:.0f} s")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ENGINE_TIMINGS] = {}
    # A SIGTERM to pytest (CI cancel) must still run fixture teardown, or engines would survive
    # in their own sessions.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    timings = terminalreporter.config.stash.get(_ENGINE_TIMINGS, {})
    if timings:
        terminalreporter.section("server start times")
        for name, seconds in timings.items():
            terminalreporter.write_line(f"{name}: ready {seconds:.1f} s after launch")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated tiny Llama model directory (made once per session)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def engine_block_size() -> int:
    return ENGINE_BLOCK_SIZE


@pytest.fixture(scope="session")
def server_launcher(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerLauncher]:
    launcher = ServerLauncher(
        tmp_path_factory.mktemp("server-logs"), request.config.stash[_ENGINE_TIMINGS]
    )
    try:
        yield launcher
    finally:
        problems = launcher.stop_all()
    if problems:
        pytest.fail("server shutdown: " + "; ".join(problems))


def _worker_argv(role: str, model: Path, port: int, core: int, kv_port: int | None) -> list[str]:
    argv = [
        sys.executable, "-m", "deploy.worker_cli", role,
        "--model", str(model),
        "--port", str(port),
        "--cpu-core", str(core),
        "--kv-cache-gib", "1",
        "--block-size", str(ENGINE_BLOCK_SIZE),
        "--dtype", ENGINE_DTYPE,
        "--served-model-name", MODEL_NAME,
        "--kv-secret", KV_SECRET,
        "--stop-grace-s", str(PROCESS_GRACE_S),
    ]  # fmt: skip
    if kv_port is not None:
        argv += ["--kv-port", str(kv_port)]
    return argv


def _pdserve_command() -> list[str]:
    """The installed ``pdserve`` script of this interpreter's environment."""
    script = Path(sys.executable).parent / "pdserve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deploy.cli"]


def _launch_worker(launcher: ServerLauncher, role: str, model: Path, core: int) -> RunningServer:
    port = free_port()
    kv_port = free_port() if role == "prefill" else None
    return launcher.launch(
        role,
        _worker_argv(role, model, port, core, kv_port),
        f"http://127.0.0.1:{port}",
        kv_port=kv_port,
    )


# Launch fixtures start a process without waiting for it; the public fixtures wait. Asking for
# several launch fixtures first lets engines boot side by side.
@pytest.fixture(scope="session")
def _prefill_launched(server_launcher: ServerLauncher, tiny_model: Path) -> RunningServer:
    return _launch_worker(server_launcher, "prefill", tiny_model, core=0)


@pytest.fixture(scope="session")
def _decode_launched(server_launcher: ServerLauncher, tiny_model: Path) -> RunningServer:
    return _launch_worker(server_launcher, "decode", tiny_model, core=1)


@pytest.fixture(scope="session")
def _aggregated_launched(server_launcher: ServerLauncher, tiny_model: Path) -> RunningServer:
    return _launch_worker(server_launcher, "aggregated", tiny_model, core=1)


@pytest.fixture(scope="session")
def real_aggregated(
    server_launcher: ServerLauncher, _aggregated_launched: RunningServer
) -> RunningServer:
    """One plain vLLM server on the tiny model (no connector): the reference outputs."""
    return server_launcher.wait_ready(_aggregated_launched)


@pytest.fixture(scope="session")
def real_prefill(
    server_launcher: ServerLauncher, _prefill_launched: RunningServer
) -> RunningServer:
    """A prefill worker (KV producer) on core 0."""
    return server_launcher.wait_ready(_prefill_launched)


@pytest.fixture(scope="session")
def real_decode(server_launcher: ServerLauncher, _decode_launched: RunningServer) -> RunningServer:
    """A decode worker (KV consumer) on core 1."""
    return server_launcher.wait_ready(_decode_launched)


@pytest.fixture(scope="session")
def real_proxy(
    server_launcher: ServerLauncher,
    _prefill_launched: RunningServer,
    _decode_launched: RunningServer,
    real_prefill: RunningServer,
    real_decode: RunningServer,
) -> RunningServer:
    """``pdserve proxy`` in front of ``real_prefill`` and ``real_decode`` (1P1D)."""
    port, admin_port = free_port(), free_port()
    argv = [
        *_pdserve_command(), "proxy",
        "--prefill", real_prefill.url,
        "--decode", real_decode.url,
        "--port", str(port),
        "--admin-port", str(admin_port),
    ]  # fmt: skip
    proxy = server_launcher.launch(
        "proxy", argv, f"http://127.0.0.1:{port}", prefill=real_prefill, decode=real_decode
    )
    return server_launcher.wait_ready(proxy, probe="/health")


@dataclass
class PDDeployment:
    """1P1D behind the proxy, plus the aggregated engine to compare with."""

    proxy: RunningServer
    prefill: RunningServer
    decode: RunningServer
    aggregated: RunningServer
    model_dir: Path
    block_size: int
    model: str = MODEL_NAME


@pytest.fixture(scope="session")
def real_pd(
    tiny_model: Path,
    _aggregated_launched: RunningServer,
    _prefill_launched: RunningServer,
    _decode_launched: RunningServer,
    real_aggregated: RunningServer,
    real_proxy: RunningServer,
    real_prefill: RunningServer,
    real_decode: RunningServer,
) -> PDDeployment:
    """All three engines (booted side by side) and the proxy."""
    return PDDeployment(
        proxy=real_proxy,
        prefill=real_prefill,
        decode=real_decode,
        aggregated=real_aggregated,
        model_dir=tiny_model,
        block_size=ENGINE_BLOCK_SIZE,
    )
