"""``pdserve bench kv-link``: KV pull throughput across a veth link vs on loopback.

Two network namespaces joined by a veth pair (deploy/multinode/netns_lab.py) stand in for two
machines. For each request size the connector's real block client, in namespace B, pulls one
request's blocks (a) from a block server on B's own loopback and (b) from one in namespace A
across the link, runs of the two modes interleaved so load drift hits both alike. Both are
checked byte for byte, and B's veth receive counter must have grown by at least the KV bytes
pulled over the link: proof they crossed it rather than some shortcut.

Needs root (network namespaces); exits 2 with the reason where they cannot be made. Prints a
table, writes JSON (default benchmarks/results/kv_link.json) and a PNG (default
benchmarks/figures/kv_link.png). The namespaces and everything in them are removed at the end,
on failure and on Ctrl-C alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from benchmarks.kv_transfer import LOOPBACK, MIB, Bench, Geometry, _parse_sizes
from deploy.cli import CliError
from deploy.multinode.netns_lab import TwoNodeLab, enter_netns

DEFAULT_SIZES_MIB = (1.0, 4.0, 16.0, 64.0)
QUICK_SIZES_MIB = (1.0, 4.0)
DEFAULT_REPEAT = 7
QUICK_REPEAT = 3
DEFAULT_OUTPUT = Path("benchmarks/results/kv_link.json")
DEFAULT_PNG = Path("benchmarks/figures/kv_link.png")
# The geometry of `pdserve bench kv`'s defaults: 1 MiB of KV per block over all layers.
GEOMETRY = Geometry(num_layers=8, num_kv_heads=8, block_size=32, head_size=128, dtype="bfloat16")
MODES = ("loopback", "link")
# Interface names have at most 15 characters and the lab appends "a0"/"b0".
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,11}")
# Per message from the measuring process; its first one waits for three torch imports.
_MESSAGE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Plan:
    """What the measuring process needs; it rebuilds the lab's names from prefix and subnet."""

    geometry: Geometry
    sizes_mib: tuple[float, ...]
    repeat: int
    buffer_bytes: int
    lab_prefix: str
    lab_subnet: str


@dataclass(frozen=True)
class SizeRun:
    """One size as measured in namespace B: seconds per timed pull, by mode."""

    size_mib: float
    nbytes: int
    blocks_per_layer: int
    seconds: dict[str, list[float]]
    verified: dict[str, bool]
    veth_rx_bytes: int  # B's veth receive counter over the timed runs
    link_pulled_bytes: int  # KV bytes the timed link pulls delivered


@dataclass(frozen=True)
class ModeStats:
    gbps: float  # median run
    best_gbps: float  # fastest run: least disturbed by other load on the machine
    ms: float  # median run
    verified: bool
    seconds: list[float]


