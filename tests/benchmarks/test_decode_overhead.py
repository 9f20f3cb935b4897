"""`pdserve plan overhead`: the table's arithmetic, option checks, a quick run on real engines."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.planner import decode_overhead
from deploy.cli import CliError

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    decode_overhead.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_summary_is_relative_to_the_engine_alone_and_keeps_mode_order() -> None:
    samples = {
        "proxy_pd": [12.0, 10.0, 11.0],
        "alone": [8.0, 10.0, 12.0],
        "handoff": [9.0, 11.0],
        "engine": [],
    }
    results = decode_overhead.summarise(samples)
    assert [r.mode for r in results] == ["alone", "handoff", "proxy_pd"]  # no empty mode
    alone, handoff, proxy_pd = results
    assert alone.median_ms == 10.0 and alone.vs_alone == 1.0
    assert handoff.median_ms == 10.0 and handoff.mean_ms == 10.0
    assert proxy_pd.vs_alone == pytest.approx(1.1)
    table = decode_overhead.format_table(results).splitlines()
    assert table[0].split()[0] == "mode" and table[3].split()[:2] == ["proxy_pd", "3"]


@pytest.mark.parametrize("argv", [("--streams", "1"), ("--output-tokens", "4")])
def test_bad_options_are_one_line_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(CliError):
        decode_overhead._check(_args(*argv))


@pytest.mark.parametrize("cores", ["0", "1,1", "a,b"])
def test_bad_cores_are_usage_errors(cores: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args("--cores", cores)
    assert "--cores" in capsys.readouterr().err


def test_quick_sets_a_small_run() -> None:
    args = _args("--quick")
    assert decode_overhead._check(args) == ("0", "1")
    assert (args.preset, args.streams, args.output_tokens) == ("tiny", 3, 32)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_on_real_engines(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    argv = [sys.executable, "-m", "deploy.cli", "plan", "overhead", "--quick", "--output", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    by_mode = {r["mode"]: r for r in report["results"]}
    assert set(by_mode) == set(decode_overhead.MODES)
    assert len(by_mode["engine"]["tpot_ms"]) == 6  # measured in both proxy phases
    assert all(len(by_mode[m]["tpot_ms"]) == 3 for m in ("alone", "handoff", "proxy_pd"))
    assert all(0 < r["median_ms"] < 1000 for r in report["results"])
    assert by_mode["alone"]["vs_alone"] == 1.0
