"""The connector's worker half asks Linux for AMX tile permission before the first forward pass.

Without it, a bf16 decode instance on an AMX CPU whose first forward pass is a decode step (the
prompt's KV came from the prefill) died of SIGILL inside vLLM's CPU attention. The end-to-end
check is the multi-node test's long prompt (bf16, block size 128) on such a CPU; here the
permission itself is read back from the kernel in a fresh process.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import sys

import pytest
import torch

from kv_transfer import connector

_READ_PERMISSION = """
import ctypes, sys
from kv_transfer.connector import _request_amx_permission

SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1022, 18
libc = ctypes.CDLL(None, use_errno=True)

def tile_data_permitted():
    mask = ctypes.c_uint64()
    assert libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) == 0
    return bool(mask.value >> XFEATURE_XTILEDATA & 1)

before = tile_data_permitted()
_request_amx_permission()
print(before, tile_data_permitted())
"""


@pytest.mark.skipif(
    platform.system() != "Linux"
    or platform.machine() != "x86_64"
    or not torch.cpu._is_amx_tile_supported(),
    reason="needs an x86-64 Linux CPU with AMX tiles",
)
def test_a_fresh_worker_process_gets_tile_permission() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _READ_PERMISSION], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_a_refusal_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kv_transfer.connector"):
        connector._request_amx_permission()
    assert "refused" in caplog.text


def test_nothing_is_asked_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    def fail() -> bool:
        raise AssertionError("asked for AMX on a CPU without it")

    monkeypatch.setattr(torch.cpu, "_init_amx", fail)
    connector._request_amx_permission()
