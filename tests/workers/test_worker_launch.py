"""WorkerSpec -> vLLM command line, validation, and the process lifecycle (no vLLM started)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from deploy.worker_launch import (
    WorkerConfigError,
    WorkerSpec,
    build_command,
    free_port,
    group_alive,
    role_settings,
    spec_from_mapping,
    start_worker,
    stop_worker,
    validate_spec,
    wait_until_ready,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    # validate_spec only looks for config.json; the real model is exercised by the slow tests.
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_prefill_command(model_dir: Path) -> None:
    spec = WorkerSpec(
        role="prefill", model=model_dir, api_port=18100, kv_port=18150, cpu_core=0,
        kv_cache_gib=2, engine_id="p0", secret="s3cret-s3cret-s3cret", block_size=32,
        served_model_name="tiny",
    )  # fmt: skip
    argv, env = build_command(spec)
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _option(argv, "--model") == str(model_dir)
    assert _option(argv, "--served-model-name") == "tiny"
    assert _option(argv, "--port") == "18100"
    assert _option(argv, "--block-size") == "32"
    assert "--enforce-eager" in argv and "--enable-prefix-caching" in argv
    settings = role_settings("prefill")
    assert _option(argv, "--max-num-batched-tokens") == str(settings.max_num_batched_tokens)
    assert _option(argv, "--max-num-seqs") == str(settings.max_num_seqs)
    kv = json.loads(_option(argv, "--kv-transfer-config"))
    assert kv["kv_connector"] == "TcpPullConnector"
    assert kv["kv_connector_module_path"] == "kv_transfer.connector"
    assert kv["kv_role"] == "kv_producer"
    assert kv["engine_id"] == "p0"
    assert kv["kv_connector_extra_config"]["port"] == 18150
    assert "secret" not in kv["kv_connector_extra_config"]
    assert env == {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": "0",
        # The secret travels in the environment only (tests/deploy/test_kv_secret_deploy.py).
        "PDSERVE_KV_SECRET": "s3cret-s3cret-s3cret",
        "PDSERVE_KV_SECRET_FILE": "",
    }


def test_roles_differ_where_they_should(model_dir: Path) -> None:
    prefill, decode = role_settings("prefill"), role_settings("decode")
    assert prefill.max_num_batched_tokens and decode.max_num_batched_tokens
    assert prefill.max_num_batched_tokens > decode.max_num_batched_tokens
    assert prefill.max_num_seqs and decode.max_num_seqs
    assert decode.max_num_seqs > prefill.max_num_seqs
    argv, _ = build_command(WorkerSpec(role="decode", model=model_dir))
    assert json.loads(_option(argv, "--kv-transfer-config"))["kv_role"] == "kv_consumer"


def test_default_ports_follow_the_contract(model_dir: Path) -> None:
    assert WorkerSpec(role="prefill", model=model_dir, index=2).resolved_api_port == 8102
    assert WorkerSpec(role="prefill", model=model_dir, index=2).resolved_kv_port == 15102
    assert WorkerSpec(role="decode", model=model_dir, index=3).resolved_api_port == 8203
    spec = WorkerSpec(role="decode", model=model_dir, host="0.0.0.0", api_port=9000)
    assert spec.url == "http://127.0.0.1:9000"
    assert spec.resolved_engine_id == "decode-0.0.0.0-9000"


def test_aggregated_runs_no_connector(model_dir: Path) -> None:
    argv, _ = build_command(WorkerSpec(role="aggregated", model=model_dir))
    assert "--kv-transfer-config" not in argv


def test_accelerator_env_and_extra_args(model_dir: Path) -> None:
    spec = WorkerSpec(
        role="decode", model=model_dir, device="npu", visible_devices="4,5", kv_cache_gib=8,
        extra_args=("--tensor-parallel-size", "2"), env={"HCCL_BUFFSIZE": "512"},
    )  # fmt: skip
    argv, env = build_command(spec)
    assert "--enforce-eager" not in argv
    assert _option(argv, "--kv-cache-memory-bytes") == str(8 * 1024**3)
    assert argv[-2:] == ["--tensor-parallel-size", "2"]
    # No secret in the spec: none reaches the worker, whatever the caller's environment holds.
    no_secret = {"PDSERVE_KV_SECRET": "", "PDSERVE_KV_SECRET_FILE": ""}
    assert env == {"ASCEND_RT_VISIBLE_DEVICES": "4,5", "HCCL_BUFFSIZE": "512", **no_secret}
    cuda = WorkerSpec(role="decode", model=model_dir, device="cuda", visible_devices="1")
    assert build_command(cuda)[1] == {"CUDA_VISIBLE_DEVICES": "1", **no_secret}


def test_validate_refuses_missing_model(tmp_path: Path) -> None:
    with pytest.raises(WorkerConfigError, match=r"model: .* is not a directory"):
        validate_spec(WorkerSpec(role="decode", model=tmp_path / "nope", api_port=1))
    with pytest.raises(WorkerConfigError, match=r"no config\.json"):
        validate_spec(WorkerSpec(role="decode", model=tmp_path, api_port=1))


def test_validate_refuses_port_in_use(model_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(
            WorkerConfigError, match=f"api_port: 127.0.0.1:{port} is already in use"
        ):
            validate_spec(WorkerSpec(role="decode", model=model_dir, api_port=port))
        with pytest.raises(WorkerConfigError, match=r"kv_port: .* already in use"):
            validate_spec(
                WorkerSpec(role="prefill", model=model_dir, api_port=free_port(), kv_port=port)
            )


def test_validate_refuses_bad_kv_config(model_dir: Path) -> None:
    spec = WorkerSpec(
        role="prefill", model=model_dir, api_port=free_port(), kv_port=free_port(), lease_s=-1
    )
    with pytest.raises(WorkerConfigError, match="lease_s"):
        validate_spec(spec)


def test_spec_from_mapping() -> None:
    spec = spec_from_mapping({"role": "prefill", "model": "/m", "extra_args": ["--seed", "1"]})
    assert spec.model == Path("/m") and spec.extra_args == ("--seed", "1")
    with pytest.raises(WorkerConfigError, match="unknown worker fields \\['colour'\\]"):
        spec_from_mapping({"role": "prefill", "model": "/m", "colour": "red"})


# A parent that spawns a child which ignores SIGTERM: stop_worker must still leave nothing.
_STUBBORN_GROUP = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_stop_worker_leaves_no_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUBBORN_GROUP], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    started = time.monotonic()
    status = stop_worker(proc, grace_s=1.0)
    assert status == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child that ignored SIGTERM survived"
    assert time.monotonic() - started < 10
    assert stop_worker(proc, grace_s=1.0) == status  # idempotent


class _Models(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(b'{"data": []}')

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture
def models_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_wait_until_ready(models_server: str) -> None:
    wait_until_ready(models_server, timeout_s=5)


def test_wait_until_ready_times_out() -> None:
    with pytest.raises(TimeoutError, match="not ready after"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout_s=1, poll_s=0.1)


def test_wait_until_ready_notices_exit(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_text("ValueError: bad model\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 3.*bad model"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout_s=30, proc=proc, log_path=log)


def test_stop_worker_on_a_process_without_its_own_group() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop_worker(proc, grace_s=5.0) == -signal.SIGTERM
    # The caller's own group (pytest's) must not have been signalled: we are still here.


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
@pytest.mark.parametrize("pin", [True, False])
def test_pin_process_tree_confines_every_process_to_the_core(
    model_dir: Path, tmp_path: Path, pin: bool
) -> None:
    core = min(os.sched_getaffinity(0))
    # A stand-in for the server: it reports its own affinity and its child's.
    python = tmp_path / "fake-python"
    python.write_text(
        "#!/bin/sh\n"
        "grep Cpus_allowed_list /proc/self/status\n"
        "sh -c 'grep Cpus_allowed_list /proc/self/status'\n"
    )
    python.chmod(0o755)
    spec = WorkerSpec(
        role="aggregated", model=model_dir, cpu_core=core, python=str(python),
        pin_process_tree=pin,
    )  # fmt: skip
    log = tmp_path / "server.log"
    proc = start_worker(spec, log_path=log, validate=False)
    assert proc.wait(timeout=30) == 0
    allowed = [line.split(":", 1)[1].strip() for line in log.read_text().splitlines()]
    everything = Path("/proc/self/status").read_text().split("Cpus_allowed_list:")[1].split()[0]
    assert allowed == ([str(core)] * 2 if pin else [everything] * 2)


def _group_with_a_grandchild() -> subprocess.Popen[bytes]:
    """A group leader with a child of its own, like vLLM's API server and engine core."""
    return subprocess.Popen(
        ["bash", "-c", "sleep 120 & wait"], start_new_session=True, stdin=subprocess.DEVNULL
    )


