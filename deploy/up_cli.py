"""`pdserve up`: start an xPyD cluster on Ray from a topology file (or the built-in 1P1D).

Stages, one progress line each: validate the topology and preflight (nothing runs
yet), make the tiny model if needed, start or join Ray, start the controller, the
proxy, then every instance. `up` stays in the foreground; Ctrl-C, SIGTERM or
`pdserve down` stop everything it started, Ray included when `up` started Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

from deploy.cli import CliError
from deploy.cluster_state import (
    ClusterState,
    add_state_dir_argument,
    clear_state,
    kill_recorded_workers,
    pid_alive,
    read_state,
    state_dir,
    write_secret_file,
    write_state,
)
from deploy.up_session import serve_in_own_session

# The teardown's share for the controller to stop instances and proxy in order; what is
# left after it is killed (SIGTERM to `up` must end everything within seconds).
_ORDERLY_STOP_S = 8.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help="topology YAML (default: 1 prefill + 1 decode on CPU, tiny model)",
    )
    parser.add_argument(
        "--address", default=None, help="join this Ray cluster instead of starting one"
    )
    parser.add_argument(
        "--namespace", default=None, help="Ray namespace (default: the topology's ray.namespace)"
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="with --address: return once ready and leave the cluster running "
        "(stop it with `pdserve down`)",
    )
    add_state_dir_argument(parser)


class _Progress:
    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def __call__(self, stage: str, message: str) -> None:
        print(f"[{time.monotonic() - self._t0:6.1f}s] {stage:<10} {message}", flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from deploy.preflight import (
        PreflightError,
        check_model,
        check_ports,
        check_resources,
        local_resources,
    )
    from deploy.topology import TopologyError, load_topology

    progress = _Progress()
    directory = state_dir(args.state_dir)
    try:
        topology = load_topology(args.config)
        if args.address:
            topology.ray.address = args.address
        if args.namespace:
            topology.ray.namespace = args.namespace
        if args.detach and not topology.ray.address:
            raise CliError(
                "--detach needs --address (a local Ray cluster lives as long as `pdserve up`)"
            )
        kv_secret = topology.configured_kv_secret()
        check_model(topology)
        check_ports(topology)
        if topology.ray.address is None:
            check_resources(topology, local_resources(topology))
    except (TopologyError, PreflightError) as exc:
        raise CliError(str(exc)) from None
    existing = read_state(directory)
    if existing is not None and pid_alive(existing.up_pid):
        raise CliError(
            f"a cluster is already running (pid {existing.up_pid}, state {directory}); "
            "run `pdserve down` first"
        )
    exit_code = serve_in_own_session(directory)
    if exit_code is not None:
        return exit_code  # the launcher: the child served (and cleaned up) the cluster
    progress(
        "topology",
        f"{topology.prefill.replicas} prefill + {topology.decode.replicas} decode on "
        f"{topology.accelerator.value}, source {args.config or 'built-in default'}",
    )
    model = _ensure_model(topology, progress)
    kv_secret = _ensure_kv_secret(topology, kv_secret, directory, progress)

    signal.signal(signal.SIGTERM, _terminate)
    session = _Session(topology, directory, progress, kv_secret)
    try:
        session.start_ray()
        # ray.init installs its own SIGTERM handler (which just dies); ours tears down first.
        signal.signal(signal.SIGTERM, _terminate)
        session.start_controller()
        urls = session.start_proxy()
        session.start_instances()
        progress(
            "ready",
            f"API {urls['api']}  metrics {urls['metrics']}  admin {urls['admin']}  "
            f"model {topology.served_model_name or model.name} ({model})",
        )
        if args.detach:
            session.detach()
            progress("detached", "stop with `pdserve down`")
            return 0
        progress("serving", "Ctrl-C or `pdserve down` stops everything")
        session.wait_until_stopped()
    except KeyboardInterrupt:
        progress("stopping", "signal received")
    finally:
        # A second Ctrl-C must not interrupt the teardown half-way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        session.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not session.detached:
        what = "all instances, the proxy" + (" and Ray" if session.started_ray else "")
        progress("stopped", f"{what} are down")
    return 0


def _ensure_kv_secret(topology: Any, secret: str, directory: Path, progress: _Progress) -> str:
    """The cluster's KV secret: the configured one, else a new random one stored 0600 in the
    state directory (for workers started by hand to join with ``--kv-secret-file``). Workers
    get it through their environment; it is never printed, logged or put in an argv."""
    if secret:
        if topology.kv_secret is not None:
            source = "kv_secret"
        elif topology.kv_secret_file is not None:
            source = f"kv_secret_file {topology.kv_secret_file}"
        else:
            source = "the environment ($PDSERVE_KV_SECRET or $PDSERVE_KV_SECRET_FILE)"
        progress("kv-secret", f"from {source}")
        return secret
    secret = secrets.token_urlsafe(32)
    try:
        path = write_secret_file(directory, secret)
    except OSError as exc:
        raise CliError(f"--state-dir: cannot write {directory}: {exc.strerror}") from None
    progress("kv-secret", f"generated for this cluster, stored in {path} (mode 0600)")
    return secret


def _ensure_model(topology: Any, progress: _Progress) -> Path:
    path: Path = topology.model_path()
    if not topology.uses_tiny_model():
        progress("model", str(path))
        return path
    if (path / "config.json").is_file():
        progress("model", f"tiny model at {path}")
        return path
    from deploy.tiny_model import make_tiny_model

    started = time.monotonic()
    try:
        make_tiny_model(path)
    except OSError as exc:
        raise CliError(f"tiny_model_dir: cannot write {path}: {exc.strerror}") from None
    progress("model", f"created tiny model at {path} ({time.monotonic() - started:.1f} s)")
    return path


class _Session:
    """What this `up` started, so that stop() undoes exactly that."""

    def __init__(
        self, topology: Any, directory: Path, progress: _Progress, kv_secret: str = ""
    ) -> None:
        self.topology = topology
        self.kv_secret = kv_secret
        self.directory = directory
        self.progress = progress
        self.started_ray = False
        self.controller: Any = None
        self.detached = False
        self._state: ClusterState | None = None

    def start_ray(self) -> None:
        import ray

        from deploy.preflight import PreflightError, check_resources

        settings = self.topology.ray
        try:
            if settings.address:
                ray.init(
                    address=settings.address,
                    namespace=settings.namespace,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
            else:
                # Ray runs its workers at nice 15; vLLM engines niced like that starve next to
                # any other busy process on the node. The raylet reads this at start.
                os.environ.setdefault("RAY_worker_niceness", "0")
                temp_dir = settings.temp_dir
                ray.init(
                    # Without ray.address this `up` owns a cluster of its own. Ray's default
                    # would join the one named in <temp dir>/ray_current_cluster (or
                    # RAY_ADDRESS): after a crashed `ray start`, a dead address.
                    address="local",
                    num_cpus=settings.num_cpus or os.cpu_count(),
                    num_gpus=settings.num_gpus,
                    namespace=settings.namespace,
                    include_dashboard=settings.include_dashboard,
                    _temp_dir=os.path.expanduser(temp_dir) if temp_dir else None,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
                self.started_ray = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CliError(f"ray.address: cannot start or join Ray: {_first_line(exc)}") from None
        address = ray.get_runtime_context().gcs_address
        if not self.started_ray:
            try:
                check_resources(self.topology, ray.cluster_resources())
            except PreflightError as exc:
                ray.shutdown()
                raise CliError(str(exc)) from None
        from deploy.controller import CONTROLLER_NAME

        try:
            ray.get_actor(CONTROLLER_NAME, namespace=settings.namespace)
        except ValueError:
            pass
        else:
            if not self.started_ray:
                ray.shutdown()
            raise CliError(
                "ray.namespace: a pdserve controller already runs in namespace "
                f"{settings.namespace!r}; "
                "run `pdserve down` or pick another namespace"
            )
        how = "started local cluster" if self.started_ray else "joined"
        auth = os.environ.get("RAY_AUTH_MODE", "disabled")
        self.progress("ray", f"{how} at {address} (namespace {settings.namespace}, auth {auth})")
        proxy = self.topology.proxy
        self._state = ClusterState(
            ray_address=address,
            namespace=settings.namespace,
            auth_mode=auth,
            started_ray=self.started_ray,
            up_pid=os.getpid(),
            foreground=True,
            api_url=f"http://{proxy.host}:{proxy.port}/v1",
            metrics_url=f"http://{proxy.host}:{proxy.port}/metrics",
            admin_url=f"http://{proxy.admin.host}:{proxy.admin.port}",
            admin_token=proxy.admin.token,
            run_dir=str(self.directory),
            temp_dir=settings.temp_dir,
        )
        write_state(self.directory, self._state)

    def start_controller(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from deploy.controller import CONTROLLER_NAME, Controller

        node_id = ray.get_runtime_context().get_node_id()
        self.controller = (
            ray.remote(Controller)
            .options(
                name=CONTROLLER_NAME,
                namespace=self.topology.ray.namespace,
                lifetime="detached",
                num_cpus=0,
                max_restarts=0,
                max_concurrency=100,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            # The secret travels apart from the topology, which the controller reports.
            .remote(self.topology.without_secrets(), str(self.directory), self.kv_secret)
        )
        self._call(self.controller.ping.remote(), 120)
        self.progress(
            "controller",
            f"{CONTROLLER_NAME} running (detached, namespace {self.topology.ray.namespace})",
        )

    def start_proxy(self) -> dict[str, str]:
        urls: dict[str, str] = self._call(self.controller.start_proxy.remote(), 180)
        self.progress("proxy", f"listening: API {urls['api']}, admin {urls['admin']}")
        if self._state is not None:
            # The controller names the proxy's node address where the topology says 0.0.0.0;
            # `pdserve status` prints what a client on another node can dial.
            self._state.api_url = urls["api"]
            self._state.metrics_url = urls["metrics"]
            self._state.admin_url = urls["admin"]
            write_state(self.directory, self._state)
        return urls

    def start_instances(self) -> None:
        import ray

        names: list[str] = self._call(self.controller.launch.remote(), 120)
        self.progress("instances", f"launching {', '.join(names) or 'none (both pools are empty)'}")
        started = time.monotonic()
        pending = {self.controller.wait_ready.remote(name): name for name in names}
        deadline = started + self.topology.controller.ready_timeout_s + 60
        while pending:
            done, _ = ray.wait(
                list(pending), num_returns=1, timeout=max(1.0, deadline - time.monotonic())
            )
            if not done:
                raise CliError(f"instances not ready in time: {', '.join(pending.values())}")
            ref = done[0]
            name = pending.pop(ref)
            info = self._call(ref, 5)
            core = f", core {info['cpu_core']}" if info.get("cpu_core") is not None else ""
            self.progress(
                name,
                f"ready at {info['url']} (pid {info['pid']}{core}, "
                f"{time.monotonic() - started:.1f} s)",
            )

    def wait_until_stopped(self) -> None:
        """Serve until a signal arrives or the controller disappears (`pdserve down`)."""
        while True:
            time.sleep(2.0)
            try:
                self._call(self.controller.ping.remote(), 30)
            except CliError:
                self.progress("stopping", "controller is gone")
                return

    def detach(self) -> None:
        self.detached = True
        if self._state is not None:
            self._state.foreground = False
            write_state(self.directory, self._state)

    def stop(self) -> None:
        import ray

        if not ray.is_initialized():
            clear_state(self.directory)
            return
        if self.detached:
            ray.shutdown()
            return
        if self.controller is not None:
            try:
                ray.get(self.controller.shutdown.remote(), timeout=_ORDERLY_STOP_S)
                self.progress("stopping", "instances and proxy stopped")
            except ray.exceptions.GetTimeoutError:
                self.progress("stopping", f"not all stopped within {_ORDERLY_STOP_S:.0f} s")
            except Exception as exc:
                self.progress("stopping", f"controller shutdown failed: {_first_line(exc)}")
            with contextlib.suppress(Exception):
                ray.kill(self.controller, no_restart=True)
            self.controller = None
        if killed := kill_recorded_workers(self.directory):
            self.progress("stopping", f"killed {killed} worker(s) that were still running")
        ray.shutdown()
        if self.started_ray:
            self.progress("stopping", "local Ray cluster stopped")
        clear_state(self.directory)

    def _call(self, ref: Any, timeout_s: float) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise CliError(
                f"timed out after {timeout_s:.0f} s waiting for the controller"
            ) from None
        except ray.exceptions.RayError as exc:
            raise CliError(_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    # Ray's task errors carry the remote traceback; the message is its last line.
    return text[-1] if text else type(exc).__name__
