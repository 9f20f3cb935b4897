"""``pdserve bench kv``: KV transfer throughput of the TCP pull connector vs a raw socket.

For each request size (1 to 256 MiB of KV) it pulls one request's blocks through the
connector's real block server and client (authenticated pooled connection, read,
release) into torch tensors laid out like vLLM's CPU cache, and compares with the
loopback ceiling: a raw Python ``sendall`` of one buffer into ``recv_into`` of a
preallocated one. Block ids are either contiguous (a fresh prefill, an empty decode
cache) or scattered (fragmented caches: every block is a separate run).

Prints a table and writes JSON (default benchmarks/results/kv_transfer.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.cli import CliError

if TYPE_CHECKING:
    import torch

MIB = 1024 * 1024
DEFAULT_SIZES_MIB = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_OUTPUT = Path("benchmarks/results/kv_transfer.json")
SECRET = b"bench"
LOOPBACK = "127.0.0.1"
# The options of the engine phase (benchmarks/kv_pull_wait.py) on this command line.
ENGINE_PREFIX = "engine-"


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_size: int
    dtype: str

    @property
    def elem_size(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]

    @property
    def block_nbytes(self) -> int:
        """One block of one layer: ``[heads, block_size, 2*head_size]``."""
        return self.num_kv_heads * self.block_size * 2 * self.head_size * self.elem_size

    def blocks_for(self, nbytes: int) -> int:
        return max(1, nbytes // (self.block_nbytes * self.num_layers))


@dataclass
class Row:
    size_mib: float
    pattern: str
    blocks_per_layer: int
    raw_gbps: float  # median run
    connector_gbps: float
    ratio: float  # connector / raw, medians
    raw_best_gbps: float  # fastest run: least disturbed by other load on the machine
    connector_best_gbps: float
    best_ratio: float
    connector_ms: float
    raw_ms: float


def _row(pattern: str, nbytes: int, count: int, ours: list[float], raw: list[float]) -> Row:
    ours_s, raw_s = statistics.median(ours), statistics.median(raw)
    return Row(
        size_mib=round(nbytes / MIB, 3),
        pattern=pattern,
        blocks_per_layer=count,
        raw_gbps=round(nbytes / raw_s / 1e9, 3),
        connector_gbps=round(nbytes / ours_s / 1e9, 3),
        ratio=round(raw_s / ours_s, 3),
        raw_best_gbps=round(nbytes / min(raw) / 1e9, 3),
        connector_best_gbps=round(nbytes / min(ours) / 1e9, 3),
        best_ratio=round(min(raw) / min(ours), 3),
        connector_ms=round(ours_s * 1e3, 3),
        raw_ms=round(raw_s * 1e3, 3),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes-mib",
        default=",".join(str(s) for s in DEFAULT_SIZES_MIB),
        help="comma-separated request sizes in MiB (default 1..256)",
    )
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per size")
    parser.add_argument(
        "--pattern",
        choices=("contiguous", "scattered", "both"),
        default="both",
        help="block-id layout of the request (default both)",
    )
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument(
        "--socket-buffer-kib",
        type=int,
        default=4096,
        help="SO_SNDBUF/SO_RCVBUF of the connector's sockets (0 = kernel default)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result path")
    from benchmarks import kv_pull_wait

    engine = parser.add_argument_group(
        "pull wait on a computing prefill engine (benchmarks/kv_pull_wait.py)",
        "real vLLM prefill and decode engines: pull wait p50/p99 idle and under full "
        "prefills, and the decode's recompute count (must be 0); the JSON and PNG go next to "
        "--output unless --engine-out-dir",
    )
    engine.add_argument(
        "--engine", action="store_true", help="run this phase after the socket benchmark"
    )
    engine.add_argument(
        "--engine-only", action="store_true", help="run only this phase, not the socket benchmark"
    )
    kv_pull_wait.add_arguments(engine, prefix=ENGINE_PREFIX)


def _parse_sizes(text: str) -> list[float]:
    try:
        sizes = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CliError(f"--sizes-mib: not a list of numbers: {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise CliError("--sizes-mib: sizes must be positive")
    return sizes


# -- raw loopback ceiling ---------------------------------------------------------------------


class RawServer:
    """The loopback ceiling's sender: per 8-byte request N, one ``sendall`` of N bytes."""

    def __init__(self, max_bytes: int, buffer_bytes: int, host: str = LOOPBACK) -> None:
        self._payload = bytearray(max_bytes)
        self._buffer_bytes = buffer_bytes
        self.listener = socket.create_server((host, 0))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        _tune(conn, self._buffer_bytes)
        view = memoryview(self._payload)
        with conn:
            while True:
                header = conn.recv(8)
                if len(header) < 8:
                    return
                conn.sendall(view[: int.from_bytes(header, "big")])


