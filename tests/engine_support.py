"""The session's real engines as tests see them, and the launcher behind tests/conftest.py.

tests/conftest.py owns the fixtures; this module holds what both the fixtures and the tests
import: the engines' shared settings, ``RunningServer`` (a started server with small HTTP and
/metrics helpers), the launcher that guarantees no process outlives the session, and the KV
accounting helpers the connector and end-to-end tests both check against.

Every slow test that talks to an engine relies on these settings, so they are set once here:
prefill and decode must agree on the block size; float32 keeps greedy decoding exact across
batch shapes; the short lease lets the lease-expiry tests finish in seconds; and the decode
worker recomputes when a pull fails (the dead-prefill test expects that).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.worker_launch import group_alive, wait_until_ready

ENGINE_BLOCK_SIZE = 32
ENGINE_DTYPE = "float32"
MODEL_NAME = "tiny"
KV_SECRET = "pdserve-test-secret"
# Shorter than the decode queueing the tests cause on purpose (a decode holds its claim on the
# blocks while it waits), and short enough that an un-pulled prefill is freed within seconds.
ENGINE_LEASE_S = 4.0
KV_LOAD_FAILURE_POLICY = "recompute"
ENGINE_START_TIMEOUT_S = 900.0
PROCESS_GRACE_S = 30.0

BLOCKS_HELD = "pdserve_kv_blocks_held"


@dataclass
class RunningServer:
    """A server the fixtures started: its URL, log and process (a pdserve command)."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)
    start_seconds: float = 0.0

    @property
    def kv_port(self) -> int | None:
        """The KV block server's port (prefill workers only)."""
        port = self.extra.get("kv_port")
        return port if isinstance(port, int) else None

    @property
    def kv_events_ports(self) -> tuple[int, int] | None:
        """Where the engine publishes its KV events and answers replays (engines only)."""
        ports = self.extra.get("kv_events_ports")
        return ports if isinstance(ports, tuple) else None

    @property
    def port(self) -> int | None:
        """The port the server was told to listen on (engines only)."""
        port = self.extra.get("port")
        return port if isinstance(port, int) else None

    def get(self, path: str, timeout_s: float = 10.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
            body: bytes = response.read()
            return body

    def post_json(
        self, path: str, body: dict[str, object], timeout_s: float = 300.0
    ) -> dict[str, Any]:
        """POST ``body``; an HTTP error fails the test with the server's error body."""
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500]
            raise AssertionError(f"{self.name} POST {path} -> {exc.code}: {detail!r}") from exc

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

    def counter(self, name: str) -> float:
        """``metric(name)``, 0 if the server does not export it (yet)."""
        value = self.metric(name)
        return 0.0 if value is None else float(value)

    def wait_for_counter(self, name: str, expected: float, timeout_s: float = 15.0) -> float:
        """Poll ``name`` until it reaches ``expected`` (stats reach /metrics a step or two late);
        return the last value seen."""
        deadline = time.monotonic() + timeout_s
        value = self.counter(name)
        while value < expected and time.monotonic() < deadline:
            time.sleep(0.25)
            value = self.counter(name)
        return value

    def wait_blocks_released(self, timeout_s: float = 20.0) -> None:
        """Wait until this prefill worker holds no KV blocks; fail the test if it still does."""
        deadline = time.monotonic() + timeout_s
        held = self.metric(BLOCKS_HELD)
        while (held is None or held > 0) and time.monotonic() < deadline:
            time.sleep(0.25)
            held = self.metric(BLOCKS_HELD)
        assert held is not None, f"{self.name}'s /metrics has no {BLOCKS_HELD}"
        assert held == 0, f"{self.name} still holds {held:.0f} KV blocks after {timeout_s:.0f} s"

    def server_group(self) -> int | None:
        """The process group of the vLLM server the command started (its child)."""
        for child in _children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                return os.getpgid(child)
        return None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class FreezableDecodes:
    """Decode engines loaded with tests/integration/freeze_logits_processor.py.

    ``plan`` tells them which request to freeze after how many tokens; ``frozen`` waits for
    the engine that froze and returns its name and process group (the test kills it);
    ``relaunch`` starts a killed engine again on its port.
    """

    servers: dict[str, RunningServer]
    freeze_dir: Path
    _relaunch: Callable[[str], RunningServer]

    def plan(self, prompt_token_ids: list[int], k: int) -> None:
        for marker in self.freeze_dir.glob("frozen-*"):
            marker.unlink()
        plan = self.freeze_dir / "plan.json"
        staged = plan.with_suffix(".tmp")
        staged.write_text(json.dumps({"prompt_token_ids": prompt_token_ids, "k": k}))
        staged.replace(plan)  # engines never read a half-written plan

    def frozen(self, timeout_s: float = 120.0) -> tuple[str, int]:
        """The name and process group of the engine that froze (waits for it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for marker in self.freeze_dir.glob("frozen-*"):
                group = int(marker.name.removeprefix("frozen-"))
                for name, server in self.servers.items():
                    if server.server_group() == group:
                        return name, group
            time.sleep(0.05)
        raise AssertionError(f"no freezable engine froze within {timeout_s:.0f} s")

    def relaunch(self, name: str) -> RunningServer:
        self.servers[name] = self._relaunch(name)
        return self.servers[name]


@dataclass(frozen=True)
class PDEngines:
    """The session's three engines: KV producer, KV consumer and the connector-less baseline."""

    prefill: RunningServer
    decode: RunningServer
    aggregated: RunningServer


