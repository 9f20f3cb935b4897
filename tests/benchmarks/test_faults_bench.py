"""Tests of ``benchmarks.faults`` (`pdserve bench faults`).

Fast: arguments, the report table and plot, the load's classification of responses
against a small aiohttp server that misbehaves on purpose. Slow: a ``--quick`` run on a
real `pdserve up` 1P1D cluster writes its report with no hung request and no KV block
left held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from benchmarks import faults
from benchmarks.cli import BENCHMARKS
from deploy.cli import CliError

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    faults.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_registered_as_pdserve_bench_faults() -> None:
    assert BENCHMARKS["faults"][0] == "benchmarks.faults"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--faults", "kill-decode,unplug-the-rack"], "--faults: unknown unplug-the-rack"),
        (["--prefill", "0"], "--prefill and --decode must be >= 1"),
        (["--model", "/nonexistent"], "--model: /nonexistent has no config.json"),
    ],
)
def test_bad_arguments_fail_before_anything_starts(argv: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message):
        faults.run(_args(*argv))


def test_quick_is_a_1p1d_smoke_of_the_faults_that_need_no_restart() -> None:
    args = _args("--quick")
    faults._apply_quick(args)
    assert (args.prefill, args.decode) == (1, 1)
    assert args.faults == ",".join(faults.QUICK_FAULTS)
    assert not {"kill-decode", "kill-prefill"} & set(faults.QUICK_FAULTS)


def _result(name: str, **kw: object) -> faults.PhaseResult:
    base: dict[str, object] = {
        "differs_from_fault_free": 1,
        "moved": {"before_first_byte": 4.0, "mid_stream": 5.0},
        "fault": name,
        "target": "decode-0",
        "sent": 40,
        "ok": 30,
        "failed_before_first_byte": 6,
        "failed_mid_stream": 2,
        "hung": 0,
        "disconnected_by_client": 2,
        "kv_blocks_held_after": {"prefill-0": 0, "prefill-1": 0},
        "out_of_rotation_s": 60.0,
        "back_in_rotation_s": 61.5,
        "kv_handoffs": {"recomputed": 3.0},
        "errors": {},
    }
    base.update(kw)
    return faults.PhaseResult(**base)  # type: ignore[arg-type]


def test_table_and_plot(tmp_path: Path) -> None:
    results = [
        _result("kill-decode"),
        _result("kv-port-refused", skipped="needs root"),
        _result("client-disconnects", back_in_rotation_s=None, out_of_rotation_s=None),
    ]
    table = faults.format_table(results).splitlines()
    assert table[0].split()[:3] == ["fault", "target", "sent"]
    assert table[1].split() == [
        "kill-decode", "decode-0", "40", "30", "6", "2", "0", "2", "1", "4", "5", "3", "0", "-",
        "61.5", "s",
    ]  # fmt: skip
    assert "skipped: needs root" in table[2]
    assert table[3].split()[-1] == "-"
    png = tmp_path / "faults.png"
    assert faults.plot(results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_blocks_and_hangs_fail_the_run() -> None:
    assert faults._held(_result("x", kv_blocks_held_after={"prefill-0": 3, "prefill-1": None})) == 3
    expired = _result("x", kv_blocks_held_after={"prefill-0": 3}, kv_blocks_held_after_lease={})
    assert faults._held(expired, after_lease=True) == 0
    leaked = _result("x", kv_blocks_held_after_lease={"prefill-0": 1, "prefill-1": 0})
    assert faults._held(leaked, after_lease=True) == 1
    assert faults.format_row(leaked).split()[13] == "1"


def test_answers_that_differ_from_the_fault_free_run_are_counted_and_fail_the_run() -> None:
    load = faults.Load("http://127.0.0.1:1", 1, 4, fault_free={("chat", 3): "the sea"})
    load.record("chat", 3, faults.Answer("ok", text="the sea"))
    load.record("chat", 3, faults.Answer("ok", text="the sky"))
    load.record("chat", 3, faults.Answer("failed_mid_stream", "cut"))  # failed: not compared
    load.record("chat", 4, faults.Answer("ok", text="no fault-free answer to compare with"))
    assert (load.tally.sent, load.tally.ok, load.tally.differs) == (4, 3, 1)
    assert "differs: chat prompt 3: 'the sky'" in load.tally.errors


# -- the load's classification --------------------------------------------------------------


async def _misbehaving_proxy(request: web.Request) -> web.StreamResponse:
    """The behaviour is chosen by the prompt the load generator sends (its turn number)."""
    body = await request.json()
    text = body.get("prompt") or body["messages"][0]["content"]
    turn = int(text.split(":")[0].split()[1])
    mode = turn % 5
    if mode == 0:
        return web.json_response({"error": {"message": "no decode"}}, status=503)
    if not body["stream"]:
        if mode == 1:
            await asyncio.sleep(5)  # never answers within the test's hang limit
        return web.json_response({"choices": [{"text": "ok"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"choices": [{"text": "a"}]}\n\n')
    if mode == 2:
        await response.write(b'data: {"error": {"message": "decode died"}}\n\n')
    elif mode == 3:
        return response  # cut without [DONE]
    elif mode == 1:
        await asyncio.sleep(5)  # silent mid-stream
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.fixture
async def misbehaving() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/completions", _misbehaving_proxy)
    app.router.add_post("/v1/chat/completions", _misbehaving_proxy)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.timeout(60)
async def test_load_classifies_each_way_a_request_can_end(
    misbehaving: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "HANG_LIMIT_S", 1.0)
    load = faults.Load(misbehaving, concurrency=1, max_tokens=4)
    await load.start()
    outcomes = {}
    # Every (kind, mode) pair: 4 kinds x 5 modes, one request at a time, in turn order.
    for turn in range(1, 21):
        kind = faults.KINDS[turn % len(faults.KINDS)]
        answer = await load.ask(kind, turn)
        outcomes[(kind, turn % 5)] = answer.outcome
        if answer.outcome == "ok":
            assert answer.text == ("a" if kind.endswith("stream") else "ok")
    await load.stop()
    for kind in faults.KINDS:
        stream = kind.endswith("stream")
        assert outcomes[(kind, 0)] == "failed_before_first_byte"
        assert outcomes[(kind, 1)] == "hung"
        assert outcomes[(kind, 2)] == ("failed_mid_stream" if stream else "ok")
        assert outcomes[(kind, 3)] == ("failed_mid_stream" if stream else "ok")
        assert outcomes[(kind, 4)] == "ok"


@pytest.mark.timeout(60)
async def test_fault_free_answers_fail_the_bench_when_the_healthy_cluster_fails(
    misbehaving: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "PROMPTS", 1)  # prompt 0 is answered 503 (mode 0)
    load = faults.Load(misbehaving, concurrency=2, max_tokens=4)
    with pytest.raises(faults.BenchError, match="failed 4 requests: completions prompt 0"):
        await load.fault_free_answers()
    await load.stop()


@pytest.mark.timeout(60)
async def test_abandoned_streams_are_counted_as_the_clients_doing(misbehaving: str) -> None:
    load = faults.Load(misbehaving, concurrency=1, max_tokens=4)
    await load.start()
    assert await load.ask("completions-stream", 4, abandon=True) == faults.Answer(
        "disconnected_by_client"
    )
    assert await load.ask("completions", 4) == faults.Answer("ok", text="ok")
    await load.stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_on_a_real_cluster(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    completed = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "bench", "faults", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
    )
    print(completed.stdout[-3000:], completed.stderr[-3000:])
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["topology"] == "1P1D"
    phases = {p["fault"]: p for p in report["phases"]}
    assert set(phases) == set(faults.QUICK_FAULTS)
    for phase in phases.values():
        if phase["skipped"]:
            assert phase["fault"] == "kv-port-refused", phase
            continue
        assert phase["sent"] > 0, phase
        assert phase["hung"] == 0, phase
        assert phase["kv_blocks_held_after"] == {"prefill-0": 0}, phase
    assert phases["client-disconnects"]["disconnected_by_client"] > 0
    refused = phases["kv-port-refused"]
    if not refused["skipped"]:
        # The fault was real, and the decode's fallback to recomputing was counted.
        assert refused["kv_handoffs"]["recomputed"] > 0, refused
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