@dataclass(frozen=True)
class Row:
    size_mib: float
    blocks_per_layer: int
    nbytes: int
    loopback: ModeStats
    link: ModeStats
    ratio: float  # link / loopback, medians
    veth_rx_bytes: int
    link_pulled_bytes: int

    @property
    def veth_ok(self) -> bool:
        return self.veth_rx_bytes >= self.link_pulled_bytes

    @property
    def verified(self) -> bool:
        return self.loopback.verified and self.link.verified


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes-mib",
        default=None,
        help="comma-separated request sizes in MiB (default 1,4,16,64; --quick 1,4)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"timed runs per size and mode (default {DEFAULT_REPEAT}; --quick {QUICK_REPEAT})",
    )
    parser.add_argument("--quick", action="store_true", help="two sizes, fewer runs")
    parser.add_argument(
        "--socket-buffer-kib",
        type=int,
        default=4096,
        help="SO_SNDBUF/SO_RCVBUF of the connector's sockets (0 = kernel default)",
    )
    parser.add_argument(
        "--netns-prefix",
        default=None,
        help="names of the namespaces: PREFIXa, PREFIXb (default random); at most 12 "
        "lowercase letters and digits",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result path")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help="figure path")


def resolve(args: argparse.Namespace) -> tuple[tuple[float, ...], int]:
    """The sizes and repeat count the options ask for, --quick filling in what is not given."""
    if args.sizes_mib is not None:
        sizes = tuple(_parse_sizes(args.sizes_mib))
    else:
        sizes = QUICK_SIZES_MIB if args.quick else DEFAULT_SIZES_MIB
    repeat: int = args.repeat
    if repeat is None:
        repeat = QUICK_REPEAT if args.quick else DEFAULT_REPEAT
    if repeat < 1:
        raise CliError("--repeat must be at least 1")
    if args.socket_buffer_kib < 0:
        raise CliError("--socket-buffer-kib must not be negative")
    if args.netns_prefix is not None and not _PREFIX.fullmatch(args.netns_prefix):
        raise CliError(
            f"--netns-prefix {args.netns_prefix!r}: 1 to 12 lowercase letters and digits, "
            "starting with a letter"
        )
    return sizes, repeat


# -- the measuring process (namespace B) ------------------------------------------------------


def _measure_process(plan: Plan, pipe: Connection) -> None:
    """Entry of the spawn child that measures from namespace B; results go up ``pipe``."""
    # Never started, so it never stops anything: only the lab's names and counters.
    twin = TwoNodeLab(plan.lab_prefix, plan.lab_subnet)
    # First, before any thread or socket: setns moves only the calling thread, and the
    # prefill processes spawned from here start in B too.
    enter_netns(twin.worker.netns)
    # Ctrl-C is the parent's to handle: it stops the lab, which kills this process and its
    # children. Ignored here (and so in the spawned children) it prints no tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for run in _measure(plan, twin):
            pipe.send(("size", run))
        pipe.send(("done", None))
    except Exception:
        pipe.send(("error", traceback.format_exc().strip()))
    finally:
        pipe.close()


def _measure(plan: Plan, twin: TwoNodeLab) -> Iterator[SizeRun]:
    geometry = plan.geometry
    max_blocks = max(geometry.blocks_for(int(size * MIB)) for size in plan.sizes_mib)
    with contextlib.ExitStack() as stack:
        # Loopback is B's own lo, not the host's: the client is the same process in the same
        # namespace for both modes, so only the path differs (lo vs veth), and the host's
        # firewall rules and traffic on its lo stay out of the comparison.
        benches: dict[str, Bench] = {}
        for mode, netns, host in (
            ("loopback", twin.worker.netns, LOOPBACK),
            ("link", twin.head.netns, twin.head.address),
        ):
            benches[mode] = Bench(geometry, max_blocks, plan.buffer_bytes, netns, host)
            stack.callback(benches[mode].close)
        for size in plan.sizes_mib:
            yield _measure_size(plan, twin, benches, size)


def _measure_size(
    plan: Plan, twin: TwoNodeLab, benches: dict[str, Bench], size_mib: float
) -> SizeRun:
    geometry = plan.geometry
    count = geometry.blocks_for(int(size_mib * MIB))
    ids = list(range(count))  # contiguous: a fresh prefill into an empty decode cache
    nbytes = count * geometry.block_nbytes * geometry.num_layers
    for bench in benches.values():
        bench.connector(ids, ids)  # warm-up: handshake, page faults, socket buffers
        # Cleared so the check after the timed runs sees only bytes those runs delivered.
        for layer in bench.dst:
            layer.zero_()
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    rx_before = twin.link_bytes(twin.worker)["rx"]
    for i in range(plan.repeat):
        # Alternating which mode goes first keeps either from always running second.
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            seconds[mode].append(benches[mode].connector(ids, ids))
    rx_after = twin.link_bytes(twin.worker)["rx"]
    return SizeRun(
        size_mib=size_mib,
        nbytes=nbytes,
        blocks_per_layer=count,
        seconds=seconds,
        verified={mode: bench.verify(ids, ids) for mode, bench in benches.items()},
        veth_rx_bytes=rx_after - rx_before,
        link_pulled_bytes=plan.repeat * nbytes,
    )


# -- the parent (host namespace) --------------------------------------------------------------


def _measurements(plan: Plan) -> Iterator[SizeRun]:
    """Runs the measuring process in namespace B and yields its results as they come."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    # Not a daemon: daemonic processes may not start the prefill processes it needs.
    process = context.Process(target=_measure_process, args=(plan, writer), name="kv-link")
    process.start()
    # Only the child holds the writing end now: its death reads as EOF, not a hang.
    writer.close()
    try:
        while True:
            kind, payload = _receive(reader, process)
            if kind == "done":
                return
            if kind == "error":
                raise RuntimeError(f"kv-link measuring process (namespace B) failed: {payload}")
            yield payload
    except BaseException:
        # It ignores SIGINT: on Ctrl-C or a failure here it is killed, not waited for; what
        # it started dies with the lab's namespaces.
        process.kill()
        raise
    finally:
        reader.close()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()


def _receive(reader: Connection, process: BaseProcess) -> tuple[str, Any]:
    deadline = time.monotonic() + _MESSAGE_TIMEOUT_S
    while not reader.poll(0.5):
        if time.monotonic() > deadline:
            raise RuntimeError(f"kv-link measuring process silent for {_MESSAGE_TIMEOUT_S:.0f} s")
    try:
        message: tuple[str, Any] = reader.recv()
    except EOFError:
        process.join(timeout=10)
        raise RuntimeError(
            f"kv-link measuring process exited (code {process.exitcode}) without a result"
        ) from None
    return message


def _mode_stats(nbytes: int, seconds: list[float], verified: bool) -> ModeStats:
    median = statistics.median(seconds)
    return ModeStats(
        gbps=round(nbytes / median / 1e9, 3),
        best_gbps=round(nbytes / min(seconds) / 1e9, 3),
        ms=round(median * 1e3, 3),
        verified=verified,
        seconds=[round(s, 6) for s in seconds],
    )


def shape_row(run: SizeRun) -> Row:
    loopback = _mode_stats(run.nbytes, run.seconds["loopback"], run.verified["loopback"])
    link = _mode_stats(run.nbytes, run.seconds["link"], run.verified["link"])
    ratio = statistics.median(run.seconds["loopback"]) / statistics.median(run.seconds["link"])
    return Row(
        size_mib=round(run.nbytes / MIB, 3),
        blocks_per_layer=run.blocks_per_layer,
        nbytes=run.nbytes,
        loopback=loopback,
        link=link,
        ratio=round(ratio, 3),
        veth_rx_bytes=run.veth_rx_bytes,
        link_pulled_bytes=run.link_pulled_bytes,
    )


def checks(rows: Sequence[Row]) -> dict[str, bool]:
    return {
        "bytes_verified": bool(rows) and all(row.verified for row in rows),
        "veth_carried_link_bytes": bool(rows) and all(row.veth_ok for row in rows),
    }


def report(rows: Sequence[Row], plan: Plan, lab: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": "kv_link",
        "created_unix": time.time(),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "geometry": asdict(plan.geometry) | {"block_nbytes_per_layer": plan.geometry.block_nbytes},
        "repeat": plan.repeat,
        "socket_buffer_kib": plan.buffer_bytes // 1024,
        "lab": lab,
        "modes": {
            "loopback": "block server and client both in namespace B, on its 127.0.0.1",
            "link": "block server in namespace A on its veth address, client in namespace B",
        },
        "block_ids": "contiguous; modes interleaved run by run, alternating which goes first",
        "checks": checks(rows),
        "rows": [asdict(row) | {"veth_ok": row.veth_ok} for row in rows],
    }


_HEADER = (
    f"{'MiB':>7} {'blk/layer':>9} | {'loopback GB/s':>13} {'link GB/s':>9} {'link/loop':>9} | "
    f"{'veth rx MiB':>11} {'pulled MiB':>10} | verified"
)


def format_row(row: Row) -> str:
    return (
        f"{row.size_mib:>7.1f} {row.blocks_per_layer:>9d} | {row.loopback.gbps:>13.2f} "
        f"{row.link.gbps:>9.2f} {row.ratio:>9.2f} | {row.veth_rx_bytes / MIB:>11.1f} "
        f"{row.link_pulled_bytes / MIB:>10.1f} | {'yes' if row.verified else 'NO'}"
    )


def format_table(rows: Sequence[Row]) -> str:
    return "\n".join([_HEADER, *(format_row(row) for row in rows)])


def plot(rows: Sequence[Row], png: Path, lab: dict[str, Any]) -> bool:
    """Median GB/s against size for both modes, the run spread shaded; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axis = plt.subplots(figsize=(7, 4.5))
    sizes = [row.size_mib for row in rows]
    for mode, label in (
        ("loopback", f"loopback in namespace B (lo, MTU {lab.get('lo_mtu')})"),
        ("link", f"veth link A -> B (MTU {lab.get('veth_mtu')})"),
    ):
        stats = [getattr(row, mode) for row in rows]
        (line,) = axis.plot(sizes, [s.gbps for s in stats], marker="o", label=f"{label}, median")
        slowest = [row.nbytes / max(s.seconds) / 1e9 for row, s in zip(rows, stats, strict=True)]
        axis.fill_between(sizes, slowest, [s.best_gbps for s in stats],
                          color=line.get_color(), alpha=0.15)  # fmt: skip
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [f"{size:g}" for size in sizes])
    axis.minorticks_off()
    axis.set(xlabel="request KV size (MiB)", ylabel="pull throughput (GB/s)",
             title="KV pull: veth link vs loopback (shaded: slowest to fastest run)",
             ylim=(0, None))  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _mtu(netns: str, interface: str) -> int | None:
    shown = subprocess.run(
        ["ip", "-n", netns, "-j", "link", "show", "dev", interface],
        capture_output=True,
        text=True,
    )
    try:
        return int(json.loads(shown.stdout)[0]["mtu"])
    except (ValueError, LookupError, TypeError):
        return None  # context for the figures only, not worth failing the run for


