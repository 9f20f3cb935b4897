"""Checks `pdserve up` runs before it starts anything: model, ports, resources.

Each failure is a :class:`PreflightError` whose one-line message names the topology
field to fix; nothing has been started when one is raised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from deploy.topology import Topology
from deploy.worker_launch import port_is_free

ROLES = ("prefill", "decode")


class PreflightError(ValueError):
    pass


def check_model(topology: Topology) -> None:
    if topology.uses_tiny_model():
        return  # generated on demand
    path = topology.model_path()
    if not path.is_dir():
        raise PreflightError(f"model: directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise PreflightError(
            f"model: {path} has no config.json (not a Hugging Face model directory)"
        )


def check_ports(topology: Topology) -> None:
    """The ports the initial instances and the proxy will bind must be free here."""
    proxy = topology.proxy
    wanted: list[tuple[str, str, int]] = [("proxy.port", proxy.host, proxy.port)]
    if proxy.admin.port:
        wanted.append(("proxy.admin.port", proxy.admin.host, proxy.admin.port))
    # Workers on other nodes bind there; only loopback-bound workers are surely local.
    if topology.worker_host in ("127.0.0.1", "localhost"):
        for role in ROLES:
            pool = topology.pool(role)
            for i in range(pool.replicas):
                wanted.append((f"{role}.port", topology.worker_host, pool.port + i))
                if pool.kv_port is not None:
                    wanted.append((f"{role}.kv_port", topology.worker_host, pool.kv_port + i))
    for field, host, port in wanted:
        if port and not port_is_free(host, port):
            raise PreflightError(f"{field}: port {port} on {host} is already in use")


def required_resources(topology: Topology) -> dict[str, float]:
    total: dict[str, float] = {}
    for role in ROLES:
        pool = topology.pool(role)
        for key, amount in pool.resources.ray_bundle().items():
            total[key] = total.get(key, 0.0) + amount * pool.replicas
    return total


def check_resources(topology: Topology, available: Mapping[str, float]) -> None:
    """Every instance must fit the cluster, and all initial instances together too."""
    for role in ROLES:
        pool = topology.pool(role)
        if not pool.replicas:
            continue
        for key, amount in pool.resources.ray_bundle().items():
            have = float(available.get(key, 0.0))
            if amount > have:
                raise PreflightError(
                    f"{role}.resources: one instance needs {amount:g} {key}, "
                    f"the cluster has {have:g}"
                )
    for key, amount in required_resources(topology).items():
        have = float(available.get(key, 0.0))
        if amount > have + 1e-9:
            raise PreflightError(
                f"prefill/decode.resources: {topology.prefill.replicas} prefill + "
                f"{topology.decode.replicas} decode need {amount:g} {key}, the cluster has {have:g}"
            )


def local_resources(topology: Topology) -> dict[str, float]:
    """What a local Ray cluster started by `pdserve up` will offer."""
    resources: dict[str, float] = {"CPU": float(topology.ray.num_cpus or os.cpu_count() or 1)}
    gpus = topology.ray.num_gpus
    if gpus is None:
        gpus = _count_visible_gpus()
    if gpus:
        resources["GPU"] = float(gpus)
    npus = _count_npus()
    if npus:
        resources["NPU"] = float(npus)
    return resources


def _count_visible_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    return len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit()])


def _count_npus() -> int:
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    return len([d for d in os.listdir("/dev") if d.startswith("davinci") and d[7:].isdigit()])
