"""Helpers for tests that run `pdserve up` and its sibling commands as a user would."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import psutil

from deploy.worker_launch import port_is_free

# The installed console script (`python -m deploy.cli` would define a second CliError class).
PDSERVE = str(Path(sys.executable).with_name("pdserve"))


def ports_free(ports: list[int]) -> bool:
    return all(port_is_free("127.0.0.1", port) for port in ports)


def pick_ports(low: int = 18000, high: int = 19700) -> dict[str, int]:
    """A free block of ten ports: proxy, admin, two prefill API, two KV, two decode API."""
    for _ in range(100):
        base = random.randrange(low, high, 10)
        if ports_free(list(range(base, base + 8))):
            return {
                "proxy": base,
                "admin": base + 1,
                "prefill": base + 2,
                "kv": base + 4,
                "decode": base + 6,
            }
    raise RuntimeError(f"no free port block in {low}-{high}")


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:120]}"
    except psutil.NoSuchProcess:
        return f"{process.pid} (gone)"


def session_processes(session_id: int) -> list[psutil.Process]:
    """Live processes of the session ``session_id`` leads (a serving `pdserve up`)."""
    found = []
    for process in psutil.process_iter():
        try:
            mine = process.pid != os.getpid() and os.getsid(process.pid) == session_id
            if mine and alive(process):
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return found