class RawClient:
    """The loopback ceiling's receiver: ``recv_into`` a preallocated buffer."""

    def __init__(self, port: int, max_bytes: int, buffer_bytes: int, host: str = LOOPBACK) -> None:
        self.sock = socket.create_connection((host, port))
        _tune(self.sock, buffer_bytes)
        self.sink = bytearray(max_bytes)

    def transfer(self, nbytes: int) -> float:
        view = memoryview(self.sink)[:nbytes]
        started = time.perf_counter()
        self.sock.sendall(nbytes.to_bytes(8, "big"))
        got = 0
        while got < nbytes:
            n = self.sock.recv_into(view[got:], nbytes - got)
            if n == 0:
                raise RuntimeError("raw loopback closed")
            got += n
        return time.perf_counter() - started

    def close(self) -> None:
        self.sock.close()


def _tune(sock: socket.socket, buffer_bytes: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


# -- the connector path -----------------------------------------------------------------------


def _cache(geometry: Geometry, num_blocks: int, seed: int | None) -> list[torch.Tensor]:
    """Per-layer views of one flat buffer, like vLLM's CPU ``allocate_kv_cache``.

    ``seed`` fills it with reproducible random bytes (so the receiving process
    can rebuild the sender's content to verify); None zeroes it.
    """
    import torch

    dtype = getattr(torch, geometry.dtype)
    per_layer = num_blocks * geometry.block_nbytes
    flat = torch.zeros(geometry.num_layers * per_layer, dtype=torch.uint8)
    if seed is not None:
        flat.random_(0, 256, generator=torch.Generator().manual_seed(seed))
    shape = (num_blocks, geometry.num_kv_heads, geometry.block_size, 2 * geometry.head_size)
    return [
        flat[i * per_layer : (i + 1) * per_layer].view(dtype).view(shape)
        for i in range(geometry.num_layers)
    ]


def _block_ids(pattern: str, count: int, num_blocks: int, seed: int) -> list[int]:
    if pattern == "contiguous":
        return list(range(count))
    import random

    # Every other block, shuffled: no two ids adjacent, so nothing coalesces.
    ids = list(range(0, min(num_blocks, 2 * count), 2))[:count]
    random.Random(seed).shuffle(ids)
    return ids


def _fingerprint(geometry: Geometry) -> Any:
    from kv_transfer import wire

    return wire.KVFingerprint(
        model="bench",
        dtype=f"torch.{geometry.dtype}",
        block_size=geometry.block_size,
        layout="LBHNC",
        num_layers=geometry.num_layers,
        block_shape=(geometry.num_kv_heads, geometry.block_size, 2 * geometry.head_size),
    )


def _prefill_process(
    geometry: Geometry,
    num_blocks: int,
    max_bytes: int,
    buffer_bytes: int,
    pipe: Any,
    netns: str | None = None,
    host: str = LOOPBACK,
) -> None:
    """The sending side, in its own process like a real prefill worker (no shared GIL).

    With ``netns`` it serves from that network namespace (``pdserve bench kv-link``): entered
    before anything else runs, as setns moves only the calling thread.
    """
    if netns is not None:
        from deploy.multinode.netns_lab import enter_netns

        enter_netns(netns)
    from kv_transfer.block_server import BlockServer, ServerSettings
    from kv_transfer.device import KVCacheAccess
    from kv_transfer.leases import LeaseTable

    src = _cache(geometry, num_blocks, seed=SOURCE_SEED)
    leases = LeaseTable()
    server = BlockServer(
        ServerSettings(host=host, port=0, secret=SECRET, socket_buffer_bytes=buffer_bytes),
        _fingerprint(geometry),
        KVCacheAccess(src),
        leases,
        engine_id="bench-prefill",
    )
    server.start()
    raw_default = RawServer(max_bytes, 0, host)
    raw_tuned = RawServer(max_bytes, buffer_bytes, host)
    pipe.send(
        (
            server.port,
            raw_default.listener.getsockname()[1],
            raw_tuned.listener.getsockname()[1],
        )
    )
    while True:
        try:
            command = pipe.recv()
        except EOFError:  # the benchmark process is gone (killed): stop, without a traceback
            break
        if command is None:
            break
        request_id, block_ids = command
        leases.add(request_id, block_ids, time.time() + 60)
        leases.drain_done()
        pipe.send("ok")
    server.stop()


SOURCE_SEED = 1234


class Bench:
    """A prefill process serving blocks and this process pulling them.

    ``server_netns``/``server_host``: the prefill process serves from that network namespace
    on that address, and this process dials it there (``pdserve bench kv-link``).
    """

    def __init__(
        self,
        geometry: Geometry,
        max_blocks: int,
        buffer_bytes: int,
        server_netns: str | None = None,
        server_host: str = LOOPBACK,
    ) -> None:
        import multiprocessing

        from kv_transfer.block_client import BlockClient, ClientSettings
        from kv_transfer.device import KVCacheAccess

        self.geometry = geometry
        self.server_host = server_host
        self.num_blocks = 2 * max_blocks + 1
        max_bytes = max_blocks * geometry.block_nbytes * geometry.num_layers
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_prefill_process,
            args=(
                geometry, self.num_blocks, max_bytes, buffer_bytes, child_end,
                server_netns, server_host,
            ),
            daemon=True,
        )  # fmt: skip
        self._process.start()
        # Only the child holds its end now, so a child that dies starting up reads as EOF
        # here instead of a wait for the whole timeout.
        child_end.close()
        try:
            if not self._pipe.poll(300):
                raise RuntimeError("benchmark prefill process did not start in 300 s")
            self.port, raw_default_port, raw_tuned_port = self._pipe.recv()
        except EOFError:
            self._process.join(timeout=10)
            raise RuntimeError(
                f"benchmark prefill process exited (code {self._process.exitcode}) before "
                f"serving on {server_host} in namespace {server_netns or '(this one)'}"
            ) from None
        self.dst = _cache(geometry, self.num_blocks, seed=None)
        self.dst_access = KVCacheAccess(self.dst)
        self.client = BlockClient(
            ClientSettings(secret=SECRET, socket_buffer_bytes=buffer_bytes), _fingerprint(geometry)
        )
        self.raw_default = RawClient(raw_default_port, max_bytes, 0, server_host)
        self.raw_tuned = RawClient(raw_tuned_port, max_bytes, buffer_bytes, server_host)
        self._counter = 0

    def connector(self, remote_ids: list[int], local_ids: list[int]) -> float:
        self._counter += 1
        request_id = f"bench-{self._counter}"
        self._pipe.send((request_id, remote_ids))
        self._pipe.recv()
        started = time.perf_counter()
        self.client.pull(
            (self.server_host, self.port), request_id, remote_ids, self.dst_access, local_ids
        )
        return time.perf_counter() - started

    def raw(self, nbytes: int) -> float:
        return min(self.raw_default.transfer(nbytes), self.raw_tuned.transfer(nbytes))

    def verify(self, remote_ids: list[int], local_ids: list[int]) -> bool:
        import torch

        src = _cache(self.geometry, self.num_blocks, seed=SOURCE_SEED)
        # Compare bytes: random bits include NaNs, which never equal themselves.
        return all(
            torch.equal(s[remote_ids].view(torch.uint8), d[local_ids].view(torch.uint8))
            for s, d in zip(src, self.dst, strict=True)
        )

    def close(self) -> None:
        self.client.close()
        self.raw_default.close()
        self.raw_tuned.close()
        self._pipe.send(None)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()


