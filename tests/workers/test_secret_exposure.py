"""A real `pdserve worker` pair: the KV secret is in the engines' environment, and neither in
any process's argv nor in vLLM's log (its "non-default args" line prints the kv-transfer
config). Needs the session's real engines (tests/conftest.py), so it is slow."""

from __future__ import annotations

import psutil
import pytest
from engine_support import KV_SECRET, RunningServer

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)
def test_engines_hold_the_secret_only_in_their_environment(
    real_prefill: RunningServer, real_decode: RunningServer
) -> None:
    for server in (real_prefill, real_decode):
        command = psutil.Process(server.proc.pid)  # the `pdserve worker` command
        engines = command.children(recursive=True)
        assert engines, f"{server.name}: no vLLM processes under the worker command"
        for process in [command, *engines]:
            cmdline = " ".join(process.cmdline())
            assert KV_SECRET not in cmdline, (server.name, process.pid, cmdline[:200])
        # The vLLM server (and its engine core, which runs the connector) got it from the
        # worker command through the environment.
        assert any(p.environ().get("PDSERVE_KV_SECRET") == KV_SECRET for p in engines)
        log = server.log_path.read_text(errors="replace")
        assert "kv_transfer_config" in log or "kv-transfer-config" in log, server.name
        assert KV_SECRET not in log, server.name
        assert "without a shared secret" not in log, server.name