def _lab_facts(lab: TwoNodeLab) -> dict[str, Any]:
    return {
        "head": asdict(lab.head),
        "worker": asdict(lab.worker),
        "veth_mtu": _mtu(lab.worker.netns, lab.worker.interface),
        "lo_mtu": _mtu(lab.worker.netns, "lo"),
    }


def run(args: argparse.Namespace) -> int:
    sizes, repeat = resolve(args)
    with contextlib.ExitStack() as stack:
        try:
            lab = stack.enter_context(TwoNodeLab(args.netns_prefix))
        except RuntimeError as exc:  # no root, no iproute2, `ip netns add` refused
            raise CliError(str(exc)) from None
        plan = Plan(GEOMETRY, sizes, repeat, args.socket_buffer_kib * 1024, lab.prefix, lab.subnet)
        if TwoNodeLab(lab.prefix, lab.subnet).nodes != lab.nodes:
            raise RuntimeError("the measuring process would rebuild other namespace names")
        facts = _lab_facts(lab)
        print(
            f"lab: {lab.head.netns} {lab.head.address} <-veth-> {lab.worker.netns} "
            f"{lab.worker.address}; {len(sizes)} sizes x {repeat} runs per mode",
            flush=True,
        )
        print(_HEADER, flush=True)
        rows: list[Row] = []
        for measured in _measurements(plan):
            rows.append(shape_row(measured))
            print(format_row(rows[-1]), flush=True)
    result = report(rows, plan, facts)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    drawn = plot(rows, args.png, facts)
    print(f"\nwrote {args.output}" + (f" and {args.png}" if drawn else " (no matplotlib: no PNG)"))
    failed = [name for name, ok in result["checks"].items() if not ok]
    if failed:
        print(f"kv-link: checks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: the measuring process's results are
    # pickled as benchmarks.kv_link classes, which must be the ones this process compares.
    from benchmarks.kv_link import main as _main

    sys.exit(_main())
