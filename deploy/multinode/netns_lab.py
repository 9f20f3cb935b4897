"""Two "machines" on one host: network namespaces joined by a veth pair.

Multi-node failures (a node advertising 127.0.0.1, a port bound to loopback, KV traffic on
the wrong address) never show on one host, where every address reaches every process. A
network namespace has its own interfaces, addresses, routes and port space, so two of them
joined by a veth pair behave like two machines on a private link: a process in one can reach
the other only through the other's address on that link. Filesystem, users and CPUs stay
shared, which is what a lab on one machine can give.

Used by the multi-node test (tests/deploy/test_multinode.py) and ``pdserve bench kv-link``.
Needs root (CAP_NET_ADMIN); :func:`unsupported_reason` says why not where it cannot run.
The addresses are private and live only inside namespaces this module creates: nothing
outside the host is ever a target.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True, slots=True)
class LabNode:
    """One namespace: its name, its veth interface and its address on the link."""

    netns: str
    interface: str
    address: str


def unsupported_reason() -> str | None:
    """None where namespaces can be made here, else one line saying why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    probe = f"pdsprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def enter_netns(name: str) -> None:
    """Move the calling thread (call it before starting threads) into namespace ``name``.

    Sockets opened afterwards live in that namespace; threads started afterwards inherit it.
    For a child process that must run there without ``ip netns exec``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(_NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into network namespace {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class TwoNodeLab:
    """Two namespaces ``<prefix>a``/``<prefix>b`` on ``<subnet>.1``/``<subnet>.2``.

    A context manager: ``stop`` kills every process left in either namespace and deletes
    them (which deletes the veth pair), on success, on failure and on KeyboardInterrupt.
    ``prefix`` must be short (interface names have at most 15 characters).
    """

    def __init__(self, prefix: str | None = None, subnet: str = "10.203.0") -> None:
        self.prefix = prefix or f"pd{uuid.uuid4().hex[:5]}"
        self.subnet = subnet
        self.head = LabNode(f"{self.prefix}a", f"{self.prefix}a0", f"{subnet}.1")
        self.worker = LabNode(f"{self.prefix}b", f"{self.prefix}b0", f"{subnet}.2")
        self._started = False

    @property
    def nodes(self) -> tuple[LabNode, LabNode]:
        return (self.head, self.worker)

    def start(self) -> TwoNodeLab:
        reason = unsupported_reason()
        if reason is not None:
            raise RuntimeError(f"cannot build the two-node lab: {reason}")
        self._started = True
        try:
            for node in self.nodes:
                _ip("netns", "add", node.netns)
            _ip("link", "add", self.head.interface, "type", "veth", "peer", "name",
                self.worker.interface)  # fmt: skip
            for node in self.nodes:
                _ip("link", "set", node.interface, "netns", node.netns)
                _ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", node.interface)
                _ip("-n", node.netns, "link", "set", "lo", "up")
                _ip("-n", node.netns, "link", "set", node.interface, "up")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill what runs in the namespaces, then delete them; safe to call twice."""
        if not self._started:
            return
        for node in self.nodes:
            self.kill_all(node)
        for node in self.nodes:
            subprocess.run(["ip", "netns", "delete", node.netns], capture_output=True)
        self._started = False

    def __enter__(self) -> TwoNodeLab:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- processes --------------------------------------------------------------------

    def command(self, node: LabNode, argv: Sequence[str]) -> list[str]:
        """``argv`` as run inside ``node``'s namespace."""
        return ["ip", "netns", "exec", node.netns, *argv]

    def pids(self, node: LabNode) -> list[int]:
        """Every process whose network namespace is ``node``'s."""
        listed = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True)
        return [int(line) for line in listed.stdout.split() if line.strip().isdigit()]

    def kill_all(self, node: LabNode, timeout_s: float = 10.0) -> None:
        """SIGKILL every process of ``node``'s namespace and wait until they are gone."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids(node)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                logger.warning("processes left in %s after SIGKILL: %s", node.netns, pids)
                return
            time.sleep(0.1)

    # -- link counters ----------------------------------------------------------------

    def link_bytes(self, node: LabNode) -> dict[str, int]:
        """Bytes ``node``'s veth received (``rx``) and sent (``tx``) so far."""
        shown = subprocess.run(
            ["ip", "-n", node.netns, "-s", "-j", "link", "show", node.interface],
            capture_output=True,
            text=True,
            check=True,
        )
        stats: Any = json.loads(shown.stdout)[0]["stats64"]
        return {"rx": int(stats["rx"]["bytes"]), "tx": int(stats["tx"]["bytes"])}


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
