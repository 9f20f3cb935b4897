"""Build, start and stop one vLLM worker process (prefill, decode or aggregated).

This is the single place that knows how a pdserve worker maps onto a vLLM OpenAI server command
line: the role's engine settings (``prefill_worker/role.py``, ``decode_worker/role.py``), the KV
connector config, core binding and KV-cache size. ``pdserve worker``, the Ray launcher and the
test fixtures all go through it, so a worker started by any of them is the same process.

Lifecycle::

    spec = WorkerSpec(role="prefill", model=Path("/models/tiny"), api_port=8100, kv_port=15100)
    proc = start_worker(spec, log_path=Path("/tmp/prefill.log"))
    wait_until_ready(spec.url, timeout_s=300, proc=proc)
    ...
    stop_worker(proc)

The server runs in its own process group (its own session), so ``stop_worker`` reaches vLLM's
engine-core and worker processes too and nothing outlives it.

Being the module that owns worker processes, it also holds the process helpers that the rest
of the project (tests and benchmarks included) shares rather than rewrites: ``free_port``,
``port_is_free``, ``stop_process_group`` and ``group_alive``.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from proxy.instances import KvEventsEndpoint

Role = Literal["prefill", "decode", "aggregated"]
Device = Literal["cpu", "cuda", "npu"]

ROLES: tuple[Role, ...] = ("prefill", "decode", "aggregated")

# Where each role's engine settings live. Imported lazily: the role modules import RoleSettings
# from here.
_ROLE_MODULES: dict[str, str] = {
    "prefill": "prefill_worker.role",
    "decode": "decode_worker.role",
}

# The variable that restricts a process to some accelerators, per device type.
VISIBLE_DEVICES_ENV: dict[str, str] = {
    "cuda": "CUDA_VISIBLE_DEVICES",
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
}

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# Bind addresses that mean "every interface".
_WILDCARD_HOSTS = ("0.0.0.0", "", "::", "*")


@dataclass(frozen=True)
class RoleSettings:
    """Engine settings that follow from a worker's role, not from the deployment."""

    name: str
    kv_role: str | None  # the connector's role ("producer"/"consumer"); None runs no connector
    api_port_base: int  # instance i listens on api_port_base + i by default
    kv_port_base: int | None  # instance i's block server port by default; None: no server
    # Instance i publishes vLLM's KV events on kv_events_port_base + i and answers replay
    # requests on kv_events_replay_port_base + i by default (see WorkerSpec.kv_events).
    kv_events_port_base: int
    kv_events_replay_port_base: int
    max_num_batched_tokens: int | None = None  # None keeps vLLM's default
    max_num_seqs: int | None = None
    extra_args: tuple[str, ...] = ()


# An ordinary vLLM server with no connector: the baseline that PD output is compared with.
AGGREGATED_SETTINGS = RoleSettings(
    name="aggregated",
    kv_role=None,
    api_port_base=8300,
    kv_port_base=None,
    kv_events_port_base=16300,
    kv_events_replay_port_base=17300,
)


