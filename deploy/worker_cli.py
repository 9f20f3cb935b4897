"""``pdserve worker prefill|decode|aggregated --model DIR``: run one vLLM worker in the foreground.

The vLLM server runs as a child in its own process group. SIGTERM, SIGINT or SIGHUP to this
command stops the whole group (SIGTERM, then SIGKILL after ``--stop-grace-s``), so a supervisor
that signals only this process leaves no engine processes behind. ``--vllm-args`` passes further
arguments to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from deploy.cli import CliError
from deploy.worker_launch import (
    ROLES,
    WorkerConfigError,
    WorkerSpec,
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
        "--advertise-host", default=None, help="address decode workers dial (prefill)"
    )
    parser.add_argument(
        "--cpu-core",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND value: a core (0), a range (0-3) or auto",
    )
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache size in GiB")
    parser.add_argument("--block-size", type=int, default=128, help="KV block size in tokens")
    parser.add_argument("--dtype", default="auto", help="model dtype (vLLM --dtype)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--served-model-name", default=None, help="default: the model dir name")
    parser.add_argument("--engine-id", default=None, help="default: <role>-<host>-<port>")
    parser.add_argument(
        "--kv-secret",
        default=os.environ.get("PDSERVE_KV_SECRET", ""),
        help="shared secret of the KV transfer (default: $PDSERVE_KV_SECRET)",
    )
    parser.add_argument("--lease-s", type=float, default=None, help="prefill block lease")
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
        secret=args.kv_secret,
        served_model_name=args.served_model_name,
        block_size=args.block_size,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        lease_s=args.lease_s,
        kv_load_failure_policy=args.kv_load_failure_policy,
        advertise_host=args.advertise_host,
        device=args.device,
        visible_devices=args.visible_devices,
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

    previous = {signum: signal.signal(signum, request_stop) for signum in _STOP_SIGNALS}
    try:
        proc = start_worker(spec, log_path=args.log_file, validate=False)
        print(
            f"pdserve worker: {spec.role} starting at {spec.url} (pid {proc.pid})",
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
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status != 0:
        raise CliError(f"vLLM server exited with status {status} (see its output above)")
    return 0


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
