"""PortPicker: ports for engines that bind them late."""

from __future__ import annotations

import socket
from pathlib import Path

from deploy.worker_launch import PortPicker


def test_picks_are_unique_free_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picker = PortPicker()
    ports = [picker.pick() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(1024 <= port < low for port in ports)


def test_a_busy_port_is_skipped() -> None:
    picker = PortPicker()
    first = picker.pick()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", first + 1))
        busy.listen()
        picker._next = first + 1 - picker._first  # the next candidate is the busy one
        assert picker.pick() not in (first, first + 1)