def role_settings(role: str) -> RoleSettings:
    """The engine settings of ``role`` (``prefill``, ``decode`` or ``aggregated``)."""
    if role == "aggregated":
        return AGGREGATED_SETTINGS
    if role not in _ROLE_MODULES:
        raise ValueError(f"unknown worker role {role!r}; expected one of {list(ROLES)}")
    settings: RoleSettings = importlib.import_module(_ROLE_MODULES[role]).SETTINGS
    return settings


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start one worker.

    ``kv_port`` is where a prefill worker's block server listens (rank r of a TP group uses
    ``kv_port + r``); decode workers only dial out, but the port still goes into their config.
    ``cpu_core`` is the value of ``VLLM_CPU_OMP_THREADS_BIND`` (``0``, ``"0-3"``, ``"auto"``);
    give every instance on a host its own cores (``pdserve worker`` claims free ones when it is
    None, see ``deploy/core_claims.py``; None here leaves the choice to vLLM). ``kv_cache_gib``
    is the KV cache size: on CPU ``VLLM_CPU_KVCACHE_SPACE``, on accelerators
    ``--kv-cache-memory-bytes``.
    ``visible_devices`` restricts a GPU/NPU worker to some devices (``CUDA_VISIBLE_DEVICES`` /
    ``ASCEND_RT_VISIBLE_DEVICES``). ``extra_args`` are appended to vLLM's command line last, so
    they override anything set here. ``env`` adds or overrides environment variables.
    ``kv_events`` turns on vLLM's KV cache events: a ZMQ PUB socket on ``kv_events_port`` and a
    replay ROUTER socket on ``kv_events_replay_port`` (None: the role's base + ``index``), both
    bound on ``host``; a proxy dials them at ``advertise_host`` (else ``host``), see
    :func:`advertised_kv_events`.
    ``secret`` is the KV-transfer shared secret: it reaches the server through its environment
    (``$PDSERVE_KV_SECRET``), never its argv or the ``--kv-transfer-config`` JSON, which vLLM
    logs.
    """

    role: Role
    model: Path
    api_port: int | None = None  # None: the role's default port for ``index``
    kv_port: int | None = None
    index: int = 0
    host: str = "127.0.0.1"
    cpu_core: int | str | None = None
    kv_cache_gib: int = 1
    engine_id: str | None = None  # None: derived from role, host and API port
    secret: str = field(default="", repr=False)
    served_model_name: str | None = None  # None: the model directory's name
    block_size: int = 128
    dtype: str = "auto"
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    lease_s: float | None = None  # None: the connector's default
    kv_load_failure_policy: Literal["fail", "recompute"] = "recompute"
    advertise_host: str | None = None  # address decode instances and proxies dial, if not ``host``
    kv_events: bool = True
    kv_events_port: int | None = None  # None: the role's default port for ``index``
    kv_events_replay_port: int | None = None
    device: Device = "cpu"
    visible_devices: str | None = None
    python: str = sys.executable
    # On CPU, confine the whole server (API server, engine core, workers) to ``cpu_core``, not
    # only the compute threads vLLM binds: the unbound processes busy-poll vLLM's
    # shared-memory queue and would otherwise run on, and slow, a neighbour engine's cores.
    pin_process_tree: bool = False
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> RoleSettings:
        return role_settings(self.role)

    @property
    def resolved_api_port(self) -> int:
        if self.api_port is not None:
            return self.api_port
        return self.settings.api_port_base + self.index

    @property
    def resolved_kv_port(self) -> int | None:
        if self.kv_port is not None:
            return self.kv_port
        base = self.settings.kv_port_base
        return None if base is None else base + self.index

    @property
    def resolved_kv_events_port(self) -> int:
        if self.kv_events_port is not None:
            return self.kv_events_port
        return self.settings.kv_events_port_base + self.index

    @property
    def resolved_kv_events_replay_port(self) -> int:
        if self.kv_events_replay_port is not None:
            return self.kv_events_replay_port
        return self.settings.kv_events_replay_port_base + self.index

    @property
    def dial_host(self) -> str:
        """The address other processes reach this worker's listeners at (no brackets)."""
        host = self.advertise_host or self.host
        return "127.0.0.1" if host in _WILDCARD_HOSTS else host

    @property
    def resolved_engine_id(self) -> str:
        return self.engine_id or f"{self.role}-{self.host}-{self.resolved_api_port}"

    @property
    def resolved_model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @property
    def url(self) -> str:
        """The base URL of the worker's OpenAI API (what the proxy is given)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"http://{host}:{self.resolved_api_port}"


class WorkerConfigError(ValueError):
    """A WorkerSpec that cannot start: the message names the field and the reason."""


def kv_transfer_config(spec: WorkerSpec) -> dict[str, object] | None:
    """The ``--kv-transfer-config`` dict of ``spec``, or None for a worker without a connector."""
    kv_role = spec.settings.kv_role
    if kv_role is None:
        return None
    from kv_transfer.config import DEFAULT_LEASE_S, DEFAULT_PORT, connector_config

    kv_port = spec.resolved_kv_port
    return connector_config(
        kv_role,
        spec.resolved_engine_id,
        host=spec.host,
        port=DEFAULT_PORT if kv_port is None else kv_port,
        # No secret here: vLLM logs this JSON and it sits in argv. See secret_env.
        lease_s=DEFAULT_LEASE_S if spec.lease_s is None else spec.lease_s,
        kv_load_failure_policy=spec.kv_load_failure_policy,
        advertise_host=spec.advertise_host,
    )


def zmq_bind_endpoint(host: str, port: int) -> str:
    """A ZMQ endpoint that vLLM's KV-events publisher *binds* on ``host:port``.

    vLLM binds its PUB socket only for endpoints holding ``*`` or ``::`` and connects for any
    other (``ZmqEventPublisher._is_bind_endpoint``), so ``tcp://10.0.0.5:16100`` would make
    it dial out instead of listen. A wildcard host becomes ``tcp://*:port``; an IPv4 address
    is written IPv4-mapped (``tcp://[::ffff:10.0.0.5]:port``), which vLLM binds and ZMQ
    listens on as that IPv4 address only, so events are not offered on more interfaces than
    the API. ValueError for hosts ZMQ cannot bind without its IPv6 option (IPv6 addresses,
    names that do not resolve to IPv4).
    """
    if host in _WILDCARD_HOSTS:
        return f"tcp://*:{port}"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # ZMQ binds addresses and interface names, never DNS names ("localhost")
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError as exc:
            raise ValueError(f"cannot resolve {host!r} to an IPv4 address: {exc}") from None
    if address.version != 4:
        raise ValueError(
            f"cannot bind KV events on IPv6 address {host}; use an IPv4 or 0.0.0.0 host, or "
            "turn KV events off"
        )
    return f"tcp://[::ffff:{address}]:{port}"


def kv_events_config(spec: WorkerSpec) -> dict[str, object] | None:
    """The ``--kv-events-config`` dict of ``spec`` (vLLM's ``KVEventsConfig`` fields), or None
    when its KV events are off."""
    if not spec.kv_events:
        return None
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": zmq_bind_endpoint(spec.host, spec.resolved_kv_events_port),
        "replay_endpoint": zmq_bind_endpoint(spec.host, spec.resolved_kv_events_replay_port),
        # Subscribers filter on it; the role tells a prefill's stream from a decode's.
        "topic": f"kv-events.{spec.role}",
    }


def advertised_kv_events(spec: WorkerSpec) -> KvEventsEndpoint | None:
    """Where a proxy dials ``spec``'s KV events (the host of its advertised URL), or None."""
    if not spec.kv_events:
        return None
    from proxy.instances import KvEventsEndpoint

    host = f"[{spec.dial_host}]" if ":" in spec.dial_host else spec.dial_host
    return KvEventsEndpoint(
        endpoint=f"tcp://{host}:{spec.resolved_kv_events_port}",
        replay_endpoint=f"tcp://{host}:{spec.resolved_kv_events_replay_port}",
    )


def secret_env(secret: str) -> dict[str, str]:
    """The variables that hand ``secret`` to the connector in every vLLM process.

    Both are always set, so a ``$PDSERVE_KV_SECRET_FILE`` inherited from the caller can neither
    override the spec's secret nor conflict with it; an empty value means "none".
    """
    from kv_transfer.config import SECRET_ENV, SECRET_FILE_ENV

    return {SECRET_ENV: secret, SECRET_FILE_ENV: ""}


def build_command(spec: WorkerSpec) -> tuple[list[str], dict[str, str]]:
    """Return ``(argv, env)`` that run ``spec``'s vLLM server.

    ``env`` holds only the variables the worker needs on top of the inherited environment (so a
    caller on another host can apply it to its own environment); ``start_worker`` merges it
    with ``os.environ``.
    """
    settings = spec.settings
    argv = [
        spec.python,
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        str(spec.model),
        "--served-model-name",
        spec.resolved_model_name,
        "--host",
        spec.host,
        "--port",
        str(spec.resolved_api_port),
        # P and D exchange block ids, so both must use the same block size; never leave it to
        # the platform default.
        "--block-size",
        str(spec.block_size),
        "--dtype",
        spec.dtype,
        "--enable-prefix-caching" if spec.enable_prefix_caching else "--no-enable-prefix-caching",
        # Every non-streamed answer then says how much of its prompt the prefix cache held
        # (usage.prompt_tokens_details.cached_tokens): the proxy checks its cache-aware
        # routing against it (proxy/hit_check.py).
        "--enable-prompt-tokens-details",
    ]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if settings.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(settings.max_num_batched_tokens)]
    if settings.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(settings.max_num_seqs)]
    kv_config = kv_transfer_config(spec)
    env: dict[str, str] = {}
    if kv_config is not None:
        argv += ["--kv-transfer-config", json.dumps(kv_config, separators=(",", ":"))]
        env.update(secret_env(spec.secret))
    events_config = kv_events_config(spec)
    if events_config is not None:
        argv += ["--kv-events-config", json.dumps(events_config, separators=(",", ":"))]
    if spec.device == "cpu":
        # CPU has no graph capture to gain from, and eager start is several times faster.
        argv.append("--enforce-eager")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)
        if spec.cpu_core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(spec.cpu_core)
    else:
        argv += ["--kv-cache-memory-bytes", str(spec.kv_cache_gib * 1024**3)]
        if spec.visible_devices is not None:
            env[VISIBLE_DEVICES_ENV[spec.device]] = spec.visible_devices
    argv += list(settings.extra_args)
    argv += list(spec.extra_args)
    env.update(spec.env)
    return argv, env


