"""Two Ray nodes in two network namespaces, driven the way README "Multi-node" tells a user.

Node A (the head) runs the Ray head, `pdserve up`, the proxy and the prefill instance; node B
runs a Ray worker node and the decode instance. The namespaces are joined by a veth pair and
have no other route, so a worker advertising 127.0.0.1 or the wrong address, a port bound to
loopback, a joining node without the cluster token or KV bytes taking another path all fail
here as they would on two machines. Each node has its own HOME (the head's Ray token file is
not the worker's) and its own Ray temp dir.

Every step uses the user's commands: deploy/multinode/start-node.sh, the `pdserve` console
script and deploy/topologies/cpu-two-node.yaml, unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import PDSERVE

from deploy.multinode.netns_lab import LabNode, TwoNodeLab, unsupported_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
START_NODE = REPO / "deploy" / "multinode" / "start-node.sh"
TOPOLOGY = REPO / "deploy" / "topologies" / "cpu-two-node.yaml"
CLIENT = Path(__file__).with_name("multinode_client.py")
MODEL = "tiny-llama"
API_PORT, PREFILL_PORT, KV_PORT, DECODE_PORT = 8000, 8100, 15100, 8200
# Processes of ours (not Ray's): none may be left on either node after `pdserve down`.
OUR_MARKERS = (
    "vllm.entrypoints.openai.api_server",
    "VLLM::",
    "InstanceSupervisor",
    "ProxyHost",
    "Controller",
)


@dataclass
class TwoNodeCluster:
    lab: TwoNodeLab
    env: dict[LabNode, dict[str, str]]
    token: str
    logs: Path
    findings: dict[str, Any] = field(default_factory=dict)

    @property
    def head(self) -> LabNode:
        return self.lab.head

    @property
    def worker(self) -> LabNode:
        return self.lab.worker

    @property
    def api(self) -> str:
        return f"http://{self.head.address}:{API_PORT}/v1"

    def run(
        self, node: LabNode, argv: list[str], timeout_s: float = 600.0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` on ``node`` with that node's environment; output to a file, not a pipe:
        `ray start` leaves daemons behind that would hold a pipe open for ever."""
        log = self.logs / f"{node.netns}-{len(list(self.logs.iterdir()))}.log"
        with log.open("w+") as out:
            done = subprocess.run(
                self.lab.command(node, argv),
                env={**self.env[node], **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                text=True,
            )
            out.seek(0)
            done.stdout = out.read()
        return done

    def pdserve(self, *args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess[str]:
        return self.run(self.head, [PDSERVE, *args], timeout_s=timeout_s)

    def client(self, *args: str) -> dict[str, Any]:
        """Runs multinode_client.py on the worker node: a client on another machine."""
        done = self.run(self.worker, [sys.executable, str(CLIENT), *args], timeout_s=300)
        assert done.returncode == 0, done.stdout[-3000:]
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def status(self) -> dict[str, dict[str, str]]:
        done = self.pdserve("status", timeout_s=60)
        assert done.returncode == 0, done.stdout
        rows: dict[str, dict[str, str]] = {}
        lines = done.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("NAME"))
        names = lines[header].lower().split()
        for line in lines[header + 1 :]:
            cells = line.split()
            if len(cells) >= len(names):
                rows[cells[0]] = dict(zip(names, cells, strict=False))
        rows["_api_line"] = {"line": lines[header - 1] if header else ""}
        return rows

    def decode_kv_bytes(self) -> float:
        metrics = self.client("get", f"http://{self.worker.address}:{DECODE_PORT}/metrics")
        assert metrics["status"] == 200, metrics
        total = 0.0
        for line in metrics["body"].splitlines():
            if line.startswith("pdserve_kv_transfer_bytes_total"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def process_lines(self, node: LabNode) -> list[str]:
        lines = []
        for pid in self.lab.pids(node):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            lines.append(f"{pid} {cmdline.decode(errors='replace')[:160]}")
        return lines

    def ours_left(self, node: LabNode) -> list[str]:
        return [line for line in self.process_lines(node) if any(m in line for m in OUR_MARKERS)]

    def listening(self, node: LabNode) -> set[int]:
        done = self.run(node, ["ss", "-Hltn"], timeout_s=30)
        ports = set()
        for line in done.stdout.splitlines():
            local = line.split()[3] if len(line.split()) > 3 else ""
            port = local.rsplit(":", 1)[-1]
            if port.isdigit():
                ports.add(int(port))
        return ports


def _node_env(home: Path, ray_tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RAY_", "PDSERVE_")) and key not in ("HOME",)
    }
    env.update(
        HOME=str(home),
        RAY_TMPDIR=str(ray_tmp),
        # start-node.sh calls `ray`; the pdserve commands must carry the auth mode (README).
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def _wait_for(
    predicate: Any,
    timeout_s: float,
    what: str,
    poll_s: float = 1.0,
    describe: Any = None,
) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(poll_s)
    detail = f"; now: {describe()}" if describe is not None else ""
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s{detail}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodeCluster]:
    reason = unsupported_reason()
    if reason is not None:
        pytest.skip(f"two-node lab unavailable: {reason}")
    # Short paths: Ray's Unix sockets live under RAY_TMPDIR (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="pdmn", dir="/tmp"))
    logs = root / "logs"
    logs.mkdir()
    with TwoNodeLab() as lab:
        env = {
            lab.head: _node_env(
                root / "home-a",
                root / "a",
                NODE_IP=lab.head.address,
                NODE_RESOURCES='{"prefill_node": 1}',
            ),
            lab.worker: _node_env(
                root / "home-b",
                root / "b",
                RAY_HEAD=f"{lab.head.address}:6379",
                NODE_RESOURCES='{"decode_node": 1}',
            ),
        }
        for node in lab.nodes:
            for key in ("HOME", "RAY_TMPDIR"):
                Path(env[node][key]).mkdir(parents=True)
        cluster = TwoNodeCluster(lab, env, token="", logs=logs)
        try:
            _start(cluster)
            yield cluster
        finally:
            if cluster.token:
                cluster.pdserve("down", timeout_s=180)
    shutil.rmtree(root, ignore_errors=True)


def _start(cluster: TwoNodeCluster) -> None:
    """README "Multi-node", steps 1-3, on the two namespaces."""
    for node in cluster.lab.nodes:  # the model at the same path on every node
        model_dir = Path(cluster.env[node]["HOME"]) / ".cache" / "pdserve" / "tiny-llama"
        made = cluster.run(node, [PDSERVE, "make-tiny-model", str(model_dir)])
        assert made.returncode == 0, made.stdout
    head = cluster.run(cluster.head, ["bash", str(START_NODE), "head", "cpu"], timeout_s=180)
    assert head.returncode == 0, head.stdout[-3000:]
    tokens = re.findall(r"^[0-9a-f]{64}$", head.stdout, re.MULTILINE)
    assert tokens, f"the head printed no token on a line of its own:\n{head.stdout[-2000:]}"
    # A joining node without the token is refused with one line, before Ray is touched.
    refused = cluster.run(cluster.worker, ["bash", str(START_NODE), "worker", "cpu"], 60)
    cluster.findings["tokenless_worker"] = (refused.returncode, refused.stdout)
    joined = cluster.run(
        cluster.worker,
        ["bash", str(START_NODE), "worker", "cpu"],
        timeout_s=180,
        RAY_AUTH_TOKEN=tokens[0],
    )
    assert joined.returncode == 0, joined.stdout[-3000:]
    cluster.findings["worker_start"] = joined.stdout
    cluster.token = tokens[0]
    up = cluster.pdserve("up", "-c", str(TOPOLOGY), "--detach", timeout_s=900)
    cluster.findings["up"] = up.stdout
    assert up.returncode == 0, up.stdout[-4000:]


@pytest.mark.timeout(1800)
def test_nodes_join_with_the_token_and_advertise_their_link_address(
    cluster: TwoNodeCluster,
) -> None:
    code, output = cluster.findings["tokenless_worker"]
    assert code == 2 and "RAY_AUTH_TOKEN" in output, output
    assert f"Local node IP: {cluster.worker.address}" in re.sub(
        r"\x1b\[[0-9;]*m", "", cluster.findings["worker_start"]
    )
    up = cluster.findings["up"]
    assert f"ready at http://{cluster.head.address}:{PREFILL_PORT}" in up, up
    assert f"ready at http://{cluster.worker.address}:{DECODE_PORT}" in up, up
    assert f"API {cluster.api}" in up, up


@pytest.mark.timeout(600)
def test_api_answers_a_client_on_another_node(cluster: TwoNodeCluster) -> None:
    result = cluster.client("completions", cluster.api, MODEL, "300", "first")
    assert result["completion_tokens"] == 8
    assert result["kv_transfer_params"]["pdserve_kv_outcome"] == "transferred", result
    assert result["chat_stream_text"]
    assert result["raw_stream_status"] == 200
    assert result["raw_stream_done_lines"] == 1


@pytest.mark.timeout(600)
def test_prefill_hands_out_its_own_node_address_for_kv(cluster: TwoNodeCluster) -> None:
    answer = cluster.client(
        "post",
        f"http://{cluster.head.address}:{PREFILL_PORT}/v1/completions",
        json.dumps(
            {
                "model": MODEL,
                "prompt": "a prompt whose KV a decode on another node will read",
                "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True},
            }
        ),
    )
    assert answer["status"] == 200, answer
    params = json.loads(answer["body"])["kv_transfer_params"]
    assert params["remote_host"] == cluster.head.address, params
    assert params["remote_port"] == KV_PORT, params


@pytest.mark.timeout(600)
def test_kv_bytes_cross_the_veth_link(cluster: TwoNodeCluster) -> None:
    kv_before = cluster.decode_kv_bytes()
    link_before = cluster.lab.link_bytes(cluster.worker)
    result = cluster.client("completions", cluster.api, MODEL, "300", "link")
    assert result["kv_transfer_params"]["pdserve_kv_outcome"] == "transferred", result
    link_after = cluster.lab.link_bytes(cluster.worker)
    pulled = cluster.decode_kv_bytes() - kv_before
    received = link_after["rx"] - link_before["rx"]
    # Three prompts of ~300 words: hundreds of KiB of KV, all of it over the veth.
    assert pulled > 100_000, pulled
    assert received >= pulled, (received, pulled)


@pytest.mark.timeout(900)
def test_status_and_scale_work_from_the_head(cluster: TwoNodeCluster) -> None:
    rows = cluster.status()
    assert rows["prefill-0"]["address"] == f"http://{cluster.head.address}:{PREFILL_PORT}"
    assert rows["decode-0"]["address"] == f"http://{cluster.worker.address}:{DECODE_PORT}"
    assert cluster.api in rows["_api_line"]["line"]
    down = cluster.pdserve("scale", "--prefill", "0", timeout_s=300)
    assert down.returncode == 0, down.stdout
    assert "prefill-0" not in cluster.status()
    # With no prefill instance the decode serves requests whole: still answered.
    result = cluster.client("completions", cluster.api, MODEL, "50", "noprefill")
    assert result["completion_tokens"] == 8
    up = cluster.pdserve("scale", "--prefill", "1", timeout_s=600)
    assert up.returncode == 0, up.stdout
    rows = cluster.status()
    assert rows["prefill-0"]["address"] == f"http://{cluster.head.address}:{PREFILL_PORT}"
    assert rows["prefill-0"]["health"] == "healthy"


def _three_requests(cluster: TwoNodeCluster) -> list[int]:
    body = json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 4})
    return [cluster.client("post", f"{cluster.api}/completions", body)["status"] for _ in range(3)]


