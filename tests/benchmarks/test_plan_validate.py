"""``pdserve plan validate`` and ``pdserve plan profile``'s pieces: replaying a measured run.

Fast: a synthetic bench report replayed on a synthetic profile (the simulator must predict
its own runs exactly), the table, the refusals. Slow: ``pdserve plan profile --quick`` on a
real vLLM engine writes a profile the simulator can load and fit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_planner import _profile

from benchmarks.planner import validate
from benchmarks.planner.profile import kv_bytes_per_token
from benchmarks.planner.profile_model import Profile, load_step_model
from benchmarks.planner.simulate import Deployment, InstanceModel, simulate
from benchmarks.workload import WorkloadRequest, WorkloadSpec, generate
from deploy.cli import CliError

REPO = Path(__file__).resolve().parents[2]


def _measured_run(profile: Profile, setup: str, rate: float, scale: float = 1.0) -> dict[str, Any]:
    """A bench pd run whose measured figures are the simulator's own, times ``scale``."""
    from benchmarks.planner.simulate import poisson_arrivals

    requests = generate(WorkloadSpec(num_requests=60, seed=5, shared_prefix_fraction=0.5))
    arrivals = poisson_arrivals(len(requests), rate, seed=1)
    prefill, decode = validate.DEPLOYMENTS[setup]
    deployment = Deployment.pd(prefill, decode) if prefill else Deployment.aggregated(decode)
    cached = [
        WorkloadRequest(r.prompt_tokens - (r.shared_prefix_tokens // 16) * 16, r.output_tokens)
        for r in requests
    ]
    result = simulate(InstanceModel.from_profile(profile), deployment, cached, arrivals)
    return {
        "setup": setup,
        "rate": rate,
        "ttft_ms": {q: getattr(result.ttft, q) * 1000 * scale for q in ("p50", "p90", "p99")},
        "tpot_ms": {q: getattr(result.tpot, q) * 1000 * scale for q in ("p50", "p90", "p99")},
        "arrivals_s": arrivals,
        "requests": [[r.prompt_tokens, r.output_tokens, r.shared_prefix_tokens] for r in requests],
    }


def test_replay_predicts_its_own_runs_exactly_and_flags_misses(tmp_path: Path) -> None:
    profile = _profile()
    path = tmp_path / "profile.json"
    profile.save(path)
    bench = {
        "runs": [
            _measured_run(profile, "pd", 20.0),
            _measured_run(profile, "aggregated", 20.0),
            _measured_run(profile, "pd", 40.0, scale=1.5),  # the "measurement" is 50 % slower
            _measured_run(profile, "aggregated", 40.0),
            {**_measured_run(profile, "pd", 80.0), "setup": "aggregated-wide"},  # not replayed
        ]
    }
    assert validate.default_rates(bench["runs"]) == [20.0, 40.0]
    rows = validate.validate(path, bench, [20.0, 40.0])
    assert [(r["setup"], r["rate"]) for r in rows] == [
        ("pd", 20.0), ("aggregated", 20.0), ("pd", 40.0), ("aggregated", 40.0),
    ]  # fmt: skip
    for row in (rows[0], rows[1], rows[3]):
        for cell in row["metrics"].values():
            assert cell["error"] == pytest.approx(0.0, abs=1e-9)
    for cell in rows[2]["metrics"].values():
        assert cell["error"] == pytest.approx(1 / 1.5 - 1)
    table = validate.format_table(rows, 0.15)
    assert "12 of 16 within 15%" in table
    assert table.count("*") == 4 + 1  # four cells marked, one in the footer


def test_cli_refusals(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    validate.add_arguments(parser)
    profile = tmp_path / "profile.json"
    _profile().save(profile)
    missing = parser.parse_args(["--profile", str(profile), "--bench", str(tmp_path / "no.json")])
    with pytest.raises(CliError, match="cannot read a bench pd report"):
        validate.run(missing)
    report = tmp_path / "bench.json"
    report.write_text(json.dumps({"runs": [_measured_run(_profile(), "pd", 20.0)]}))
    with pytest.raises(CliError, match="no rate was measured for both"):
        validate.run(parser.parse_args(["--profile", str(profile), "--bench", str(report)]))
    run = {**_measured_run(_profile(), "pd", 20.0), "arrivals_s": []}
    report.write_text(json.dumps({"runs": [run, {**run, "setup": "aggregated"}]}))
    with pytest.raises(CliError, match="no per-request record"):
        validate.run(parser.parse_args(["--profile", str(profile), "--bench", str(report)]))
    bad_profile = tmp_path / "bad.json"
    bad_profile.write_text("{}")
    with pytest.raises(CliError, match="--profile"):
        validate.run(parser.parse_args(["--profile", str(bad_profile), "--bench", str(report)]))


def test_kv_bytes_per_token_from_the_config(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    expected = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * config["head_dim"]
    assert kv_bytes_per_token(tiny_model) == expected * 4  # float32


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_profile_on_a_real_engine(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    argv = [sys.executable, "-m", "deploy.cli", "plan", "profile", "--quick", "--out", str(out)]
    completed = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=540, check=False
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    profile, step = load_step_model(out)
    assert [s.prompt_tokens for s in profile.prefill] == [32, 256]
    assert {s.batch for s in profile.decode} == {1, 4}
    assert len(profile.kv_pull) == 2 and all(s.seconds > 0 for s in profile.kv_pull)
    # Every point was measured and the fitted model predicts positive step times. (Whether
    # 256 tokens take longer than 32 is not asked: on the tiny model both are a few ms of
    # overhead, equal within noise; speed is for the benchmarks, not for tests.)
    assert all(s.seconds > 0 for s in profile.prefill)
    assert step.step_seconds(256, 0, 0, 0) > 0 and step.step_seconds(0, 0, 4, 256) > 0
    assert profile.max_num_seqs >= 1 and profile.kv_bytes_per_token > 0