def validate_spec(spec: WorkerSpec) -> None:
    """Check what can be checked before a 30-second engine start; raise WorkerConfigError."""
    if spec.role not in ROLES:
        raise WorkerConfigError(f"role: unknown role {spec.role!r}; expected one of {list(ROLES)}")
    model = Path(spec.model)
    if not model.is_dir():
        raise WorkerConfigError(f"model: {model} is not a directory")
    if not (model / "config.json").is_file():
        raise WorkerConfigError(f"model: {model} has no config.json (not a HF model directory)")
    if spec.block_size <= 0:
        raise WorkerConfigError(f"block_size: must be positive, got {spec.block_size}")
    if spec.kv_cache_gib <= 0:
        raise WorkerConfigError(f"kv_cache_gib: must be positive, got {spec.kv_cache_gib}")
    if spec.device != "cpu" and spec.device not in VISIBLE_DEVICES_ENV:
        raise WorkerConfigError(f"device: unknown device {spec.device!r}")
    ports = listening_ports(spec)
    for name, port in ports:
        if not 0 < port < 65536:
            raise WorkerConfigError(f"{name}: must be in 1..65535, got {port}")
    owners: dict[int, str] = {}
    for name, port in ports:
        if port in owners:
            raise WorkerConfigError(f"{name}: port {port} is also the {owners[port]}")
        owners[port] = name
    for name, port in ports:
        if not port_is_free(spec.host, port):
            raise WorkerConfigError(f"{name}: {spec.host}:{port} is already in use")
    try:
        kv_transfer_config(spec)
    except ValueError as exc:
        raise WorkerConfigError(f"kv transfer config: {exc}") from exc
    try:
        kv_events_config(spec)
    except ValueError as exc:
        raise WorkerConfigError(f"kv_events: {exc}") from exc
    if spec.settings.kv_role is not None:
        _validate_secret(spec)