@pytest.mark.timeout(1200)
def test_losing_the_worker_node_is_survived_and_it_returns(cluster: TwoNodeCluster) -> None:
    raylets = [line for line in cluster.process_lines(cluster.worker) if "/raylet/raylet " in line]
    assert len(raylets) == 1, cluster.process_lines(cluster.worker)
    os.kill(int(raylets[0].split()[0]), 9)
    # At once (before any health check ejected the decode) and after its engine is gone, the
    # requests are answered: by the decode while it lasts, else whole by the head's prefill.
    assert _three_requests(cluster) == [200, 200, 200]
    # The engine must not outlive its supervisor: nothing of ours keeps the node's cores.
    _wait_for(
        lambda: not cluster.ours_left(cluster.worker),
        60,
        "the decode engine to go with its node's raylet",
        describe=lambda: cluster.process_lines(cluster.worker),
    )
    assert _three_requests(cluster) == [200, 200, 200]
    metrics = cluster.client("get", f"http://{cluster.head.address}:{API_PORT}/metrics")
    served_whole = [
        line
        for line in metrics["body"].splitlines()
        if line.startswith("pdserve_requests_total{") and 'path="prefill_fallback"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in served_whole) >= 3, served_whole
    rejoined = cluster.run(
        cluster.worker,
        ["bash", str(START_NODE), "worker", "cpu"],
        timeout_s=180,
        RAY_AUTH_TOKEN=cluster.token,
    )
    assert rejoined.returncode == 0, rejoined.stdout[-3000:]
    _wait_for(
        lambda: cluster.status().get("decode-0", {}).get("health") == "healthy",
        600,
        "decode-0 back and healthy after its node rejoined",
        poll_s=5.0,
    )
    result = cluster.client("completions", cluster.api, MODEL, "300", "rejoined")
    assert result["kv_transfer_params"]["pdserve_kv_outcome"] == "transferred", result


@pytest.mark.timeout(600)
def test_down_leaves_nothing_of_ours_on_either_node(cluster: TwoNodeCluster) -> None:
    down = cluster.pdserve("down", timeout_s=180)
    assert down.returncode == 0, down.stdout
    for node in cluster.lab.nodes:
        _wait_for(
            lambda n=node: not cluster.ours_left(n),
            30,
            f"{node.netns} empty of pdserve",
            describe=lambda n=node: cluster.ours_left(n),
        )
        ports = {API_PORT, API_PORT + 1, PREFILL_PORT, KV_PORT, DECODE_PORT}
        assert not ports & cluster.listening(node), (node, cluster.listening(node))
    cluster.token = ""  # nothing left for the fixture's `pdserve down`
