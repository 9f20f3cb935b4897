"""The xPyD topology file: which model, how many prefill and decode instances, what each
instance needs from Ray, and the proxy in front of them.

One YAML document serves both ``pdserve up -c FILE`` (the whole cluster) and
``pdserve proxy --config FILE`` (only its ``proxy:`` section). Every model refuses
unknown keys so a typo fails with the field's name instead of being ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deploy.worker_launch import role_settings
from kv_transfer.config import MIN_SECRET_CHARS, SecretError, read_secret, weak_secret_reason
from proxy.config import ProxyConfig, describe_validation_error

DEFAULT_TINY_MODEL_DIR = Path("~/.cache/pdserve/tiny-llama")


class TopologyError(ValueError):
    """The topology file cannot be used; the message is one line naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Accelerator(enum.StrEnum):
    CPU = "cpu"
    GPU = "gpu"
    NPU = "npu"


class PlacementStrategy(enum.StrEnum):
    """Ray placement-group strategies, applied to the bundles of one pool."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class InstanceResources(_Strict):
    """What one instance (one vLLM server) reserves in Ray.

    ``cpus`` is Ray's logical CPU count. ``gpus`` become Ray's ``GPU`` resource
    (``CUDA_VISIBLE_DEVICES`` is set by Ray); ``npus`` become Ray's ``NPU`` resource,
    and the worker gets ``ASCEND_RT_VISIBLE_DEVICES`` for the devices Ray assigned.
    """

    cpus: float = Field(default=1.0, gt=0)
    gpus: int = Field(default=0, ge=0)
    npus: int = Field(default=0, ge=0)
    # Cores for VLLM_CPU_OMP_THREADS_BIND on the CPU backend, handed out one per instance
    # in order; when empty each instance gets the least-used core of its node.
    cpu_cores: list[int] = Field(default_factory=list)
    # CPU only: confine each instance's whole process tree (API server, engine core, workers)
    # to its cores, not only the compute threads vLLM binds. The unbound processes busy-poll
    # vLLM's shared-memory queue; left free they run on the neighbour engines' cores, and an
    # engine (re)starting there starves the instances that serve beside it.
    pin_process_tree: bool = True
    # Extra custom Ray resources (e.g. {"node:10.0.0.5": 0.01} to pin a pool to a node).
    custom: dict[str, float] = Field(default_factory=dict)

    def ray_bundle(self) -> dict[str, float]:
        bundle: dict[str, float] = {"CPU": self.cpus}
        if self.gpus:
            bundle["GPU"] = float(self.gpus)
        if self.npus:
            bundle["NPU"] = float(self.npus)
        bundle.update(self.custom)
        return bundle


class KvEventsSettings(_Strict):
    """vLLM's KV cache events of a pool's instances: a ZMQ PUB socket and a replay ROUTER,
    bound on ``worker_host``; instance i uses ``port + i`` and ``replay_port + i``. The
    controller registers both endpoints with the proxy next to the instance's URL."""

    enabled: bool = True
    # None: the role's defaults (prefill 16100 / 17100, decode 16200 / 17200).
    port: int | None = Field(default=None, ge=1, le=65535)
    replay_port: int | None = Field(default=None, ge=1, le=65535)


class PoolSpec(_Strict):
    """One role's pool of identical instances; instance ``i`` listens on ``port + i``."""

    replicas: int = Field(default=1, ge=0)
    port: int = Field(ge=1, le=65535)
    # Prefill only: the KV-transfer server of instance i listens on ``kv_port + i``.
    kv_port: int | None = Field(default=None, ge=1, le=65535)
    # Highest replica count `pdserve scale` may reach; reserves the port range.
    max_replicas: int = Field(default=8, ge=1)
    kv_events: KvEventsSettings = KvEventsSettings()
    resources: InstanceResources = InstanceResources()
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    # KV cache per instance: VLLM_CPU_KVCACHE_SPACE on CPU, --kv-cache-memory-bytes elsewhere.
    kv_cache_gib: int = Field(default=1, ge=1)
    # Passed through verbatim to vLLM's api_server (e.g. ["--tensor-parallel-size", "2"]).
    vllm_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _replicas_fit(self) -> Self:
        if self.replicas > self.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        if self.port + self.max_replicas - 1 > 65535:
            raise ValueError(f"port range {self.port}+{self.max_replicas} runs past 65535")
        return self

    def api_ports(self) -> range:
        return range(self.port, self.port + self.max_replicas)

    def kv_ports(self) -> range:
        if self.kv_port is None:
            return range(0)
        return range(self.kv_port, self.kv_port + self.max_replicas)


