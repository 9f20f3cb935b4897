"""Real vLLM engines for the connector's slow tests (used by conftest.py's fixtures).

One prefill engine (KV producer, core 0), one decode engine (KV consumer, core 1)
and one aggregated engine without a connector (the token-identity baseline, core 0),
all started once per session with ``python -m vllm.entrypoints.openai.api_server``
and the connector loaded through ``kv_connector_module_path``. Their process
groups are killed at session end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kv_transfer.config import connector_config

BLOCK_SIZE = 32
DTYPE = "float32"
MODEL_NAME = "tiny"
SECRET = "kv-connector-slow-tests"
LEASE_S = 12.0
START_TIMEOUT_S = 900.0


def _free_port(lo: int = 19000, hi: int = 19999) -> int:
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(lo, hi)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 19000-19999")


@dataclass
class Engine:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    kv_port: int | None = None

    def post(self, path: str, body: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{self.name} {path} -> {exc.code}: {exc.read()[:500]!r}") from exc

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str) -> float:
        """Sum of a metric's samples for this model (0 if absent)."""
        pattern = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.eE+-]+)$", re.M)
        return sum(
            float(value)
            for labels, value in pattern.findall(self.metrics_text())
            if f'model_name="{MODEL_NAME}"' in labels
        )

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _launch(name: str, model: Path, core: int, log_dir: Path, kv: dict[str, Any] | None) -> Engine:
    port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--block-size",
        str(BLOCK_SIZE),
        "--dtype",
        DTYPE,
        "--max-model-len",
        "2048",
        "--enable-prefix-caching",
    ]
    if kv is not None:
        argv += ["--kv-transfer-config", json.dumps(kv)]
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND=str(core),
        PYTHONUNBUFFERED="1",
    )
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    kv_port = (
        kv["kv_connector_extra_config"]["port"] if kv and kv["kv_role"] != "kv_consumer" else None
    )
    return Engine(name, f"http://127.0.0.1:{port}", proc, log, kv_port)


def _wait_ready(engine: Engine, deadline: float) -> None:
    while time.monotonic() < deadline:
        if engine.proc.poll() is not None:
            raise RuntimeError(f"{engine.name} exited {engine.proc.returncode}:\n{engine.tail()}")
        try:
            with urllib.request.urlopen(engine.url + "/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"{engine.name} not ready in {START_TIMEOUT_S} s:\n{engine.tail()}")


def _stop(engine: Engine) -> None:
    if engine.proc.poll() is None:
        try:
            os.killpg(engine.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(engine.proc.pid, signal.SIGKILL)  # spawned engine-core/worker children
    engine.proc.wait(timeout=10)


@dataclass
class PDEngines:
    prefill: Engine
    decode: Engine
    aggregated: Engine


def start_pd_engines(model: Path, log_dir: Path) -> PDEngines:
    """Launch prefill, decode and aggregated engines side by side and wait for all three."""
    kv_port = _free_port()
    producer = connector_config("producer", "kvtest-prefill", "127.0.0.1", kv_port, SECRET, LEASE_S)
    consumer = connector_config(
        "consumer",
        "kvtest-decode",
        "127.0.0.1",
        _free_port(),
        SECRET,
        LEASE_S,
        kv_load_failure_policy="recompute",
    )
    engines = [
        _launch("prefill", model, 0, log_dir, producer),
        _launch("decode", model, 1, log_dir, consumer),
        _launch("aggregated", model, 0, log_dir, None),
    ]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for engine in engines:
            _wait_ready(engine, deadline)
    except BaseException:
        stop_pd_engines(engines)
        raise
    return PDEngines(*engines)


def stop_pd_engines(engines: PDEngines | list[Engine]) -> None:
    if isinstance(engines, PDEngines):
        engines = [engines.prefill, engines.decode, engines.aggregated]
    for engine in engines:
        _stop(engine)
