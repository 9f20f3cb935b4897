"""GPU check of the staged KV path: ordering, byte identity and GB/s (one CUDA GPU, no vLLM).

Two processes on one GPU, like a prefill and a decode worker sharing a node: a producer
process serves KV caches laid out like vLLM's GPU cache (per layer one view into a single
flat int8 allocation) through ``kv_transfer.block_server.BlockServer``; this process pulls
scattered blocks with ``kv_transfer.block_client.BlockClient`` into its own cache.

1. Ordering and byte identity: while a matmul loop keeps the GPU busy on another stream,
   each pull is followed at once by a kernel on a third stream that reads the pulled
   blocks; what it read must equal the producer's bytes. Layouts:
   ``blocks_first`` ``[num_blocks, 2, block_size, num_kv_heads, head_size]`` and
   ``kv_first`` ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (block dim 1).
2. Throughput for 16/64/256 MiB requests: the staged pull (socket + device-to-host on the
   producer + host-to-device on the consumer) against a plain pinned ``copy_`` of the same
   bytes in the same run, with each staging half and the loopback TCP ceiling alongside.

Usage: ``python -m benchmarks.gpu_staging_check --out DIR [--quick]``. Prints a table and
writes DIR/gpu_staging_check.json; exits 1 if any check fails. Without CUDA it prints one
line and exits 0. ``--cpu-staging`` runs everything with CPU tensors through the staged path
(a smoke test of this script on a machine without a GPU). The tests in
tests/kv_transfer/test_device_staging.py run ``run_ordering_check`` from here.

Imports only torch, numpy and the kv_transfer transport modules (no vLLM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kv_transfer import wire
from kv_transfer.block_client import BlockClient, ClientSettings
from kv_transfer.block_server import BlockServer, ServerSettings
from kv_transfer.device import KVCacheAccess
from kv_transfer.leases import LeaseTable

MIB = 1024 * 1024
SECRET = b"gpu-staging-check"
DEFAULT_SIZES_MIB = (16, 64, 256)
LAYOUTS = ("blocks_first", "kv_first")
START_TIMEOUT_S = 180.0

# (request id, remote block ids) the producer holds for the consumer.
Hold = tuple[str, list[int]]


@dataclass(frozen=True)
class CacheSpec:
    """One engine's KV cache geometry; both processes build it from this."""

    layout: str  # "blocks_first" or "kv_first"
    num_layers: int
    num_blocks: int
    block_size: int = 16
    num_kv_heads: int = 8
    head_size: int = 128
    seed: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def block_dim(self) -> int:
        return 1 if self.layout == "kv_first" else 0

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One layer's block once the block dim is moved first: ``[2, bs, heads, head]``."""
        return (2, self.block_size, self.num_kv_heads, self.head_size)

    @property
    def layer_shape(self) -> tuple[int, ...]:
        rest = (self.block_size, self.num_kv_heads, self.head_size)
        if self.layout == "kv_first":
            return (2, self.num_blocks, *rest)
        if self.layout == "blocks_first":
            return (self.num_blocks, 2, *rest)
        raise ValueError(f"unknown layout {self.layout!r}")

    @property
    def layer_block_nbytes(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_size * 2  # bf16

    @property
    def block_nbytes(self) -> int:
        """One block across all layers: the bytes a pull moves per block id."""
        return self.num_layers * self.layer_block_nbytes

    def fingerprint(self) -> wire.KVFingerprint:
        return wire.KVFingerprint(
            model="gpu-staging-check",
            dtype=str(self.dtype),
            block_size=self.block_size,
            layout=self.layout,
            num_layers=self.num_layers,
            block_shape=self.block_shape,
        )


def make_cache(spec: CacheSpec, device: torch.device, fill: bool) -> list[torch.Tensor]:
    """Per-layer views of ONE flat int8 allocation, the way vLLM allocates its GPU KV cache.

    ``fill`` writes random bytes from ``spec.seed``: the same bytes in every process on the
    same device, so the consumer rebuilds the producer's cache as its reference.
    """
    per_layer = int(np.prod(spec.layer_shape))
    elem = torch.empty((), dtype=spec.dtype).element_size()
    flat = torch.zeros(spec.num_layers * per_layer * elem, dtype=torch.int8, device=device)
    if fill:
        gen = torch.Generator(device=device).manual_seed(spec.seed)
        flat.random_(-128, 128, generator=gen)
    typed = flat.view(spec.dtype)
    return [
        typed[i * per_layer : (i + 1) * per_layer].view(spec.layer_shape)
        for i in range(spec.num_layers)
    ]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the producer process ---------------------------------------------------------------------


def _producer_main(
    jobs: list[tuple[CacheSpec, list[Hold]]],
    device_name: str,
    force_staging: bool,
    conn: Connection,
) -> None:
    """Serve one cache per job on its own BlockServer until told to stop."""
    servers: list[BlockServer] = []
    try:
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        for spec, holds in jobs:
            layers = make_cache(spec, device, fill=True)
            _synchronize(device)
            access = KVCacheAccess(layers, block_dim=spec.block_dim, force_staging=force_staging)
            leases = LeaseTable()
            for request_id, block_ids in holds:
                leases.add(request_id, block_ids, time.time() + 3600.0)
            server = BlockServer(
                ServerSettings(host="127.0.0.1", port=0, secret=SECRET, io_timeout_s=120.0),
                spec.fingerprint(),
                access,
                leases,
                engine_id=f"producer-{spec.layout}",
            )
            server.start()
            servers.append(server)
        conn.send(("ready", [s.port for s in servers]))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        for server in servers:
            server.stop()
        return
    try:
        conn.recv()  # "stop", or EOF when the parent is gone
    except EOFError:
        pass
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def producer(
    jobs: list[tuple[CacheSpec, list[Hold]]], device: torch.device, force_staging: bool
) -> Iterator[list[tuple[str, int]]]:
    """Start the producer process (spawn); yield one address per job."""
    ctx = torch.multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(
        target=_producer_main,
        args=(jobs, str(device), force_staging, child),
        name="gpu-staging-producer",
        daemon=True,
    )
    process.start()
    child.close()
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise RuntimeError(f"producer process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            message = parent.recv()
        except EOFError:
            raise RuntimeError(
                f"producer process died on start (exit code {process.exitcode})"
            ) from None
        if message[0] != "ready":
            raise RuntimeError("producer process failed:\n" + str(message[1]))
        yield [("127.0.0.1", int(port)) for port in message[1]]
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        process.join(30)
        if process.is_alive():
            process.terminate()
            process.join(5)
        parent.close()


# -- consumer-side helpers --------------------------------------------------------------------


class ComputeLoad:
    """A matmul loop on its own stream, keeping the GPU busy while a pull copies."""

    def __init__(self, device: torch.device, size: int = 4096, batch: int = 8) -> None:
        self._device = device
        self._size = size
        self._batch = batch
        self._stop = threading.Event()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self.matmuls = 0
        self.error: BaseException | None = None

    def __enter__(self) -> ComputeLoad:
        if self._device.type != "cuda":
            return self
        self._thread = threading.Thread(target=self._run, name="compute-load", daemon=True)
        self._thread.start()
        if not self._running.wait(60):
            raise RuntimeError("compute load did not start")
        if self.error is not None:
            raise RuntimeError("compute load failed") from self.error
        return self

    def _run(self) -> None:
        try:
            stream = torch.cuda.Stream(self._device)
            with torch.cuda.stream(stream):
                a = torch.randn(self._size, self._size, device=self._device, dtype=torch.bfloat16)
                b = torch.randn_like(a)
                c = torch.empty_like(a)
                while not self._stop.is_set():
                    for _ in range(self._batch):
                        torch.matmul(a, b, out=c)
                    self.matmuls += self._batch
                    self._running.set()
                    stream.synchronize()  # bounded queue; releases the GIL while it waits
        except BaseException as exc:
            self.error = exc
            self._running.set()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)


def read_blocks_on_new_stream(
    layers: Sequence[torch.Tensor], block_dim: int, index: torch.Tensor
) -> list[torch.Tensor]:
    """Gather ``index``'s blocks of every layer, as uint8, on a stream nobody else uses.

    Called right after a pull returns: if the pull's host-to-device copy were not complete
    and visible, these kernels could read stale bytes.
    """
    device = layers[0].device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        out = [
            layer.movedim(block_dim, 0).index_select(0, index).contiguous().view(torch.uint8)
            for layer in layers
        ]
    if stream is not None:
        stream.synchronize()
    return out


def _request_plan(
    num_blocks: int, requests: int, blocks: int, seed: int
) -> list[tuple[str, list[int], list[int]]]:
    """Scattered, disjoint (request id, remote ids, local ids) per request."""
    rng = np.random.default_rng(seed)
    remote = rng.permutation(num_blocks).tolist()
    local = rng.permutation(num_blocks).tolist()
    return [
        (f"req-{i}", remote[i * blocks : (i + 1) * blocks], local[i * blocks : (i + 1) * blocks])
        for i in range(requests)
    ]


def _client(spec: CacheSpec) -> BlockClient:
    return BlockClient(
        ClientSettings(secret=SECRET, connect_timeout_s=10.0, io_timeout_s=120.0),
        spec.fingerprint(),
    )


# -- 1. ordering and byte identity ------------------------------------------------------------


def run_ordering_check(
    device: torch.device | str = "cuda",
    layouts: Sequence[str] = LAYOUTS,
    *,
    force_staging: bool = False,
    requests: int = 3,
    blocks_per_request: int = 24,
    num_layers: int = 4,
) -> dict[str, Any]:
    """Pull scattered blocks under compute load and read them at once on another stream.

    Returns ``{"ok": bool, "layouts": [...]}``; each layout lists the layers whose bytes
    differed per request and how many bytes outside the pulled blocks were written.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    num_blocks = requests * blocks_per_request * 2
    specs = [
        CacheSpec(layout, num_layers=num_layers, num_blocks=num_blocks, seed=11 + i)
        for i, layout in enumerate(layouts)
    ]
    plans = [_request_plan(num_blocks, requests, blocks_per_request, seed=7) for _ in specs]
    jobs = [
        (spec, [(req, remote) for req, remote, _ in plan])
        for spec, plan in zip(specs, plans, strict=True)
    ]
    results: list[dict[str, Any]] = []
    with producer(jobs, device, force_staging) as addresses:
        for spec, plan, address in zip(specs, plans, addresses, strict=True):
            results.append(_check_layout(spec, plan, address, device, force_staging))
    return {"ok": all(r["ok"] for r in results), "layouts": results}


def _check_layout(
    spec: CacheSpec,
    plan: list[tuple[str, list[int], list[int]]],
    address: tuple[str, int],
    device: torch.device,
    force_staging: bool,
) -> dict[str, Any]:
    reference = make_cache(spec, device, fill=True)
    dst = make_cache(spec, device, fill=False)
    access = KVCacheAccess(dst, block_dim=spec.block_dim, force_staging=force_staging)
    client = _client(spec)
    mismatches: dict[str, list[int]] = {}
    matmuls = 0
    try:
        for request_id, remote, local in plan:
            local_index = torch.as_tensor(local, dtype=torch.long, device=device)
            remote_index = torch.as_tensor(remote, dtype=torch.long, device=device)
            _synchronize(device)
            with ComputeLoad(device) as load:
                client.pull(address, request_id, remote, access, local)
                got = read_blocks_on_new_stream(dst, spec.block_dim, local_index)
            if load.error is not None:
                raise RuntimeError("compute load failed") from load.error
            matmuls += load.matmuls
            want = [
                layer.movedim(spec.block_dim, 0).index_select(0, remote_index).view(torch.uint8)
                for layer in reference
            ]
            bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if not g.equal(w)]
            if bad:
                mismatches[request_id] = bad
    finally:
        client.close()
    pulled = sorted(b for _, _, local in plan for b in local)
    untouched = [b for b in range(spec.num_blocks) if b not in set(pulled)]
    stray = 0
    if untouched:
        index = torch.as_tensor(untouched, dtype=torch.long, device=device)
        stray = sum(
            int(layer.movedim(spec.block_dim, 0).index_select(0, index).count_nonzero())
            for layer in dst
        )
    return {
        "layout": spec.layout,
        "layer_shape": list(spec.layer_shape),
        "staged": access.staged,
        "requests": len(plan),
        "blocks_per_request": len(plan[0][1]) if plan else 0,
        "matmuls_during_pulls": matmuls,
        "mismatched_layers": mismatches,
        "stray_nonzero_elements": stray,
        "ok": not mismatches and stray == 0,
    }


# -- 2. throughput ----------------------------------------------------------------------------


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else float("inf")


def _time(fn: Any, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


class _Loopback:
    """The TCP ceiling: one ``sendall`` of N bytes into ``recv_into``, sender in a thread."""

    def __init__(self, nbytes: int) -> None:
        self._payload = bytearray(nbytes)
        self._sink = bytearray(nbytes)
        listener = socket.create_server(("127.0.0.1", 0))
        self._sender = socket.create_connection(listener.getsockname())
        self._receiver, _ = listener.accept()
        listener.close()
        for sock in (self._sender, self._receiver):
            wire.tune_socket(sock, 4 * MIB)

    def transfer(self, nbytes: int) -> None:
        thread = threading.Thread(
            target=self._sender.sendall, args=(memoryview(self._payload)[:nbytes],)
        )
        thread.start()
        wire.recv_into_exact(self._receiver, memoryview(self._sink)[:nbytes])
        thread.join()

    def close(self) -> None:
        self._sender.close()
        self._receiver.close()


def measure_throughput(
    device: torch.device, sizes_mib: Sequence[int], reps: int, num_layers: int, cpu: bool
) -> list[dict[str, Any]]:
    max_blocks = max(
        size * MIB // CacheSpec("blocks_first", num_layers, 1).block_nbytes for size in sizes_mib
    )
    spec = CacheSpec("blocks_first", num_layers=num_layers, num_blocks=2 * max_blocks, seed=5)
    plans: dict[int, tuple[str, list[int], list[int]]] = {}
    for size in sizes_mib:
        count = max(1, size * MIB // spec.block_nbytes)
        _, remote, local = _request_plan(spec.num_blocks, 1, count, seed=size)[0]
        plans[size] = (f"bench-{size}", remote, local)
    holds = [(req, remote) for req, remote, _ in plans.values()]
    rows: list[dict[str, Any]] = []
    with producer([(spec, holds)], device, force_staging=cpu) as (address,):
        reference = make_cache(spec, device, fill=True)
        dst = make_cache(spec, device, fill=False)
        src_access = KVCacheAccess(reference, force_staging=cpu)
        dst_access = KVCacheAccess(dst, force_staging=cpu)
        client = _client(spec)
        loopback = _Loopback(max(size * MIB for size in sizes_mib))
        try:
            for size in sizes_mib:
                request_id, remote, local = plans[size]
                nbytes = len(remote) * spec.block_nbytes
                row = _measure_size(
                    spec, device, nbytes, request_id, remote, local, reps,
                    reference, dst, src_access, dst_access, client, address, loopback,
                )  # fmt: skip
                rows.append(row)
                _print_row(rows[-1], header=len(rows) == 1)
        finally:
            client.close()
            loopback.close()
    return rows


def _measure_size(
    spec: CacheSpec,
    device: torch.device,
    nbytes: int,
    request_id: str,
    remote: list[int],
    local: list[int],
    reps: int,
    reference: list[torch.Tensor],
    dst: list[torch.Tensor],
    src_access: KVCacheAccess,
    dst_access: KVCacheAccess,
    client: BlockClient,
    address: tuple[str, int],
    loopback: _Loopback,
) -> dict[str, Any]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def h2d() -> None:
        dev.copy_(host, non_blocking=True)
        _synchronize(device)

    def d2h() -> None:
        host.copy_(dev, non_blocking=True)
        _synchronize(device)

    def pull() -> None:
        client.pull(address, request_id, remote, dst_access, local, release=False)

    def send_stage() -> None:  # producer half without the socket: gather + device-to-host
        for _views in src_access.iter_send_buffers(remote):
            pass

    def commit_stage() -> None:  # consumer half without the socket: host-to-device + scatter
        for layer in range(dst_access.num_layers):
            dst_access.recv_views(layer, local)
            dst_access.commit_recv(layer, local)

    # Identity first, from a zeroed cache, before the timed runs rewrite the same blocks.
    for layer in dst:
        layer.zero_()
    _synchronize(device)
    pull()
    local_index = torch.as_tensor(local, dtype=torch.long, device=device)
    remote_index = torch.as_tensor(remote, dtype=torch.long, device=device)
    got = read_blocks_on_new_stream(dst, 0, local_index)
    identical = all(
        g.equal(r.index_select(0, remote_index).view(torch.uint8))
        for g, r in zip(got, reference, strict=True)
    )
    timings = {
        "pinned_h2d": _time(h2d, reps),
        "pinned_d2h": _time(d2h, reps),
        "staged_pull": _time(pull, reps),
        "send_stage": _time(send_stage, reps),
        "commit_stage": _time(commit_stage, reps),
        "tcp_loopback": _time(lambda: loopback.transfer(nbytes), reps),
    }
    row: dict[str, Any] = {
        "size_mib": round(nbytes / MIB, 3),
        "blocks": len(remote),
        "layers": spec.num_layers,
        "identical": identical,
    }
    row |= {f"{name}_gbps": _gbps(nbytes, seconds) for name, seconds in timings.items()}
    row |= {f"{name}_ms": round(seconds * 1e3, 3) for name, seconds in timings.items()}
    row["pull_vs_pinned_h2d"] = round(timings["pinned_h2d"] / timings["staged_pull"], 3)
    row["pull_vs_tcp_loopback"] = round(timings["tcp_loopback"] / timings["staged_pull"], 3)
    return row


def _print_row(row: dict[str, Any], header: bool) -> None:
    columns = (
        ("MiB", "size_mib", 7),
        ("H2D", "pinned_h2d_gbps", 7),
        ("D2H", "pinned_d2h_gbps", 7),
        ("pull", "staged_pull_gbps", 7),
        ("pull/H2D", "pull_vs_pinned_h2d", 8),
        ("send-stg", "send_stage_gbps", 8),
        ("commit-stg", "commit_stage_gbps", 10),
        ("tcp", "tcp_loopback_gbps", 7),
        ("pull/tcp", "pull_vs_tcp_loopback", 8),
    )
    if header:
        print("GB/s per request size (medians); pull = staged pull through the block server")
        print(" ".join(f"{title:>{width}}" for title, _, width in columns) + "  identical")
    print(
        " ".join(f"{row[key]:>{width}.2f}" for _, key, width in columns)
        + f"  {'yes' if row['identical'] else 'NO'}",
        flush=True,
    )


# -- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_staging_check",
        description="Ordering, byte identity and GB/s of the staged KV path on one CUDA GPU.",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="JSON dir")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and requests")
    parser.add_argument(
        "--sizes-mib",
        default=",".join(str(s) for s in DEFAULT_SIZES_MIB),
        help="comma-separated request sizes in MiB (default 16,64,256)",
    )
    parser.add_argument("--layers", type=int, default=8, help="KV layers of the cache")
    parser.add_argument(
        "--cpu-staging",
        action="store_true",
        help="use CPU tensors through the staged path (tests this script without a GPU)",
    )
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes_mib.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes-mib: not a list of integers: {args.sizes_mib!r}")
    if not sizes or min(sizes) <= 0:
        parser.error("--sizes-mib: sizes must be positive")
    if args.cpu_staging:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("no CUDA device: skipped")
        return 0
    reps = 3 if args.quick else 10
    started = time.perf_counter()

    print(f"device: {_describe(device)}; torch {torch.__version__}", flush=True)
    ordering = run_ordering_check(
        device, force_staging=args.cpu_staging, requests=2 if args.quick else 4
    )
    for entry in ordering["layouts"]:
        print(
            f"ordering/identity {entry['layout']:<12} {tuple(entry['layer_shape'])}: "
            f"{'ok' if entry['ok'] else 'FAILED'} ({entry['requests']} pulls, "
            f"{entry['matmuls_during_pulls']} matmuls alongside, mismatched layers "
            f"{entry['mismatched_layers'] or 'none'}, stray {entry['stray_nonzero_elements']})",
            flush=True,
        )
    rows = measure_throughput(device, sizes, reps, args.layers, cpu=args.cpu_staging)
    ok = bool(ordering["ok"]) and all(r["identical"] for r in rows)
    result = {
        "benchmark": "gpu_staging_check",
        "created_unix": time.time(),
        "device": _describe(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "quick": args.quick,
        "repetitions": reps,
        "geometry": _geometry(args.layers),
        "ordering_check": ordering,
        "throughput": rows,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "ok": ok,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_staging_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'ALL CHECKS PASSED' if ok else 'CHECK FAILED'}; wrote {path}", flush=True)
    return 0 if ok else 1


def _geometry(num_layers: int) -> dict[str, Any]:
    spec = CacheSpec("blocks_first", num_layers=num_layers, num_blocks=0)
    geometry = {k: v for k, v in asdict(spec).items() if k not in ("num_blocks", "seed")}
    return geometry | {"dtype": "bfloat16", "layer_block_nbytes": spec.layer_block_nbytes}


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} (CPU tensors through the staged path)"


if __name__ == "__main__":
    sys.exit(main())
