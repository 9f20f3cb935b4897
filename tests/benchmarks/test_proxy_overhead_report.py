"""The proxy benchmark's report of mid-stream migration's CPU cost (targets ``proxy`` and
``proxy-nomig`` measured in the same run), without running the benchmark."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.proxy_overhead import RunResult, _targets, format_table, mid_stream_cpu


def run(target: str, mode: str, cpu: float | None, round_index: int = 0) -> RunResult:
    return RunResult(
        target=target,
        mode=mode,
        concurrency=64,
        client="wrk",
        requests=100,
        errors=0,
        requests_per_s=1000.0,
        p50_ms=1.0,
        p90_ms=2.0,
        p99_ms=3.0,
        proxy_cpu_us_per_request=cpu,
        round=round_index,
    )


def test_on_and_off_are_compared_by_their_medians() -> None:
    results = [
        run("direct", "stream", None),
        *(run("proxy", "stream", cpu, i) for i, cpu in enumerate((700.0, 660.0, 900.0))),
        *(run("proxy-nomig", "stream", cpu, i) for i, cpu in enumerate((600.0, 640.0, 500.0))),
        run("proxy", "nonstream", 500.0),  # no "off" run to compare with
    ]
    [row] = mid_stream_cpu(results)
    assert (row["mode"], row["concurrency"]) == ("stream", 64)
    assert (row["on_us_per_request"], row["off_us_per_request"]) == (700.0, 600.0)
    assert row["increase_pct"] == pytest.approx(100 / 6)
    report = {
        "config": {"client": "wrk"},
        "runs": [],
        "added": [],
        "mid_stream_cpu": [row],
    }
    table = format_table(report)
    assert "mid-stream migration" in table
    [line] = [line for line in table.splitlines() if line.startswith("proxy on vs off")]
    assert line.split()[-6:] == ["stream", "64", "700", "600", "+16.7", "%"]


def test_the_no_migration_proxy_is_a_target() -> None:
    assert _targets("proxy,proxy-nomig") == ["proxy", "proxy-nomig"]
    with pytest.raises(argparse.ArgumentTypeError):
        _targets("proxy-nomig")  # pdserve's own proxy is always measured