@dataclass(frozen=True)
class PDDeployment:
    """1P1D behind the proxy, plus the aggregated engine to compare with."""

    proxy: RunningServer
    prefill: RunningServer
    decode: RunningServer
    aggregated: RunningServer
    model_dir: Path
    block_size: int
    model: str = MODEL_NAME


def block_bytes(model_dir: Path, block_size: int, elem_size: int = 4) -> int:
    """KV bytes of one block over all layers (float32 cache, CPU layout [H, bs, 2*D])."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return (
        config["num_hidden_layers"]
        * config["num_key_value_heads"]
        * block_size
        * 2
        * head_dim
        * elem_size
    )


def blocks_to_pull(prompt_tokens: int, block_size: int, cached_full_blocks: int = 0) -> int:
    """Blocks a decode instance must pull: the prompt's blocks minus its own prefix-cache hit.

    vLLM never serves the last prompt token from cache (it must compute its logits), so the
    local hit is at most ``(prompt_tokens - 1) // block_size`` blocks.
    """
    hit = min(cached_full_blocks, (prompt_tokens - 1) // block_size)
    return math.ceil(prompt_tokens / block_size) - hit


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(part) for part in path.read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


class ServerStartError(RuntimeError):
    """A server exited or did not answer in time; the message ends with its log."""


class ServerLauncher:
    """Starts commands in their own session and guarantees they are gone at the end.

    ``launch`` returns at once; ``wait_ready`` blocks until the server answers. Launch all the
    servers you need before waiting for any, and they boot side by side.
    """

    def __init__(self, log_dir: Path, timings: dict[str, float]) -> None:
        self.log_dir = log_dir
        self.timings = timings
        self._servers: list[RunningServer] = []
        self._groups: dict[str, int] = {}

    def launch(
        self,
        name: str,
        argv: list[str],
        url: str,
        env: Mapping[str, str] | None = None,
        **extra: object,
    ) -> RunningServer:
        """Start ``argv`` with ``env`` added to this process's environment."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **(env or {})},
            )  # fmt: skip
        server = RunningServer(name=name, url=url, proc=proc, log_path=log_path, extra=extra)
        server.start_seconds = time.monotonic()
        self._servers.append(server)
        return server

    def wait_ready(self, server: RunningServer, probe: str = "/v1/models") -> RunningServer:
        """Block until ``server`` answers ``probe``; record how long its start took."""
        if server.name in self.timings:
            return server
        try:
            _wait_http(server, probe, ENGINE_START_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as exc:
            raise ServerStartError(
                f"{server.name} did not start: {exc}\n{server.log_tail()}"
            ) from exc
        self.timings[server.name] = time.monotonic() - server.start_seconds
        group = server.server_group()
        if group is not None:
            self._groups[server.name] = group
        return server

    def forget_killed(self, server: RunningServer) -> None:
        """Stop tracking ``server``, which a test killed on purpose: its exit status is not a
        shutdown problem. Its command is reaped, and nothing of it may be left."""
        group = self._groups.get(server.name) or server.server_group()
        if group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        server.proc.wait(timeout=PROCESS_GRACE_S + 10)
        self._servers.remove(server)
        self._groups.pop(server.name, None)

    def stop_all(self) -> list[str]:
        """SIGTERM every command at once, then reap each; return the problems found."""
        servers = list(reversed(self._servers))
        self._servers.clear()
        groups = {s.name: self._groups.get(s.name) or s.server_group() for s in servers}
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.proc.pid, signal.SIGTERM)
        problems: list[str] = []
        for server in servers:
            problems += self._reap(server, groups[server.name])
        return problems

    def _reap(self, server: RunningServer, group: int | None) -> list[str]:
        problems: list[str] = []
        try:
            server.proc.wait(timeout=PROCESS_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            problems.append(f"{server.name}: did not exit within {PROCESS_GRACE_S + 10:.0f} s")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        if group is not None:
            deadline = time.monotonic() + 5.0
            while group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.1)
            if group_alive(group):
                problems.append(f"{server.name}: processes of group {group} outlived SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        if server.proc.returncode not in (0, -signal.SIGTERM):
            problems.append(f"{server.name}: exit status {server.proc.returncode}")
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