class RaySettings(_Strict):
    """How `pdserve up` gets a Ray cluster: join ``address`` or start a local one."""

    # None starts a local cluster owned by `pdserve up` (stopped by Ctrl-C / `pdserve down`).
    address: str | None = None
    namespace: str = "pdserve"
    # Local cluster only: Ray's session directory root (keep it short: socket paths).
    temp_dir: str | None = None
    # Local cluster only: logical CPUs Ray offers; default = the machine's cores.
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    include_dashboard: bool = False
    # Ray restarts an instance actor this many times (-1 = forever) if its process dies.
    max_restarts: int = Field(default=-1, ge=-1)


class ControllerSettings(_Strict):
    # How often the controller checks its instances and re-syncs the proxy's registry.
    reconcile_interval_s: float = Field(default=1.0, gt=0)
    ready_timeout_s: float = Field(default=600.0, gt=0)
    drain_timeout_s: float = Field(default=300.0, gt=0)
    # A worker process that dies is started again after this delay (doubling, capped).
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    # A starting (or restarting) worker runs at this niceness until it answers /health, so
    # that loading a model does not starve the instances serving next to it on the node;
    # 0 = off. Needs root (only root can lower it again once the worker is ready).
    startup_niceness: int = Field(default=10, ge=0, le=19)


class PrometheusSettings(_Strict):
    # File-SD target file rewritten whenever the instance set changes; None = off.
    file_sd_path: str | None = None