def run(args: argparse.Namespace) -> int:
    status = 0 if args.engine_only else run_sockets(args)
    if args.engine or args.engine_only:
        from benchmarks import kv_pull_wait

        print(flush=True)
        status = max(status, kv_pull_wait.run_embedded(args, ENGINE_PREFIX, args.output.parent))
    return status


def run_sockets(args: argparse.Namespace) -> int:
    sizes = _parse_sizes(args.sizes_mib)
    if args.repeat < 1:
        raise CliError("--repeat must be at least 1")
    geometry = Geometry(
        args.num_layers, args.num_kv_heads, args.block_size, args.head_size, args.dtype
    )
    patterns = ["contiguous", "scattered"] if args.pattern == "both" else [args.pattern]
    buffer_bytes = args.socket_buffer_kib * 1024
    max_blocks = max(geometry.blocks_for(int(s * MIB)) for s in sizes)
    bench = Bench(geometry, max_blocks, buffer_bytes)
    rows: list[Row] = []
    try:
        for pattern in patterns:
            for size in sizes:
                count = geometry.blocks_for(int(size * MIB))
                remote = _block_ids(pattern, count, bench.num_blocks, seed=1)
                local = _block_ids(pattern, count, bench.num_blocks, seed=2)
                nbytes = count * geometry.block_nbytes * geometry.num_layers
                bench.connector(remote, local)  # warm-up: handshake, page faults, buffers
                bench.raw(nbytes)
                ours, raw = [], []
                for _ in range(args.repeat):  # interleaved so load drift hits both alike
                    ours.append(bench.connector(remote, local))
                    raw.append(bench.raw(nbytes))
                if not bench.verify(remote, local):
                    raise RuntimeError(f"transferred blocks differ at {size} MiB ({pattern})")
                rows.append(_row(pattern, nbytes, count, ours, raw))
                _print_row(rows[-1], header=len(rows) == 1)
    finally:
        bench.close()

    result: dict[str, Any] = {
        "benchmark": "kv_transfer",
        "created_unix": time.time(),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "geometry": asdict(geometry) | {"block_nbytes_per_layer": geometry.block_nbytes},
        "repeat": args.repeat,
        "socket_buffer_kib": args.socket_buffer_kib,
        "raw_baseline": "per run, the faster of a default-buffer and a tuned-buffer "
        "sendall->recv_into over loopback; sender in a separate process, like ours",
        "target": "connector >= 0.8 x raw from 16 MiB up",
        "target_met_median": {
            pattern: all(r.ratio >= 0.8 for r in rows if r.pattern == pattern and r.size_mib >= 16)
            for pattern in patterns
        },
        "target_met_best": {
            pattern: all(
                r.best_ratio >= 0.8 for r in rows if r.pattern == pattern and r.size_mib >= 16
            )
            for pattern in patterns
        },
        "rows": [asdict(r) for r in rows],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nwrote {args.output}; >= 80% of raw from 16 MiB: "
        f"median {result['target_met_median']}, best {result['target_met_best']}"
    )
    return 0


def _print_row(row: Row, header: bool) -> None:
    if header:
        print(
            f"{'pattern':<11} {'MiB':>7} {'blk/layer':>9} | {'median GB/s':>11} "
            f"{'':>6} {'ratio':>6} | {'best GB/s':>9} {'':>6} {'ratio':>6} | {'ours ms':>8}"
        )
        print(
            f"{'':<11} {'':>7} {'':>9} | {'raw':>5} {'ours':>5} {'':>6} {'':>6} | "
            f"{'raw':>5} {'ours':>5} {'':>5} {'':>6} |"
        )
    print(
        f"{row.pattern:<11} {row.size_mib:>7.1f} {row.blocks_per_layer:>9d} | "
        f"{row.raw_gbps:>5.2f} {row.connector_gbps:>5.2f} {'':>6} {row.ratio:>6.2f} | "
        f"{row.raw_best_gbps:>5.2f} {row.connector_best_gbps:>5.2f} {'':>5} "
        f"{row.best_ratio:>6.2f} | "
        f"{row.connector_ms:>8.2f}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
