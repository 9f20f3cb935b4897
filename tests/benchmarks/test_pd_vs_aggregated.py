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
from deploy.cli import CliError

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


# -- command line -----------------------------------------------------------------------------


def test_registered_as_pdserve_bench_pd() -> None:
    assert BENCHMARKS["pd"][0] == "benchmarks.pd_vs_aggregated"


def test_import_stays_light() -> None:
    code = (
        "import sys, benchmarks.pd_vs_aggregated; "
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr


def test_defaults_match_the_brief() -> None:
    args = _args()
    assert args.prompt_tokens == [64, 512, 1024]
    assert args.concurrency == [1, 4]
    assert args.max_tokens == 32
    assert (args.prefill_core, args.decode_core) == ("0", "1")
    assert args.aggregated_phase == "stopped"
    assert args.kv_cache_gib == 1
    assert args.out == Path("benchmarks/results/pd_vs_aggregated.json")


@pytest.mark.parametrize(
    "argv",
    [
        ["--prompt-tokens", "0"],
        ["--prompt-tokens", "64,abc"],
        ["--concurrency", ""],
        ["--duration", "0"],
        ["--max-tokens", "-1"],
        ["--aggregated-phase", "sometimes"],
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


def test_prompt_longer_than_the_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    with pytest.raises(CliError, match="max_position_embeddings 256"):
        bench.check_args(_args("--model", str(tmp_path), "--prompt-tokens", "64,512"))
    bench.check_args(_args("--model", str(tmp_path), "--prompt-tokens", "64,200"))
    with pytest.raises(CliError, match="--max-model-len"):
        bench.check_args(
            _args("--model", str(tmp_path), "--prompt-tokens", "200", "--max-model-len", "210")
        )


def test_max_model_len_covers_the_longest_request() -> None:
    settings = bench.engine_settings(
        _args("--prompt-tokens", "64,1024", "--max-tokens", "32"), Path("m")
    )
    assert settings.max_model_len == 1152  # 1024 + 32 + 1, rounded up to 128-token blocks
    assert settings.max_model_len % settings.block_size == 0
    assert len(settings.secret) == 32


# -- prompts ----------------------------------------------------------------------------------


def test_prompts_have_exact_token_lengths(tiny_model: Path) -> None:
    from tokenizers import Tokenizer

    prompts = bench.prompt_token_ids(tiny_model, [1, 64, 1024])
    assert {n: len(ids) for n, ids in prompts.items()} == {1: 1, 64: 64, 1024: 1024}
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    special = {tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<unk>", "<pad>")}
    assert not special & set(prompts[1024])
    # Ordinary text, not one token repeated.
    assert len(set(prompts[64])) > 16
    assert prompts[1024][:64] == prompts[64]


# -- summary and table ------------------------------------------------------------------------


def _point(setup: str, prompt: int, conc: int, ttft: float, itl: float, rps: float) -> Any:
    return bench.PointResult(
        setup=setup, prompt_tokens=prompt, concurrency=conc, requests=10, ok=10, errors=0,
        wall_s=5.0, requests_per_s=rps, output_tokens_per_s=rps * 32, chunks_per_request=30,
        ttft_p50_ms=ttft, ttft_p99_ms=ttft * 2, itl_p50_ms=itl, itl_p99_ms=itl * 3,
        tpot_mean_ms=itl * 1.1, e2e_p50_ms=ttft + 31 * itl, e2e_p99_ms=None, load_average_1m=3.0,
    )  # fmt: skip


def test_compare_and_table() -> None:
    runs = [
        _point("pd", 64, 1, 20.0, 5.0, 4.0),
        _point("aggregated", 64, 1, 10.0, 10.0, 2.0),
        _point("pd", 512, 4, 30.0, 6.0, 8.0),
    ]
    rows = bench.compare(runs)
    # Only points measured on both setups are compared.
    assert rows == [
        {
            "prompt_tokens": 64,
            "concurrency": 1,
            "ttft_p50_pd_over_aggregated": 2.0,
            "itl_p50_pd_over_aggregated": 0.5,
            "e2e_p50_pd_over_aggregated": pytest.approx((20 + 155) / (10 + 310)),
            "requests_per_s_pd_over_aggregated": 2.0,
        }
    ]
    report = {
        "config": {
            "model": "generated tiny model",
            "max_tokens": 32,
            "cores": {"prefill": "0", "decode": "1", "aggregated": "0"},
            "aggregated_phase": bench.phase_description("stopped"),
        },
        "runs": [asdict(r) for r in runs],
        "pd_check": {
            "ok": True,
            "proxy_requests_by_path": {"disaggregated": 12.0, "aggregated": None, "fallback": None},
            "decode_kv_transfer_bytes": 4096.0,
        },
        "machine": {"load_average": {"before": [7.5, 1, 1], "pd_start": [8.0, 1, 1]}},
        "indicative": True,
    }
    table = bench.format_table(report)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("setup"))
    for column in ("TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "TPOT", "E2E p50", "req/s"):
        assert column in header
    rows_text = [line.split() for line in lines if line.startswith(("pd ", "aggregated "))]
    # Sorted by point, PD first within a point.
    assert [(r[0], r[1], r[2]) for r in rows_text] == [
        ("pd", "64", "1"), ("aggregated", "64", "1"), ("pd", "512", "4"),
    ]  # fmt: skip
    assert rows_text[0][5:11] == ["20.0", "40.0", "5.0", "15.0", "5.5", "175.0"]
    assert "ran alone" in table
    assert "PD path check: ok" in table
    assert "indicative" in table


# -- reading the PD check from /metrics -------------------------------------------------------

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


async def test_pd_check_reads_paths_and_transfer_bytes() -> None:
    proxy, decode = await _metrics_server(_PROXY_METRICS), await _metrics_server(_DECODE_METRICS)
    prefill = await _metrics_server("")
    try:
        check = await asyncio.to_thread(
            bench.pd_check, _started("proxy", proxy), _started("p", prefill), _started("d", decode)
        )
    finally:
        for runner in (proxy, decode, prefill):
            await runner.cleanup()
    assert check["proxy_requests_by_path"] == {
        "disaggregated": 8.0,
        "aggregated": None,
        "fallback": 2.0,
    }
    assert check["decode_kv_transfer_bytes"] == 1024.0
    assert check["prefill_kv_transfer_bytes"] is None
    # Two requests fell back to the decode engine alone: not a clean PD run.
    assert check["ok"] is False


@pytest.mark.parametrize(
    ("other_path", "ok"), [("disaggregated", True), ("aggregated", False), ("fallback", False)]
)
async def test_pd_check_ok_only_when_all_disaggregated(other_path: str, ok: bool) -> None:
    text = _PROXY_METRICS.replace('path="fallback"', f'path="{other_path}"')
    proxy, decode = await _metrics_server(text), await _metrics_server(_DECODE_METRICS)
    try:
        check = await asyncio.to_thread(
            bench.pd_check, _started("proxy", proxy), _started("p", decode), _started("d", decode)
        )
    finally:
        await proxy.cleanup()
        await decode.cleanup()
    assert check["ok"] is ok


async def test_pd_check_needs_kv_bytes() -> None:
    text = _PROXY_METRICS.replace('path="fallback"', 'path="disaggregated"')
    proxy, empty = await _metrics_server(text), await _metrics_server("")
    try:
        check = await asyncio.to_thread(
            bench.pd_check, _started("proxy", proxy), _started("p", empty), _started("d", empty)
        )
    finally:
        await proxy.cleanup()
        await empty.cleanup()
    assert check["decode_kv_transfer_bytes"] is None
    assert check["ok"] is False


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
@pytest.mark.timeout(1800)
def test_short_real_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "pd.json"
    log_dir = tmp_path / "logs"
    argv = [
        sys.executable, "-m", "benchmarks.pd_vs_aggregated",
        "--prompt-tokens", "64,512", "--concurrency", "1,2",
        "--max-tokens", "8", "--duration", "2", "--max-requests", "8",
        "--log-dir", str(log_dir), "--out", str(out),
    ]  # fmt: skip
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
    assert len(sessions) >= 3  # prefill, decode, proxy (aggregated may start between polls)
    assert _members(sessions) == []
    completed = subprocess.CompletedProcess(argv, 0, stdout, stderr)
    assert "PD path check: ok" in completed.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "pd_vs_aggregated"
    assert report["pd_check"]["ok"] is True
    assert report["leftover_processes"] == []
    assert len(report["machine"]["load_average"]["before"]) == 3
    points = {(r["setup"], r["prompt_tokens"], r["concurrency"]) for r in report["runs"]}
    assert points == {(s, p, c) for s in ("pd", "aggregated") for p in (64, 512) for c in (1, 2)}
    for run in report["runs"]:
        assert run["ok"] > 0 and run["errors"] == 0, run
        # ignore_eos: every stream has all its tokens, in at most one chunk each.
        assert 1 <= run["chunks_per_request"] <= 8
        assert run["output_tokens_per_s"] == pytest.approx(run["ok"] * 8 / run["wall_s"])
        assert run["tpot_mean_ms"] > 0
        assert 0 < run["ttft_p50_ms"] <= run["e2e_p50_ms"]
        if run["chunks_per_request"] > 1:  # a stream sent as one chunk has no gaps
            assert 0 < run["itl_p50_ms"] <= run["itl_p99_ms"]
    assert len(report["comparison"]) == 4
