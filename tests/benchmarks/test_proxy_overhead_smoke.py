"""Smoke test of ``python -m benchmarks.proxy_overhead`` with its smallest settings.

It starts two fake workers and the real proxy as processes, so on the shared 2-core box it
takes 20-30 s: marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_proxy_overhead_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "proxy_overhead.json"
    argv = [
        sys.executable, "-m", "benchmarks.proxy_overhead",
        "--client", "aiohttp",
        "--targets", "proxy",
        "--concurrency", "1",
        "--modes", "nonstream,stream",
        "--duration", "0.3",
        "--duration-c1", "0.3",
        "--max-tokens", "4",
        "--out", str(out),
    ]  # fmt: skip
    completed = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=200, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    stdout = completed.stdout

    # The table: a header, then one row per target and mode.
    assert "client: aiohttp" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("target"))
    for column in ("req/s", "p50 ms", "p99 ms", "ttft50", "proxy µs/req", "errors"):
        assert column in header
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("direct ", "proxy "))]
    assert {(row[0], row[1]) for row in rows} >= {
        ("direct", "nonstream"),
        ("direct", "stream"),
        ("proxy", "nonstream"),
        ("proxy", "stream"),
    }
    assert f"wrote {out}" in stdout

    report = json.loads(out.read_text())
    assert report["benchmark"] == "proxy_overhead"
    assert set(report) >= {"timestamp", "machine", "config", "runs", "added", "profiles"}
    assert report["config"]["client"] == "aiohttp"
    assert report["config"]["targets"] == ["direct", "proxy"]
    assert len(report["machine"]["load_average_before"]) == 3

    runs = report["runs"]
    assert {(r["target"], r["mode"]) for r in runs} == {
        ("direct", "nonstream"),
        ("direct", "stream"),
        ("proxy", "nonstream"),
        ("proxy", "stream"),
    }
    for run in runs:
        assert run["concurrency"] == 1
        assert run["requests"] > 0 and run["errors"] == 0, run
        assert run["requests_per_s"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"]
        if run["mode"] == "stream":
            assert 0 < run["ttft_p50_ms"] <= run["p50_ms"]
        else:
            assert run["ttft_p50_ms"] is None
        if run["target"] == "proxy":
            assert run["proxy_cpu_us_per_request"] > 0

    added = {(row["target"], row["mode"]): row for row in report["added"]}
    assert set(added) == {("proxy", "nonstream"), ("proxy", "stream")}
    for row in added.values():
        assert set(row) >= {
            "concurrency",
            "added_p50_ms",
            "added_p99_ms",
            "proxy_cpu_us_per_request",
            "proxy_requests_per_s",
            "direct_requests_per_s",
        }
        assert isinstance(row["added_p50_ms"], float)