def listening_ports(spec: WorkerSpec) -> list[tuple[str, int]]:
    """``(field, port)`` of every port ``spec``'s server listens on (on ``spec.host``)."""
    ports = [("api_port", spec.resolved_api_port)]
    kv_port = spec.resolved_kv_port
    if spec.settings.kv_port_base is not None and kv_port is not None:
        ports.append(("kv_port", kv_port))  # only roles that listen for block pulls
    if spec.kv_events:
        ports.append(("kv_events_port", spec.resolved_kv_events_port))
        ports.append(("kv_events_replay_port", spec.resolved_kv_events_replay_port))
    return ports


def _validate_secret(spec: WorkerSpec) -> None:
    from kv_transfer.block_server import is_loopback
    from kv_transfer.config import SecretError, check_secret

    if spec.secret:
        try:
            check_secret(spec.secret, "secret")
        except SecretError as exc:
            raise WorkerConfigError(str(exc)) from None
    elif spec.settings.kv_port_base is not None and not is_loopback(spec.host):
        # The block server would refuse to start, but only after the engine loaded the model.
        raise WorkerConfigError(
            f"secret: a {spec.role} worker listening on {spec.host} serves KV blocks to other "
            "hosts and needs a shared secret ($PDSERVE_KV_SECRET or a 0600 file in "
            "$PDSERVE_KV_SECRET_FILE / --kv-secret-file)"
        )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_is_free(host: str, port: int) -> bool:
    """True if ``host:port`` can be bound now (the check is racy by nature; it catches typos)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortPicker:
    """Ports for servers that bind them late: a vLLM engine binds its ports up to a minute
    after they are picked. Meanwhile a port from the kernel's ephemeral range may go to any
    process's outgoing or internal socket (an engine's own among them), and the kernel may
    offer a closed, never-connected port again at once. So picks come from just below that
    range, where only an explicit bind takes a port, start at a random offset (concurrent
    sessions stay apart), are free when picked, and never repeat for this picker."""

    # How many ports below the ephemeral range are used.
    SPAN = 10_000

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._given: set[int] = set()
        try:
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            low = 32768
        self._first = max(1024, low - self.SPAN)
        self._span = low - self._first
        self._next = secrets.randbelow(self._span) if self._span > 0 else 0

    def pick(self) -> int:
        for _ in range(self._span):
            port = self._first + self._next % self._span
            self._next += 1
            if port not in self._given and port_is_free(self._host, port):
                self._given.add(port)
                return port
        while True:  # nothing free below the range: the kernel's pick, unique here at least
            port = free_port(self._host)
            if port not in self._given:
                self._given.add(port)
                return port


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on now, for a server about to be started.

    The kernel picks it, so parallel test sessions and benchmarks do not collide. A pick is kept
    only if it also passes :func:`port_is_free`, the check ``validate_spec`` makes before it
    starts a worker, so a port from here is never refused there.
    """
    while True:
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port_is_free(host, port):
            return port