class Topology(_Strict):
    # A local HF model directory; None means the generated tiny model in ``tiny_model_dir``.
    model: str | None = None
    tiny_model_dir: str = str(DEFAULT_TINY_MODEL_DIR)
    served_model_name: str | None = None
    # Shared secret of the KV-transfer connections between prefill and decode instances, or
    # a 0600 file holding it. Neither set: $PDSERVE_KV_SECRET(_FILE), else `pdserve up`
    # generates one per cluster. Placeholders and secrets under 16 characters are refused.
    kv_secret: str | None = Field(default=None, repr=False)
    kv_secret_file: str | None = None
    accelerator: Accelerator = Accelerator.CPU
    # Address the workers bind to; instance URLs use the node's IP when it is 0.0.0.0.
    worker_host: str = "127.0.0.1"
    prefill: PoolSpec = PoolSpec(port=8100, kv_port=15100)
    decode: PoolSpec = PoolSpec(port=8200)
    proxy: ProxyConfig = ProxyConfig()
    ray: RaySettings = RaySettings()
    controller: ControllerSettings = ControllerSettings()
    prometheus: PrometheusSettings = PrometheusSettings()

    @field_validator("kv_secret")
    @classmethod
    def _strong_secret(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "empty; leave kv_secret out and `pdserve up` generates a secret per cluster"
            )
        reason = weak_secret_reason(value)
        if reason is not None:
            # Never echo the value: the message ends up in terminals and logs.
            raise ValueError(
                f"the secret {reason}; use a random one of {MIN_SECRET_CHARS}+ characters "
                "or leave kv_secret out and `pdserve up` generates one"
            )
        return value

    @field_validator("kv_secret_file")
    @classmethod
    def _file_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty path")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kv_secret is not None and self.kv_secret_file is not None:
            raise ValueError("kv_secret/kv_secret_file: give one of them, not both")
        if self.proxy.prefill or self.proxy.decode:
            raise ValueError(
                "proxy.prefill/proxy.decode: leave empty under `pdserve up`; "
                "instances come from the prefill/decode pools"
            )
        if self.proxy.admin.port is None:
            raise ValueError("proxy.admin.port: `pdserve up` needs the admin listener")
        if self.prefill.kv_port is None:
            raise ValueError("prefill.kv_port: prefill instances need a KV-transfer port")
        if self.decode.kv_port is not None:
            raise ValueError("decode.kv_port: only prefill instances serve KV transfers")
        for name in ("prefill", "decode"):
            res = getattr(self, name).resources
            if self.accelerator is Accelerator.CPU and (res.gpus or res.npus):
                raise ValueError(f"{name}.resources: gpus/npus need accelerator: gpu or npu")
            if self.accelerator is Accelerator.GPU and (res.gpus < 1 or res.npus):
                raise ValueError(f"{name}.resources.gpus: accelerator gpu needs gpus >= 1")
            if self.accelerator is Accelerator.NPU and (res.npus < 1 or res.gpus):
                raise ValueError(f"{name}.resources.npus: accelerator npu needs npus >= 1")
        for name in ("prefill", "decode"):
            for field, ports in zip(
                ("port", "replay_port"), self.kv_events_ports(name), strict=True
            ):
                if ports and ports[-1] > 65535:
                    raise ValueError(
                        f"{name}.kv_events.{field}: port range {ports.start}+"
                        f"{len(ports)} runs past 65535"
                    )
        self._check_ports_disjoint()
        return self

    def kv_events_ports(self, role: str) -> tuple[range, range]:
        """The KV events PUB and replay ports the ``role`` pool reserves (instance i:
        element i); empty when its events are off."""
        pool = self.pool(role)
        if not pool.kv_events.enabled:
            return range(0), range(0)
        defaults = role_settings(role)
        port = pool.kv_events.port or defaults.kv_events_port_base
        replay = pool.kv_events.replay_port or defaults.kv_events_replay_port_base
        return range(port, port + pool.max_replicas), range(replay, replay + pool.max_replicas)

    def _check_ports_disjoint(self) -> None:
        owners: dict[int, str] = {}
        claims: list[tuple[str, range]] = [
            ("proxy.port", range(self.proxy.port, self.proxy.port + 1)),
            ("prefill.port", self.prefill.api_ports()),
            ("prefill.kv_port", self.prefill.kv_ports()),
            ("decode.port", self.decode.api_ports()),
        ]
        for name in ("prefill", "decode"):
            events, replay = self.kv_events_ports(name)
            claims += [
                (f"{name}.kv_events.port", events),
                (f"{name}.kv_events.replay_port", replay),
            ]
        if self.proxy.admin.port:
            claims.insert(
                1, ("proxy.admin.port", range(self.proxy.admin.port, self.proxy.admin.port + 1))
            )
        for field, ports in claims:
            for port in ports:
                if port == 0:
                    continue
                if port in owners:
                    raise ValueError(
                        f"{field}: port {port} overlaps {owners[port]} "
                        "(each pool reserves port .. port + max_replicas - 1)"
                    )
                owners[port] = field

    def pool(self, role: str) -> PoolSpec:
        if role == "prefill":
            return self.prefill
        if role == "decode":
            return self.decode
        raise ValueError(f"unknown role {role!r}")

    def configured_kv_secret(self, env: Mapping[str, str] | None = None) -> str:
        """The KV secret this topology configures (``kv_secret``, the file in
        ``kv_secret_file``), else ``$PDSERVE_KV_SECRET``/``$PDSERVE_KV_SECRET_FILE`` from
        ``env``; ``""`` when none is, and `pdserve up` should generate one."""
        try:
            return read_secret(
                self.kv_secret, self.kv_secret_file, env=env, names=("kv_secret", "kv_secret_file")
            )
        except SecretError as exc:
            raise TopologyError(str(exc)) from None

    def without_secrets(self) -> dict[str, Any]:
        """The topology as plain data, minus the KV secret (what the controller is given and
        what `topology()` reports)."""
        return self.model_dump(mode="json", exclude={"kv_secret", "kv_secret_file"})

    def model_path(self) -> Path:
        return Path(self.model or self.tiny_model_dir).expanduser()

    def uses_tiny_model(self) -> bool:
        return self.model is None

    def ray_address(self) -> str | None:
        return self.ray.address

    def with_replicas(self, prefill: int | None = None, decode: int | None = None) -> Topology:
        """A re-validated copy with other pool sizes (what `pdserve scale` asks for)."""
        data = self.model_dump(mode="json")
        if prefill is not None:
            data["prefill"]["replicas"] = prefill
        if decode is not None:
            data["decode"]["replicas"] = decode
        return validate_topology(data, source="scale")


def validate_topology(data: Any, source: str = "topology") -> Topology:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: expected a mapping at the top level")
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        raise TopologyError(f"{source}: {describe_validation_error(exc)}") from None


def load_topology(path: str | Path | None) -> Topology:
    """Read and validate a topology YAML; ``None`` is the embedded default (1P1D on CPU)."""
    if path is None:
        return Topology()
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TopologyError(f"cannot read topology {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return validate_topology(document, source=str(path))