def _holder(pgid: int, release: bool) -> subprocess.Popen[str]:
    """A process that arms a lifeline for ``pgid`` (and releases it if asked), then waits."""
    program = (
        "import sys, time\n"
        "from deploy.worker_launch import GroupLifeline\n"
        f"lifeline = GroupLifeline({pgid})\n"
        + ("lifeline.release()\n" if release else "")
        + "print('armed', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "armed"
    return holder


def _wait_group_gone(group: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        group.poll()  # a leader this test started stays a group member until reaped
        if not group_alive(group.pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(60)
def test_lifeline_kills_the_group_when_its_holder_is_sigkilled() -> None:
    group = _group_with_a_grandchild()
    holder = _holder(group.pid, release=False)
    try:
        time.sleep(0.3)
        assert group_alive(group.pid)
        holder.kill()
        holder.wait()
        assert _wait_group_gone(group, 10.0), "the orphaned group outlived its holder"
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group.pid, signal.SIGKILL)
        group.wait()


@pytest.mark.timeout(60)
def test_released_lifeline_leaves_the_group_alone() -> None:
    group = _group_with_a_grandchild()
    holder = _holder(group.pid, release=True)
    try:
        holder.kill()
        holder.wait()
        assert not _wait_group_gone(group, 1.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group.pid, signal.SIGKILL)
        group.wait()