def start_worker(
    spec: WorkerSpec,
    log_path: Path | None = None,
    *,
    validate: bool = True,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``spec``'s server in its own process group; stdout and stderr go to ``log_path``.

    With ``log_path=None`` the server writes to this process's stdout/stderr (the foreground
    ``pdserve worker`` command). The caller owns the process and must ``stop_worker`` it.
    ``pass_fds`` are inherited by the server (``pdserve worker`` passes its core-claim locks,
    so the claim lasts as long as the engine does).
    """
    if validate:
        validate_spec(spec)
    argv, extra_env = build_command(spec)
    env = {**os.environ, **extra_env}
    pin = _pinned_cores(spec)
    log_file: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = log_path.open("ab")
    try:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file is not None else None,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            # Set in the child before exec, so every process and thread it starts inherits it.
            preexec_fn=None if pin is None else (lambda: os.sched_setaffinity(0, pin)),
        )
    finally:
        if log_file is not None:
            log_file.close()  # the child holds its own descriptor


# The reaper's whole program. It forks once and the parent exits, so the reaper is nobody's
# child: Ray kills a dying worker's direct children, which would take the reaper along with the
# API server and leave the engine core behind. Then a byte on stdin means "stopped on purpose";
# end of file without one means the holder died, and the group it started goes with it.
_REAPER = (
    "import os, signal, sys\n"
    "if os.fork():\n"
    "    os._exit(0)\n"
    "if not sys.stdin.buffer.read(1):\n"
    "    try:\n"
    "        os.killpg(int(sys.argv[1]), signal.SIGKILL)\n"
    "    except OSError:\n"
    "        pass\n"
)


class GroupLifeline:
    """SIGKILLs a worker's process group when the process holding this object dies first.

    A worker leads its own group (``start_new_session``), so nothing ties it to the process
    that started it. When that process dies abruptly (a Ray actor whose raylet was killed, a
    SIGKILLed ``pdserve worker``), the API server may go but vLLM's engine core keeps
    spinning on its cores and holding memory until someone sweeps it. A small reaper process
    in its own session reads a pipe whose only writer is the holder: the kernel closes it
    when the holder dies, however it dies, and the reaper then kills the group. Chosen over
    ``PR_SET_PDEATHSIG``, which reaches only the direct child, not the engine core below it.
    """

    def __init__(self, pgid: int) -> None:
        read_fd, write_fd = os.pipe()  # not inheritable: no other child holds the writer
        try:
            launcher = subprocess.Popen(
                [sys.executable, "-c", _REAPER, str(pgid)],
                stdin=read_fd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            launcher.wait(timeout=30.0)  # returns once the reaper forked off
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self.pgid = pgid
        self._write_fd: int | None = write_fd

    def release(self) -> None:
        """The group was stopped on purpose: the reaper exits without killing anything."""
        fd, self._write_fd = self._write_fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, b"x")
        os.close(fd)


def _pinned_cores(spec: WorkerSpec) -> set[int] | None:
    """The cores to confine ``spec``'s whole process tree to, or None to leave it free."""
    if not spec.pin_process_tree or spec.device != "cpu" or spec.cpu_core is None:
        return None
    from deploy.core_claims import parse_core_list

    cores = parse_core_list(str(spec.cpu_core))
    return set(cores) if cores else None


