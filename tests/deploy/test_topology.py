"""The topology schema and every example YAML shipped under deploy/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.preflight import PreflightError, check_resources, required_resources
from deploy.topology import Topology, TopologyError, load_topology, validate_topology
from proxy.config import load_proxy_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOPOLOGIES = sorted((DEPLOY / "topologies").glob("*.yaml"))


def test_examples_exist() -> None:
    names = {p.name for p in TOPOLOGIES}
    assert {"cpu-1p1d.yaml", "cpu-2p1d.yaml", "gpu-xpyd.yaml", "npu-xpyd.yaml"} <= names


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.name)
def test_example_topology_validates(path: Path) -> None:
    topology = load_topology(path)
    assert topology.prefill.replicas >= 1 and topology.decode.replicas >= 1
    # `pdserve proxy --config FILE` reads the same file's proxy section.
    assert load_proxy_config(path) == topology.proxy


def test_example_shapes() -> None:
    one = load_topology(DEPLOY / "topologies" / "cpu-1p1d.yaml")
    assert (one.prefill.replicas, one.decode.replicas, one.accelerator.value) == (1, 1, "cpu")
    two = load_topology(DEPLOY / "topologies" / "cpu-2p1d.yaml")
    assert (two.prefill.replicas, two.decode.replicas) == (2, 1)
    # Three engines fit a 2-core box only because each reserves half a CPU.
    assert required_resources(two) == {"CPU": 1.5}
    gpu = load_topology(DEPLOY / "topologies" / "gpu-xpyd.yaml")
    assert gpu.accelerator.value == "gpu"
    assert gpu.prefill.resources.ray_bundle() == {"CPU": 8.0, "GPU": 2.0}
    npu = load_topology(DEPLOY / "topologies" / "npu-xpyd.yaml")
    assert npu.accelerator.value == "npu"
    assert npu.decode.resources.ray_bundle() == {"CPU": 16.0, "NPU": 8.0}


def test_embedded_default_is_1p1d_on_cpu() -> None:
    topology = load_topology(None)
    assert topology == Topology()
    assert (topology.prefill.replicas, topology.decode.replicas) == (1, 1)
    assert (topology.proxy.host, topology.proxy.port, topology.proxy.admin.port) == (
        "127.0.0.1",
        8000,
        8001,
    )
    assert (topology.prefill.port, topology.prefill.kv_port, topology.decode.port) == (
        8100,
        15100,
        8200,
    )
    assert topology.uses_tiny_model()
    assert topology.model_path() == Path("~/.cache/pdserve/tiny-llama").expanduser()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (
            {"prefill": {"replicas": 1, "port": 8100, "kv_port": 15100, "replica": 2}},
            "prefill.replica",
        ),
        ({"decod": {}}, "decod"),
        ({"proxy": {"admin": {"prot": 1}}}, "proxy.admin.prot"),
        (
            {"prefill": {"port": 8100, "kv_port": 15100, "resources": {"cpus": 0}}},
            "prefill.resources.cpus",
        ),
        ({"decode": {"port": 8200, "replicas": -1}}, "decode.replicas"),
        ({"decode": {"port": 8200, "replicas": 9}}, "decode"),
        ({"proxy": {"port": 8100}}, "prefill.port"),
        ({"decode": {"port": 8105}}, "decode.port"),
        (
            {"prefill": {"port": 8100, "kv_port": 15100, "resources": {"gpus": 1}}},
            "prefill.resources",
        ),
        ({"accelerator": "gpu"}, "prefill.resources.gpus"),
        ({"accelerator": "tpu"}, "accelerator"),
        ({"proxy": {"prefill": ["http://127.0.0.1:9"]}}, "proxy.prefill"),
        ({"proxy": {"admin": {"port": None}}}, "proxy.admin.port"),
        ({"prefill": {"port": 8100}}, "prefill.kv_port"),
    ],
)
def test_bad_topology_names_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(TopologyError) as info:
        validate_topology(data)
    message = str(info.value)
    assert "\n" not in message
    assert field in message, message


def test_unknown_key_message() -> None:
    with pytest.raises(TopologyError, match=r"prefill\.resource: unknown key"):
        validate_topology({"prefill": {"port": 8100, "kv_port": 15100, "resource": {}}})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: [1,\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(bad)
    with pytest.raises(TopologyError, match="cannot read topology"):
        load_topology(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(TopologyError, match="mapping"):
        load_topology(scalar)


def test_with_replicas_revalidates() -> None:
    topology = Topology()
    assert topology.with_replicas(prefill=2).prefill.replicas == 2
    assert topology.with_replicas(decode=0).decode.replicas == 0
    with pytest.raises(TopologyError, match="max_replicas"):
        topology.with_replicas(prefill=9)


def test_resource_checks() -> None:
    topology = validate_topology(
        {"prefill": {"port": 8100, "kv_port": 15100, "replicas": 2, "resources": {"cpus": 1}}}
    )
    check_resources(topology, {"CPU": 3.0})
    with pytest.raises(PreflightError, match=r"need 3 CPU, the cluster has 2"):
        check_resources(topology, {"CPU": 2.0})
    big = validate_topology({"decode": {"port": 8200, "resources": {"cpus": 64}}})
    with pytest.raises(PreflightError, match=r"decode\.resources: one instance needs 64 CPU"):
        check_resources(big, {"CPU": 2.0})
    gpu = load_topology(DEPLOY / "topologies" / "gpu-xpyd.yaml")
    with pytest.raises(PreflightError, match="GPU"):
        check_resources(gpu, {"CPU": 64.0})


def test_ray_cluster_launcher_yaml() -> None:
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "auth", "setup_commands"):
        assert key in config
    assert config["provider"]["type"] == "local"
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "RAY_AUTH_MODE=token" in head
    assert "ray start --address=" in worker and "RAY_AUTH_MODE=token" in worker
    # The workers get the head's token before they start Ray.
    assert any("auth_token" in c for c in config["worker_setup_commands"])


def test_kuberay_example() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text()))
    cluster = next(d for d in documents if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    embedded = validate_topology(yaml.safe_load(config_map["data"]["topology.yaml"]))
    assert embedded.accelerator.value == "gpu"


def test_multinode_script() -> None:
    script = DEPLOY / "multinode" / "start-node.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "export RAY_AUTH_MODE=token" in text
    assert "ray get-auth-token --generate" in text
    assert "ray start --head" in text and 'ray start --address="$RAY_HEAD"' in text
    # The accelerator environment must be exported before any `ray start`.
    first_start = text.index("\n    ray start ")
    assert text.index("export ASCEND_RT_VISIBLE_DEVICES") < first_start
    assert text.index("export NCCL_SOCKET_IFNAME") < first_start


def test_multinode_script_refuses_a_loopback_node_address_and_a_missing_token(
    tmp_path: Path,
) -> None:
    script = DEPLOY / "multinode" / "start-node.sh"
    # Both refusals come before any `ray` command runs: PATH without ray proves it.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    head = subprocess.run(
        ["bash", str(script), "head", "cpu"],
        env={**env, "NODE_IP": "127.0.0.1"},
        capture_output=True,
        text=True,
    )
    assert head.returncode == 2
    assert "set NODE_IP=<this node's address>" in head.stderr
    worker = subprocess.run(
        ["bash", str(script), "worker", "cpu"],
        env={**env, "RAY_HEAD": "10.0.0.1:6379"},
        capture_output=True,
        text=True,
    )
    assert worker.returncode == 2
    assert "set RAY_AUTH_TOKEN" in worker.stderr
