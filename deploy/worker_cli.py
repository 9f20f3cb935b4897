"""``pdserve worker prefill|decode|aggregated --model DIR``: run one vLLM worker in the foreground.

The vLLM server runs as a child in its own process group. SIGTERM, SIGINT or SIGHUP to this
command stops the whole group (SIGTERM, then SIGKILL after ``--stop-grace-s``), so a supervisor
that signals only this process leaves no engine processes behind. ``--vllm-args`` passes further
arguments to vLLM unchanged.

On CPU without ``--cpu-core`` the command claims free cores of this host
(``deploy/core_claims.py``), so several workers on one machine do not fight over the same cores;
when none is free, or another vLLM engine runs unpinned, it warns once and starts anyway.

The KV-transfer secret comes from ``$PDSERVE_KV_SECRET`` or a 0600 file (``--kv-secret-file``,
``$PDSERVE_KV_SECRET_FILE``) and reaches vLLM through its environment, never its argv.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from deploy import core_claims
from deploy.cli import CliError, add_removed_secret_flag
from deploy.worker_launch import (
    ROLES,
    WorkerConfigError,
    WorkerSpec,
    advertised_kv_events,
    start_worker,
    stop_worker,
    validate_spec,
)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=ROLES, help="which worker to run")
    parser.add_argument("--model", required=True, type=Path, help="local HF model directory")
    parser.add_argument(
        "--index",
        type=int,
        default=0,
        help="instance number; default ports are the role's base + index (prefill API 8100+i, "
        "KV 15100+i; decode API 8200+i)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=None, help="OpenAI API port")
    parser.add_argument("--kv-port", type=int, default=None, help="KV block server port (prefill)")
    parser.add_argument(
        "--advertise-host",
        default=None,
        help="address decode workers (prefill) and proxies (KV events) dial, if not --host",
    )
    parser.add_argument(
        "--kv-events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="publish vLLM's KV cache events over ZMQ (PUB + replay ROUTER) for proxies to "
        "follow (default: on)",
    )
    parser.add_argument(
        "--kv-events-port",
        type=int,
        default=None,
        help="KV events PUB port (default: prefill 16100+i, decode 16200+i, aggregated 16300+i)",
    )
    parser.add_argument(
        "--kv-events-replay-port",
        type=int,
        default=None,
        help="KV events replay port (default: prefill 17100+i, decode 17200+i, aggregated 17300+i)",
    )
    parser.add_argument(
        "--cpu-core",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND value: a core (0), a range (0-3) or auto (vLLM's "
        "choice); default: free cores no other pdserve worker on this host has claimed",
    )
    parser.add_argument(
        "--cpu-cores-per-worker",
        type=_positive_int,
        default=None,
        help="how many free cores to claim without --cpu-core (default: 1 on hosts with up to "
        "4 cores, else half of them)",
    )
    parser.add_argument(
        "--pin-process-tree",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="confine the whole server (API server, engine core, workers) to its CPU cores, not "
        "only vLLM's compute threads (default: on)",
    )
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache size in GiB")
    parser.add_argument("--block-size", type=int, default=128, help="KV block size in tokens")
    parser.add_argument("--dtype", default="auto", help="model dtype (vLLM --dtype)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--served-model-name", default=None, help="default: the model dir name")
    parser.add_argument("--engine-id", default=None, help="default: <role>-<host>-<port>")
    parser.add_argument(
        "--kv-secret-file",
        type=Path,
        default=None,
        help="file holding the shared secret of the KV transfer (mode 0600; the same secret on "
        "every prefill and decode worker). Default: $PDSERVE_KV_SECRET, else the file named by "
        "$PDSERVE_KV_SECRET_FILE. The secret reaches vLLM through its environment, never its "
        "command line; a prefill worker on a non-loopback --host refuses to start without one",
    )
    # Removed: a secret on the command line shows in `ps` and shell history. Kept as a flag
    # only to say so (and so that argparse does not take it for --kv-secret-file).
    add_removed_secret_flag(parser, "--kv-secret", "PDSERVE_KV_SECRET", "--kv-secret-file")
    parser.add_argument(
        "--lease-s",
        type=float,
        default=None,
        help="prefill: how long finished requests' KV blocks are held when no decode instance "
        "claims them (a decode renews its claim while the request waits in its queue)",
    )
    parser.add_argument(
        "--kv-load-failure-policy", choices=("fail", "recompute"), default="recompute"
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda", "npu"), default="cpu")
    parser.add_argument(
        "--visible-devices", default=None, help="CUDA_/ASCEND_RT_VISIBLE_DEVICES (GPU/NPU)"
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="write the server's output here (default: stdout)",
    )
    parser.add_argument(
        "--stop-grace-s", type=float, default=20.0, help="SIGTERM-to-SIGKILL grace on shutdown"
    )
    parser.add_argument(
        "--vllm-args",
        default="",
        help='extra vLLM arguments, appended last (shell syntax): --vllm-args="--seed 1"',
    )


def kv_secret_from(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str:
    """The KV secret ``--kv-secret-file`` names, else ``$PDSERVE_KV_SECRET(_FILE)``; ``""`` if
    none is configured."""
    from kv_transfer.config import SecretError, read_secret

    try:
        return read_secret(
            None, args.kv_secret_file, env=env, names=("--kv-secret", "--kv-secret-file")
        )
    except SecretError as exc:
        raise CliError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# vLLM flags whose product is the number of engine processes on this host, each of which needs
# its own '|'-separated core list in VLLM_CPU_OMP_THREADS_BIND.
_RANK_FLAGS = {
    "--tensor-parallel-size": "tp", "-tp": "tp",
    "--pipeline-parallel-size": "pp", "-pp": "pp",
    "--data-parallel-size": "dp", "-dp": "dp",
}  # fmt: skip


def local_ranks(extra_args: tuple[str, ...]) -> int:
    """The number of vLLM ranks (TP x PP x DP) that ``extra_args`` ask for; 1 by default."""
    sizes = {"tp": 1, "pp": 1, "dp": 1}
    for i, arg in enumerate(extra_args):
        name, sep, value = arg.partition("=")
        if name not in _RANK_FLAGS:
            continue
        if not sep:
            value = extra_args[i + 1] if i + 1 < len(extra_args) else ""
        with contextlib.suppress(ValueError):  # vLLM reports a bad value itself
            sizes[_RANK_FLAGS[name]] = max(1, int(value))
    return sizes["tp"] * sizes["pp"] * sizes["dp"]


def acquire_cores(
    spec: WorkerSpec, cores_per_worker: int | None = None
) -> tuple[WorkerSpec, core_claims.WorkerCores | None]:
    """Claim ``spec``'s CPU cores (see ``deploy/core_claims.py``); GPU/NPU workers claim none.

    Returns the spec to start (with the chosen cores when they were picked here) and the claim
    to release once the server has exited.
    """
    if spec.device != "cpu":
        return spec, None
    cores = core_claims.acquire_worker_cores(
        None if spec.cpu_core is None else str(spec.cpu_core),
        inherited=os.environ.get(core_claims.BIND_ENV),
        ranks=local_ranks(spec.extra_args),
        cores_per_worker=cores_per_worker,
    )
    if cores.picked:
        spec = dataclasses.replace(spec, cpu_core=cores.bind)
    return spec, cores


def spec_from_args(args: argparse.Namespace) -> WorkerSpec:
    try:
        extra = shlex.split(args.vllm_args)
    except ValueError as exc:
        raise CliError(f"--vllm-args: {exc}") from None
    cpu_core: int | str | None = args.cpu_core
    return WorkerSpec(
        role=args.role,
        model=args.model,
        api_port=args.port,
        kv_port=args.kv_port,
        index=args.index,
        host=args.host,
        cpu_core=cpu_core,
        kv_cache_gib=args.kv_cache_gib,
        engine_id=args.engine_id,
        secret=kv_secret_from(args) if args.role != "aggregated" else "",
        served_model_name=args.served_model_name,
        block_size=args.block_size,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        lease_s=args.lease_s,
        kv_load_failure_policy=args.kv_load_failure_policy,
        advertise_host=args.advertise_host,
        kv_events=args.kv_events,
        kv_events_port=args.kv_events_port,
        kv_events_replay_port=args.kv_events_replay_port,
        device=args.device,
        visible_devices=args.visible_devices,
        pin_process_tree=args.pin_process_tree,
        extra_args=tuple(extra),
    )


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    try:
        validate_spec(spec)
    except WorkerConfigError as exc:
        raise CliError(str(exc)) from None

    received: list[int] = []

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    spec, cores = acquire_cores(spec, args.cpu_cores_per_worker)
    previous = {signum: signal.signal(signum, request_stop) for signum in _STOP_SIGNALS}
    try:
        proc = start_worker(
            spec,
            log_path=args.log_file,
            validate=False,
            pass_fds=() if cores is None else cores.fds,
        )
        bound = f", cpu cores {cores.bind}" if cores is not None and cores.bind else ""
        print(
            f"pdserve worker: {spec.role} starting at {spec.url} "
            f"(pid {proc.pid}{bound}{_kv_events_note(spec)})",
            file=sys.stderr,
            flush=True,
        )
        while proc.poll() is None and not received:
            time.sleep(0.2)
        if received:
            stop_worker(proc, grace_s=args.stop_grace_s)
            return 0
        status = proc.returncode
    finally:
        if cores is not None:
            cores.release()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status != 0:
        raise CliError(f"vLLM server exited with status {status} (see its output above)")
    return 0


def _kv_events_note(spec: WorkerSpec) -> str:
    """The KV events endpoints to register with a proxy (``kv_events`` of a config entry)."""
    events = advertised_kv_events(spec)
    if events is None:
        return ""
    return f", kv events {events.endpoint} replay {events.replay_endpoint}"


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.worker_cli ...``: the same command without the ``pdserve`` dispatcher."""
    parser = argparse.ArgumentParser(prog="pdserve worker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        print(f"pdserve worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
