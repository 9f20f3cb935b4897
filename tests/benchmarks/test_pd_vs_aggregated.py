"""Tests of ``benchmarks.pd_vs_aggregated``.

Fast: argument checks, prompts of exact token lengths, the summary and table, reading the
PD path check from /metrics, and the process-group clean-up. Slow (real vLLM engines): a
Ctrl-C during start-up leaves no process behind, and a short full run writes its report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from benchmarks import pd_vs_aggregated as bench
from benchmarks.cli import BENCHMARKS
from benchmarks.planner.profile_model import Profile
from deploy.cli import CliError
from deploy.worker_launch import signal_group

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


# -- command line -----------------------------------------------------------------------------


def test_registered_as_pdserve_bench_pd() -> None:
    assert BENCHMARKS["pd"][0] == "benchmarks.pd_vs_aggregated"


def test_defaults_match_the_brief() -> None:
    args = _args()
    assert args.rates == [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]
    assert args.preset == "small" and args.model is None
    assert args.cores == (0, 1) and not args.wide
    assert (args.ttft_slo_ms, args.tpot_slo_ms, args.attainment) == (2000.0, 50.0, 0.9)
    assert args.kv_cache_gib == 1
    assert args.out == Path("benchmarks/results/pd_vs_aggregated.json")


def test_setups_share_the_two_cores() -> None:
    setups = {s.name: s for s in bench.build_setups((0, 1), wide=True)}
    assert [(e.role, e.core) for e in setups["pd"].engines] == [("prefill", "0"), ("decode", "1")]
    assert [(e.role, e.core) for e in setups["aggregated"].engines] == [
        ("aggregated", "0"), ("aggregated", "1"),
    ]  # fmt: skip
    assert [(e.role, e.core) for e in setups["aggregated-wide"].engines] == [("aggregated", "0-1")]
    assert [s.name for s in bench.build_setups((2, 5), wide=False)] == ["pd", "aggregated"]
    assert bench.build_setups((2, 5), wide=True)[2].engines[0].core == "2,5"


@pytest.mark.parametrize(
    "argv",
    [
        ["--rates", "0"],
        ["--rates", "1,abc"],
        ["--rates", "inf"],
        ["--cores", "0"],
        ["--cores", "1,1"],
        ["--seconds-per-rate", "0"],
        ["--attainment", "1.5"],
        ["--preset", "huge"],
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_missing_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"pd_vs_aggregated: --model: {tmp_path} is not a HF model directory (no config.json)"
    )


def test_requests_longer_than_the_model_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    with pytest.raises(CliError, match="max_position_embeddings 256"):
        bench.check_args(_args("--model", str(tmp_path), "--max-prompt-tokens", "250"))
    bench.check_args(
        _args("--model", str(tmp_path), "--max-prompt-tokens", "200", "--max-output-tokens", "50")
    )
    with pytest.raises(CliError, match="--max-model-len"):
        bench.check_args(_args("--max-prompt-tokens", "200", "--max-model-len", "210"))
    with pytest.raises(CliError, match="--min-prompts"):
        bench.check_args(_args("--min-prompts", "30", "--max-prompts", "10"))
    with pytest.raises(CliError, match="--workload-jsonl"):
        bench.check_args(_args("--workload-jsonl", str(tmp_path / "none.jsonl")))
    with pytest.raises(CliError, match="not available"):
        bench.check_args(_args("--cores", "0,4096"))


def test_quick_is_small_and_max_model_len_covers_the_longest_request() -> None:
    args = _args("--quick")
    bench.apply_quick(args)
    assert args.preset == "tiny" and args.rates == [2.0] and args.max_prompts == 6
    settings = bench.engine_settings(
        _args("--max-prompt-tokens", "1000", "--max-output-tokens", "100"), Path("m")
    )
    assert settings.max_model_len == 1152  # 1000 + 100 + 1, rounded up to 128-token blocks
    assert len(settings.secret) == 32


def test_prompts_per_rate_follow_the_duration_within_bounds() -> None:
    args = _args("--seconds-per-rate", "60", "--min-prompts", "20", "--max-prompts", "200")
    assert [bench.prompts_for_rate(r, args) for r in (0.1, 1.0, 2.5, 10.0)] == [20, 60, 150, 200]


# -- summary, table and plot ------------------------------------------------------------------


def _point(setup: str, rate: float, attainment: float, pd_ok: bool | None = None) -> Any:
    return bench.RatePoint(
        setup=setup, rate=rate, num_prompts=20, completed=20, failed=0, duration_s=20 / rate,
        request_throughput=rate, output_throughput=rate * 30,
        ttft_ms={"p50": 100.0 * rate, "p90": 200.0 * rate, "p99": 300.0 * rate},
        tpot_ms={"p50": 20.0, "p90": 40.0, "p99": 80.0},
        e2e_ms={"p50": 700.0, "p90": 900.0, "p99": 1000.0},
        attainment=attainment, vllm_request_goodput=None, command="vllm bench serve ...",
        counters={"kv_pulls": 21.0}, pd_path_ok=pd_ok, pd_path_detail="ok" if pd_ok else "",
        ttfts_ms=[100.0, 2500.0, None], tpots_ms=[10.0, 40.0, None],
        requests=[[200, 10, 0], [300, 20, 128], [100, 5, 0]],
    )  # fmt: skip


def _report(points: list[Any]) -> dict[str, Any]:
    return {
        "config": {
            "model": "generated small preset", "ttft_slo_ms": 2000.0, "tpot_slo_ms": 60.0,
            "attainment_target": 0.9,
            "workload": {"measured": wl_summary()},
        },
        "runs": [asdict(p) for p in points],
        "summary": bench.summarise(points, ["pd", "aggregated"], 0.9),
        "indicative": False,
    }  # fmt: skip


def wl_summary() -> dict[str, Any]:
    from benchmarks.workload import WorkloadSpec, generate, summary

    return summary(generate(WorkloadSpec(num_requests=50)))


def test_summary_table_and_plot(tmp_path: Path) -> None:
    points = [
        _point("pd", 1.0, 1.0, True), _point("pd", 2.0, 0.92, True), _point("pd", 3.0, 0.5, True),
        _point("aggregated", 1.0, 0.95), _point("aggregated", 2.0, 0.7),
        _point("aggregated", 3.0, 0.2),
    ]  # fmt: skip
    summary = bench.summarise(points, ["pd", "aggregated"], 0.9)
    assert summary["goodput_req_per_s"] == {"pd": 2.0, "aggregated": 1.0}
    assert summary["ratios"] == {"pd_over_aggregated": 2.0}
    report = _report(points)
    table = bench.format_table(report)
    header = next(line for line in table.splitlines() if line.startswith("setup"))
    for column in ("TTFT p50", "TPOT p50", "E2E p50", "req/s", "SLO met"):
        assert column in header
    rows = [r.split() for r in table.splitlines() if r.startswith(("pd  ", "aggregated  "))]
    # By rate, PD first within a rate.
    assert [(r[0], r[1]) for r in rows] == [
        ("pd", "1"), ("aggregated", "1"), ("pd", "2"), ("aggregated", "2"), ("pd", "3"),
        ("aggregated", "3"),
    ]  # fmt: skip
    assert rows[2][-1] == "92%"
    assert "goodput (req/s): pd 2, aggregated 1" in table
    assert "pd over aggregated: 2.00x" in table
    assert "PD path check: ok (3 runs, 63 KV pulls" in table
    points[1] = _point("pd", 2.0, 0.92, False)
    points[1].pd_path_detail = "3 of 21 disaggregated"
    assert "PD path check: NOT OK: 2 req/s: 3 of 21 disaggregated" in bench.format_table(
        _report(points)
    )
    assert bench.plot(report, tmp_path / "pd.png")
    assert (tmp_path / "pd.png").read_bytes()[:4] == b"\x89PNG"


def test_attainment_and_goodput_at_other_slos() -> None:
    point = _point("pd", 1.0, 1.0)
    # Request 0 meets 1000/20, request 1 needs TTFT 2500 and TPOT 40, request 2 failed.
    assert bench.attainment_at(point, 1000.0, 20.0) == pytest.approx(1 / 3)
    assert bench.attainment_at(point, 3000.0, 50.0) == pytest.approx(2 / 3)
    assert bench.attainment_at(point, 3000.0, 30.0) == pytest.approx(1 / 3)
    points = [_point("pd", 1.0, 1.0), _point("aggregated", 1.0, 1.0)]
    points[1].ttfts_ms = [100.0, 100.0, 100.0]
    points[1].tpots_ms = [10.0, 10.0, 10.0]
    grid = bench.slo_grid(points, [1000.0, 3000.0], [50.0], target=0.6)
    assert [(r["ttft_slo_ms"], r["goodput_req_per_s"]) for r in grid] == [
        (1000.0, {"pd": 0.0, "aggregated": 1.0}), (3000.0, {"pd": 1.0, "aggregated": 1.0}),
    ]  # fmt: skip
    assert [r["pd_over_aggregated"] for r in grid] == [0.0, 1.0]
    report = _report(points)
    report["slo_grid"] = grid
    table = bench.format_table(report)
    assert "goodput at other SLOs" in table and "0 / 1" in table


def test_no_rate_meeting_the_target_is_goodput_zero_and_ratio_unbounded() -> None:
    points = [_point("pd", 1.0, 0.95), _point("aggregated", 1.0, 0.5)]
    summary = bench.summarise(points, ["pd", "aggregated"], 0.9)
    assert summary["goodput_req_per_s"] == {"pd": 1.0, "aggregated": 0.0}
    assert summary["ratios"] == {"pd_over_aggregated": None}
    assert "pd over aggregated: unbounded" in bench.format_table(_report(points))


# -- the PD path check ------------------------------------------------------------------------

_CLEAN = {
    "proxy_disaggregated": 21.0, "proxy_aggregated": 0.0, "proxy_fallback": 0.0,
    "kv_bytes": 1e6, "kv_pulls": 21.0, "kv_failures": 0.0, "kv_recomputed_requests": 0.0,
    "kv_leases_expired": 0.0,
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"proxy_disaggregated": 20.0, "proxy_fallback": 1.0}, "proxy_fallback 1"),
        ({"proxy_aggregated": 2.0}, "proxy_aggregated 2"),
        ({"kv_recomputed_requests": 1.0}, "kv_recomputed_requests 1"),
        ({"kv_failures": 1.0}, "kv_failures 1"),
        ({"kv_pulls": 3.0}, "3 KV pulls for 21 requests"),
        ({"proxy_disaggregated": 5.0}, "5 of 21 disaggregated"),
    ],
)
def test_pd_check(change: dict[str, float], problem: str | None) -> None:
    ok, detail = bench.pd_check({**_CLEAN, **change}, 21)
    assert ok is (problem is None)
    assert detail == "ok" if problem is None else problem in detail


_PROXY_METRICS = """\
# TYPE pdserve_requests_total counter
pdserve_requests_total{endpoint="completions",model="m",status="200",path="disaggregated"} 7.0
pdserve_requests_total{endpoint="completions",model="m",status="503",path="disaggregated"} 1.0
pdserve_requests_total{endpoint="completions",model="m",status="200",path="fallback"} 2.0
"""
_DECODE_METRICS = """\
# TYPE pdserve_kv_transfer_bytes_total counter
pdserve_kv_transfer_bytes_total{model_name="m"} 1024.0
pdserve_kv_transfer_bytes_created{model_name="m"} 1.7e9
# TYPE pdserve_kv_transfer_seconds histogram
pdserve_kv_transfer_seconds_bucket{le="+Inf",model_name="m"} 3.0
pdserve_kv_transfer_seconds_count{model_name="m"} 3.0
pdserve_kv_transfer_seconds_sum{model_name="m"} 0.01
"""


async def _metrics_server(text: str) -> web.AppRunner:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _started(name: str, runner: web.AppRunner) -> bench.Started:
    port = runner.addresses[0][1]
    return bench.Started(name, f"http://127.0.0.1:{port}", None, Path("/dev/null"))  # type: ignore[arg-type]


async def test_counters_are_read_from_metrics_and_settle() -> None:
    proxy, decode = await _metrics_server(_PROXY_METRICS), await _metrics_server(_DECODE_METRICS)
    prefill = await _metrics_server("")
    engines = [_started("p", prefill), _started("d", decode)]
    try:
        counters = await asyncio.to_thread(bench.read_counters, _started("proxy", proxy), engines)
        zero = dict.fromkeys(counters, 0.0)
        # Ten requests counted, ten wanted: returns at once, with what it read.
        delta = await asyncio.to_thread(
            bench.settled_delta, _started("proxy", proxy), engines, zero, 10, False, 5.0
        )
        # Eleven wanted: waits out its deadline, then reports what there is.
        started = time.monotonic()
        short = await asyncio.to_thread(
            bench.settled_delta, _started("proxy", proxy), engines, zero, 11, False, 1.0
        )
        waited = time.monotonic() - started
    finally:
        for runner in (proxy, decode, prefill):
            await runner.cleanup()
    assert counters["proxy_disaggregated"] == 8.0  # both statuses
    assert counters["proxy_fallback"] == 2.0 and counters["proxy_aggregated"] == 0.0
    assert counters["kv_bytes"] == 1024.0 and counters["kv_pulls"] == 3.0
    assert delta == counters and short == counters
    assert waited >= 1.0


# -- process clean-up -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_stop_reaches_the_whole_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    # A leader that ignores SIGTERM, with a child: both must be gone after stop.
    script = f"trap '' TERM; sleep 300 & echo $! > {pid_file}; wait"
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    processes = bench.ProcessSet(tmp_path)
    started = processes.add(bench.Started("sh", "http://unused", process, tmp_path / "log"))
    processes.stop_all()
    assert processes.running == []
    assert processes.leftovers == []
    assert process.returncode is not None
    assert not _alive(child)
    processes.stop(started)  # stopping twice is harmless


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, wanted: str) -> None:
    deadline = time.monotonic() + 10
    while _state(pid) != wanted:
        assert time.monotonic() < deadline, f"pid {pid} is {_state(pid)}, not {wanted}"
        time.sleep(0.02)


def test_a_paused_group_is_still_stopped_gracefully(tmp_path: Path) -> None:
    # SIGTERM to a stopped group waits until it is continued; stop must continue it, so
    # the leader's own TERM handler runs (it writes a file) rather than the SIGKILL.
    done = tmp_path / "terminated"
    script = f"trap 'touch {done}; exit 0' TERM; while :; do sleep 0.1; done"
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    processes = bench.ProcessSet(tmp_path)
    started = processes.add(bench.Started("sh", "http://unused", process, tmp_path / "log"))
    time.sleep(0.3)  # the trap is set
    signal_group(started.process.pid, signal.SIGSTOP)
    _wait_state(process.pid, "T")
    processes.stop_all()
    assert done.exists()
    assert processes.leftovers == []


def test_pause_stops_every_group_of_a_setup(tmp_path: Path) -> None:
    def sleeper(name: str) -> bench.Started:
        process = subprocess.Popen(["sleep", "60"], start_new_session=True)
        return bench.Started(name, "http://unused", process, tmp_path / f"{name}.log")

    setup = bench.build_setups((0, 1), wide=False)[0]
    running = bench.RunningSetup(setup, [sleeper("prefill"), sleeper("decode")], sleeper("proxy"))
    try:
        bench.pause(running)
        for started in (running.proxy, *running.engines):
            _wait_state(started.process.pid, "T")
        for started in (running.proxy, *running.engines):
            signal_group(started.process.pid, signal.SIGCONT)
            _wait_state(started.process.pid, "S")
    finally:
        for started in (running.proxy, *running.engines):
            started.process.kill()
            started.process.wait()


def test_setups_take_turns_first_place_rotating() -> None:
    setups = bench.build_setups((0, 1), wide=True)
    running = [bench.RunningSetup(setup, [], None) for setup in setups]  # type: ignore[arg-type]
    orders = [[r.setup.name for r in bench.turns(running, i)] for i in range(4)]
    assert orders == [
        ["pd", "aggregated", "aggregated-wide"],
        ["aggregated", "aggregated-wide", "pd"],
        ["aggregated-wide", "pd", "aggregated"],
        ["pd", "aggregated", "aggregated-wide"],
    ]
    assert bench.turns([], 3) == []


def test_sigterm_becomes_keyboard_interrupt() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), bench.signals_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


# -- real engines -----------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (session id, command line) of every live, non-zombie process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if stat[0] != "Z":
            found[int(entry.name)] = (int(stat[3]), cmdline)
    return found


def _sessions_mentioning(text: str, exclude: int) -> set[int]:
    """Sessions led by a process whose command line contains ``text``.

    Engines and the proxy each lead their own session; vLLM's engine-core children rename
    themselves (``VLLM::EngineCore``) but stay in their server's session.
    """
    return {
        pid
        for pid, (sid, cmdline) in _processes().items()
        if pid == sid and pid != exclude and text in cmdline
    }


def _members(sessions: set[int]) -> list[str]:
    return [f"{pid}: {cmd[:120]}" for pid, (sid, cmd) in _processes().items() if sid in sessions]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_during_startup_leaves_nothing(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    argv = [sys.executable, "-m", "benchmarks.pd_vs_aggregated", "--log-dir", str(log_dir)]
    argv += ["--out", str(tmp_path / "out.json")]
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # As in a terminal: a suite started in the background by a shell without job control
        # hands SIGINT down ignored, and the benchmark would then never see the Ctrl-C.
        preexec_fn=_default_sigint,
    )
    sessions: set[int] = set()
    try:
        # Interrupt once both engines are booting (the tiny model lives in the log dir, so
        # both engines' command lines name it) and have spawned their engine cores.
        deadline = time.monotonic() + 240
        while len(sessions) < 2 or len(_members(sessions)) < 4:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"engines never started: {_members(sessions)}"
            time.sleep(0.2)
            sessions |= _sessions_mentioning(str(log_dir), exclude=process.pid)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Whatever the benchmark failed to stop must not load the rest of the suite.
        leaked = _members(sessions)
        for session in sessions:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(session, signal.SIGKILL)
    assert leaked == [], leaked
    assert process.returncode == 130, err.decode()
    assert b"interrupted" in err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_real_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "pd.json"
    log_dir = tmp_path / "logs"
    argv = [sys.executable, "-m", "benchmarks.pd_vs_aggregated", "--quick"]
    argv += ["--log-dir", str(log_dir), "--out", str(out)]
    argv += ["--profile-out", str(tmp_path / "profile.json")]
    process = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    # Watch which sessions it starts, to check afterwards that none survives.
    sessions: set[int] = set()
    while process.poll() is None:
        sessions |= _sessions_mentioning(str(log_dir), exclude=process.pid)
        time.sleep(0.5)
    stdout, stderr = process.communicate()
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert len(sessions) >= 3  # prefill, decode, proxy at least
    assert _members(sessions) == []
    assert "PD path check: ok" in stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "pd_vs_aggregated"
    assert report["leftover_processes"] == []
    assert out.with_suffix(".png").is_file()
    runs = {run["setup"]: run for run in report["runs"]}
    assert set(runs) == {"pd", "aggregated"}
    for run in runs.values():
        assert run["completed"] == run["num_prompts"] == 6 and run["failed"] == 0, run
        assert 0 < run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]
        assert run["command"].startswith("vllm bench serve ")
        assert len(run["ttfts_ms"]) == 6
    pd = runs["pd"]
    assert pd["pd_path_ok"] is True
    # The six measured requests and nothing else, each through prefill and a KV pull.
    assert pd["counters"]["proxy_disaggregated"] == 6 and pd["counters"]["kv_bytes"] > 0
    assert pd["counters"]["kv_pulls"] >= 6 and pd["counters"]["kv_recomputed_requests"] == 0
    assert runs["aggregated"]["counters"]["proxy_aggregated"] == 6
    assert runs["aggregated"]["counters"]["kv_bytes"] == 0
    assert set(report["summary"]["goodput_req_per_s"]) == {"pd", "aggregated"}
    # Profiled in the same run, after the sweep, for pdserve plan validate.
    assert report["profile"]["path"] == str(tmp_path / "profile.json")
    profile = Profile.load(tmp_path / "profile.json")
    assert profile.model == "generated tiny preset"
    assert profile.prefill and profile.decode and profile.kv_pull