def wait_until_ready(
    url: str,
    timeout_s: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    poll_s: float = 0.5,
) -> None:
    """Block until ``url``'s ``/v1/models`` answers 200.

    Raises RuntimeError at once if ``proc`` exits first (with the end of ``log_path`` in the
    message) and TimeoutError after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    probe = url.rstrip("/") + "/v1/models"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"worker at {url} exited with status {proc.returncode} before it was ready"
                + _log_tail(log_path)
            )
        try:
            with urllib.request.urlopen(probe, timeout=2.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"worker at {url} not ready after {timeout_s:.0f} s" + _log_tail(log_path)
            )
        time.sleep(poll_s)


def stop_worker(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> int | None:
    """SIGTERM the worker's process group, SIGKILL whatever is left after ``grace_s``.

    Returns the server's exit status. Safe to call twice or on a process that already exited;
    vLLM's engine-core children are in the same group, so none are orphaned.
    """
    pgid = proc.pid  # start_new_session made the server its group's leader
    if proc.poll() is None and _own_group(proc.pid) is False:
        # Not started by start_worker: signalling "its" group would miss it; signal it alone.
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return proc.returncode
    signal_group(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        signal_group(pgid, signal.SIGKILL)
        proc.wait()
    # The leader can exit while spawned children are still shutting down; give them a moment,
    # then make sure.
    deadline = time.monotonic() + min(grace_s, 5.0)
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(pgid):
        signal_group(pgid, signal.SIGKILL)
    return proc.returncode


def _own_group(pid: int) -> bool | None:
    """Whether ``pid`` leads its own process group (None if it is gone)."""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return None


def stop_process_group(
    proc: subprocess.Popen[bytes], grace_s: float, *, kill_wait_s: float | None = None
) -> None:
    """SIGTERM the process group that ``proc`` leads; SIGKILL it if ``proc`` outlives ``grace_s``.

    ``proc`` must lead its own group (started with ``start_new_session=True``). Nothing is sent
    when ``proc`` has already exited. After the SIGKILL it waits ``kill_wait_s`` seconds for
    ``proc`` (None: as long as it takes), and ``subprocess.TimeoutExpired`` propagates.

    Only the leader is waited for: members of the group that outlive it are left alone (see
    :func:`stop_worker`, which also sweeps them, for a vLLM server).
    """
    if proc.poll() is not None:
        return
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=kill_wait_s)


def signal_group(pgid: int, signum: int) -> None:
    """``signum`` to every process of group ``pgid``; a group already gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_alive(pgid: int) -> bool:
    """Whether group ``pgid`` still has members (one we may not signal counts as alive)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(log_path: Path | None, lines: int = 20) -> str:
    if log_path is None or not log_path.is_file():
        return ""
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f"; last lines of {log_path}:\n" + "\n".join(tail)


def spec_from_mapping(data: Mapping[str, object]) -> WorkerSpec:
    """Build a WorkerSpec from plain data (YAML/JSON), refusing unknown keys by name."""
    known = set(WorkerSpec.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise WorkerConfigError(f"unknown worker fields {unknown}; known: {sorted(known)}")
    values = dict(data)
    if "model" in values:
        values["model"] = Path(str(values["model"]))
    if "extra_args" in values:
        extra = values["extra_args"]
        if isinstance(extra, str) or not isinstance(extra, Sequence):
            raise WorkerConfigError("extra_args: must be a list of strings")
        values["extra_args"] = tuple(str(arg) for arg in extra)
    return WorkerSpec(**values)  # type: ignore[arg-type]
