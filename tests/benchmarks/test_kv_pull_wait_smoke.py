"""Tests of ``benchmarks.kv_pull_wait`` (``pdserve bench kv --engine``).

Fast: the command line (standalone and embedded in ``pdserve bench kv``), the model geometry,
the percentiles, table and problem list on fixed numbers, and a timed pull from the real
block server in this process. Slow: a ``--quick`` run against real vLLM engines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import kv_pull_wait as bench
from benchmarks import kv_transfer

REPO = Path(__file__).resolve().parents[2]

TINY_CONFIG = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    bench.resolve_defaults(args)
    return args


# -- command line -----------------------------------------------------------------------------


def test_defaults_and_quick() -> None:
    full = _args()
    assert (full.pulls, full.decode_requests, full.warmup) == (40, 20, 3)
    assert (full.prefill_core, full.decode_core) == ("0", "1")
    assert (full.block_size, full.dtype, full.served_model_name) == (32, "float32", "tiny")
    assert full.out_dir == Path("benchmarks/results")
    quick = _args("--quick")
    assert (quick.pulls, quick.decode_requests, quick.warmup) == (10, 5, 1)
    assert _args("--quick", "--pulls", "7").pulls == 7
    assert bench.handoff_tokens(full) == 128
    # The longest prompt (2000 load tokens + 1) fits, rounded up to a block.
    assert bench.max_model_len(full) == 2016


def test_embedded_in_bench_kv_with_a_prefix(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    kv_transfer.add_arguments(parser)
    argv = ["--engine-only", "--engine-quick", "--engine-block-size", "16", "--dtype", "float16"]
    args = parser.parse_args([*argv, "--engine-out-dir", str(tmp_path)])
    assert args.engine_only and not args.engine
    # The socket benchmark's own --block-size and --dtype are untouched.
    assert (args.block_size, args.dtype) == (32, "float16")
    own = bench.options(args, kv_transfer.ENGINE_PREFIX)
    assert own.quick is True and own.block_size == 16 and own.dtype == "float32"
    assert own.out_dir == tmp_path
    assert not hasattr(own, "only") and not hasattr(own, "sizes_mib")
    assert set(vars(own)) == set(vars(_args()))


def test_bad_model_dir_is_refused_before_any_engine(tmp_path: Path) -> None:
    args = _args("--model", str(tmp_path))
    from deploy.cli import CliError

    with pytest.raises(CliError, match=r"no config\.json"):
        bench.check_args(args)
    (tmp_path / "config.json").write_text(
        json.dumps(TINY_CONFIG | {"max_position_embeddings": 512})
    )
    with pytest.raises(CliError, match="max_position_embeddings"):
        bench.check_args(args)
    assert bench.check_args(_args("--model", str(tmp_path), "--load-tokens", "400")) is not None


def test_geometry_and_fingerprint_of_the_tiny_model() -> None:
    geometry = bench.ModelGeometry.from_config(TINY_CONFIG)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (2, 2, 32)
    fingerprint = geometry.fingerprint("tiny", "float32", 32)
    assert fingerprint.dtype == "torch.float32"
    assert fingerprint.layout == "LBHNC"
    assert fingerprint.block_shape == (2, 32, 64)
    # 2 layers x [2 heads, 32 tokens, 2 x 32] float32
    assert geometry.block_bytes("float32", 32) == 2 * 2 * 32 * 64 * 4
    with_head_dim = bench.ModelGeometry.from_config(TINY_CONFIG | {"head_dim": 64})
    assert with_head_dim.head_dim == 64


# -- statistics, table, verdict ---------------------------------------------------------------


def _report(**decode: Any) -> dict[str, Any]:
    idle = bench.PhaseSamples("idle", bytes_per_pull=131072)
    idle.waits_s = [i / 1000.0 for i in range(1, 101)]  # 1..100 ms
    idle.pulls_s = [w + 0.002 for w in idle.waits_s]
    idle.prefill_legs_s = [0.01] * 100
    computing = bench.PhaseSamples("computing", bytes_per_pull=131072)
    computing.waits_s = [0.004, 0.002, 0.003, 0.001]
    computing.pulls_s = [0.005, 0.003, 0.004, 0.002]
    args = _args()
    return {
        "config": bench.config_of(args),
        "phases": {"idle": bench.summarize(idle), "computing": bench.summarize(computing)},
        "load": {
            "concurrency": 2,
            "prompt_tokens": 2000,
            "requests": 50,
            "errors": 0,
            "latency_p50_ms": 80.0,
            "prefill_tokens_per_s": 25000.0,
        },
        "decode": {
            "requests": 5,
            "ok": 5,
            "errors": 0,
            "outcomes": {"transferred": 5},
            "recomputed_requests": 0.0,
            "transfer_failures": 0.0,
            "recompute_count": 0.0,
            "transfers": 5.0,
        }
        | decode,
        "leftover_processes": [],
    }


def test_percentiles_on_fixed_numbers() -> None:
    phases = _report()["phases"]
    idle = phases["idle"]
    assert idle["pulls"] == 100 and idle["errors"] == 0
    # Linear interpolation over 1..100 ms.
    assert idle["wait_p50_ms"] == pytest.approx(50.5)
    assert idle["wait_p99_ms"] == pytest.approx(99.01)
    assert idle["wait_max_ms"] == pytest.approx(100.0)
    assert idle["pull_p50_ms"] == pytest.approx(52.5)
    assert idle["prefill_leg_p50_ms"] == pytest.approx(10.0)
    assert len(idle["waits_ms"]) == 100
    computing = phases["computing"]
    assert computing["wait_p50_ms"] == pytest.approx(2.5)
    assert computing["wait_p99_ms"] == pytest.approx(3.97)
    assert computing["pull_p99_ms"] == pytest.approx(4.97)
    empty = bench.summarize(bench.PhaseSamples("idle", errors=["refused"]))
    assert empty["wait_p50_ms"] is None and empty["pulls"] == 0 and empty["errors"] == 1


def test_table_has_both_phases_and_the_recompute_count() -> None:
    table = bench.format_table(_report())
    header = next(line for line in table.splitlines() if line.startswith("phase"))
    for column in ("pulls", "wait p50 ms", "wait p99 ms", "pull p50 ms", "pull p99 ms"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in table.splitlines()}
    assert rows["idle"][1:6] == ["100", "0", "50.50", "99.01", "52.50"]
    assert rows["computing"][1:4] == ["4", "0", "2.50"]
    assert "recompute count 0" in table
    assert "2 x 2000-token prefills" in table


def test_problems_make_the_run_fail() -> None:
    assert bench.problems_of(_report()) == []
    recomputed = bench.problems_of(
        _report(recomputed_requests=1.0, transfer_failures=1.0, recompute_count=2.0)
    )
    assert len(recomputed) == 1 and "recompute count 2, must be 0" in recomputed[0]
    assert bench.problems_of(_report(recompute_count=None, recomputed_requests=None))
    assert bench.problems_of(_report(outcomes={"transferred": 4, "recomputed": 1}))
    report = _report()
    report["phases"]["computing"]["errors"] = 1
    assert bench.problems_of(report) == ["1 pulls failed in the computing phase"]


def test_report_writes_json_and_says_when_there_is_no_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _report() | {"indicative": False}
    assert bench.report_and_status(report, tmp_path) == 0
    written = json.loads((tmp_path / bench.JSON_NAME).read_text())
    assert written["phases"]["idle"]["wait_p50_ms"] == pytest.approx(50.5)
    assert written["problems"] == []
    out = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
        assert not (tmp_path / bench.PNG_NAME).exists()
    else:
        assert (tmp_path / bench.PNG_NAME).stat().st_size > 0
    failing = _report(recompute_count=1.0, recomputed_requests=1.0) | {"indicative": False}
    assert bench.report_and_status(failing, tmp_path) == 1


# -- the pull itself, against the real block server in this process ---------------------------


def test_puller_times_the_wait_and_reads_every_byte() -> None:
    import torch

    from kv_transfer import params as kvp
    from kv_transfer.block_server import BlockServer, ServerSettings
    from kv_transfer.device import KVCacheAccess
    from kv_transfer.leases import LeaseTable

    geometry = bench.ModelGeometry.from_config(TINY_CONFIG)
    fingerprint = geometry.fingerprint("tiny", "float32", 32)
    shape = (16, *fingerprint.block_shape)
    layers = [torch.randn(shape) for _ in range(geometry.num_layers)]
    secret, engine_id = "s3cret", "prefill-bench-test"
    leases = LeaseTable()
    server = BlockServer(
        ServerSettings(host="127.0.0.1", port=0, secret=secret.encode()),
        fingerprint,
        KVCacheAccess(layers),
        leases,
        engine_id=engine_id,
    )
    server.start()
    puller = bench.Puller(secret, fingerprint, geometry.block_bytes("float32", 32))
    try:

        def remote(request_id: str, blocks: tuple[int, ...], num_tokens: int) -> Any:
            return kvp.RemotePrefill.parse(
                {
                    kvp.REMOTE_HOST: "127.0.0.1",
                    kvp.REMOTE_PORT: server.port,
                    kvp.REMOTE_REQUEST_ID: request_id,
                    kvp.REMOTE_BLOCK_IDS: list(blocks),
                    kvp.REMOTE_NUM_TOKENS: num_tokens,
                    kvp.HOLD_TOKEN: kvp.hold_token(secret.encode(), engine_id, request_id),
                }
            )

        # 100 tokens: the first 4 of the 5 held blocks.
        leases.add("r1", [3, 5, 7, 9, 11], time.time() + 60)
        wait, total, nbytes = puller.pull(remote("r1", (3, 5, 7, 9, 11), 100), 32)
        assert nbytes == 4 * geometry.block_bytes("float32", 32)
        assert 0 < wait <= total
        # Released with the read (the server does so right after its last byte).
        deadline = time.monotonic() + 5.0
        while len(leases) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(leases) == 0

        # A hold the server learns of after the read arrived (the engine step that registers
        # it comes later): the wait covers it.
        hold = remote("r2", (1, 2), 64)
        registered = threading.Timer(0.2, leases.add, ("r2", [1, 2], time.time() + 60))
        registered.start()
        wait, total, _ = puller.pull(hold, 32)
        registered.join()
        assert wait >= 0.15 and total >= wait

        # A refused read (a hold never issued: no token, so no wait) is one failed pull, not
        # a crash; the next pull reconnects.
        never_held = dataclasses.replace(remote("never-held", (1,), 32), hold_token="")
        with pytest.raises(bench.PullError, match="unknown_request"):
            puller.pull(never_held, 32)
        leases.add("r3", [4], time.time() + 60)
        assert puller.pull(remote("r3", (4,), 20), 32)[2] == geometry.block_bytes("float32", 32)
    finally:
        puller.close()
        server.stop()


def test_puller_explains_a_fingerprint_mismatch() -> None:
    import torch

    from kv_transfer import params as kvp
    from kv_transfer.block_server import BlockServer, ServerSettings
    from kv_transfer.device import KVCacheAccess
    from kv_transfer.leases import LeaseTable

    geometry = bench.ModelGeometry.from_config(TINY_CONFIG)
    theirs = geometry.fingerprint("tiny", "float32", 32)
    layers = [torch.randn((4, *theirs.block_shape)) for _ in range(geometry.num_layers)]
    server = BlockServer(
        ServerSettings(host="127.0.0.1", port=0, secret=b"s"),
        theirs,
        KVCacheAccess(layers),
        LeaseTable(),
        engine_id="p",
    )
    server.start()
    puller = bench.Puller("s", geometry.fingerprint("other", "float32", 32), 1)
    try:
        remote = kvp.RemotePrefill.parse(
            {
                kvp.REMOTE_HOST: "127.0.0.1",
                kvp.REMOTE_PORT: server.port,
                kvp.REMOTE_REQUEST_ID: "r",
                kvp.REMOTE_BLOCK_IDS: [0],
            }
        )
        with pytest.raises(bench.BenchError, match="fingerprint"):
            puller.pull(remote, 32)
    finally:
        puller.close()
        server.stop()


# -- the whole run, against fake engines -------------------------------------------------------


class FakeEngines:
    """HTTP stand-ins for the two engines around the real block server (no vLLM).

    The prefill holds each handoff's blocks (plus one spare, as vLLM may) and registers the
    hold a little after it answers, like the engine step after the prefill does; plain
    completions are the background load. The decode pulls like the connector and serves
    /metrics with ``recomputed`` recomputes.
    """

    recomputed = 0

    def __init__(self, secret: str) -> None:
        import torch

        from kv_transfer.block_server import BlockServer, ServerSettings
        from kv_transfer.device import KVCacheAccess
        from kv_transfer.leases import LeaseTable

        self.geometry = bench.ModelGeometry.from_config(TINY_CONFIG)
        fingerprint = self.geometry.fingerprint("tiny", "float32", 32)
        layers = [torch.zeros((64, *fingerprint.block_shape)) for _ in range(2)]
        self.secret = secret
        self.leases = LeaseTable()
        self.block_server = BlockServer(
            ServerSettings(host="127.0.0.1", port=0, secret=secret.encode()),
            fingerprint,
            KVCacheAccess(layers),
            self.leases,
            engine_id="fake-prefill",
        )
        self.block_server.start()
        self.puller = bench.Puller(secret, fingerprint, self.geometry.block_bytes("float32", 32))
        self.handoffs = 0
        self.loads = 0
        self.pulled = 0
        self.lock = threading.Lock()
        self.servers: list[Any] = []

    def prefill(self, body: dict[str, Any]) -> dict[str, Any]:
        from kv_transfer import params as kvp

        if kvp.FIELD not in body:
            time.sleep(0.01)  # one "full prefill"
            with self.lock:
                self.loads += 1
            return {"choices": [{"text": "x"}]}
        assert body[kvp.FIELD] == kvp.prefill_leg_params() and body["max_tokens"] == 1
        with self.lock:
            self.handoffs += 1
            request_id = f"req-{self.handoffs}"
        count = -(-len(body["prompt"]) // 32) + 1
        blocks = [(self.handoffs * 5 + i) % 64 for i in range(count)]
        threading.Timer(0.005, self.leases.add, (request_id, blocks, time.time() + 30)).start()
        params = {
            kvp.DO_REMOTE_PREFILL: True,
            kvp.REMOTE_HOST: "127.0.0.1",
            kvp.REMOTE_PORT: self.block_server.port,
            kvp.REMOTE_REQUEST_ID: request_id,
            kvp.REMOTE_BLOCK_IDS: blocks,
            kvp.REMOTE_NUM_TOKENS: len(body["prompt"]),
            kvp.HOLD_TOKEN: kvp.hold_token(self.secret.encode(), "fake-prefill", request_id),
        }
        return {"choices": [{"text": "x"}], kvp.FIELD: params}

    def decode(self, body: dict[str, Any]) -> dict[str, Any]:
        from kv_transfer import params as kvp

        remote = kvp.RemotePrefill.parse(body[kvp.FIELD])
        with self.lock:
            self.puller.pull(remote, 32)
            self.pulled += 1
        return {"choices": [{"text": "x"}], kvp.FIELD: {kvp.OUTCOME: "transferred"}}

    def decode_metrics(self) -> str:
        return (
            "# TYPE pdserve_kv_transfer_seconds histogram\n"
            f'pdserve_kv_transfer_seconds_bucket{{le="+Inf"}} {self.pulled}\n'
            f"pdserve_kv_transfer_seconds_count {self.pulled}\n"
            "pdserve_kv_transfer_seconds_sum 0.01\n"
            "# TYPE pdserve_kv_transfer_failures_total counter\n"
            "pdserve_kv_transfer_failures_total 0\n"
            "# TYPE pdserve_kv_recomputed_requests_total counter\n"
            f'pdserve_kv_recomputed_requests_total{{reason="pull_failed"}} {self.recomputed}\n'
        )

    def serve(self, role: str) -> str:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        engines = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, data: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = engines.prefill(body) if role == "prefill" else engines.decode(body)
                self._send(json.dumps(answer).encode(), "application/json")

            def do_GET(self) -> None:
                text = engines.decode_metrics() if role == "decode" else ""
                self._send(text.encode(), "text/plain")

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
        self.puller.close()
        self.block_server.stop()


@pytest.fixture
def fake_engines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[FakeEngines]]:
    """Engine start-up patched to FakeEngines; yields the list they land in."""
    from benchmarks.pd_vs_aggregated import Started

    made: list[FakeEngines] = []

    def start_engine(processes: Any, role: str, core: str, settings: Any) -> Any:
        assert settings.block_size == 32 and settings.dtype == "float32"
        if not made:
            made.append(FakeEngines(settings.secret))
        url = made[0].serve(role)
        # A real process group for ProcessSet to stop.
        sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
        return processes.add(Started(role, url, sleeper, tmp_path / f"{role}.log"))

    def wait_engine(started: Any, timeout_s: float) -> None:
        started.ready_s = 0.0

    def prompt_token_ids(model: Path, lengths: Any) -> dict[int, list[int]]:
        return {n: [10 + i % 500 for i in range(n)] for n in lengths}

    monkeypatch.setattr(bench, "start_engine", start_engine)
    monkeypatch.setattr(bench, "wait_engine", wait_engine)
    monkeypatch.setattr(bench, "prompt_token_ids", prompt_token_ids)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    yield made
    for engines in made:
        engines.close()


def _run_fake(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    model = tmp_path / "model"
    out_dir = tmp_path / "out"
    argv = ["--model", str(model), "--out-dir", str(out_dir), "--log-dir", str(tmp_path / "logs")]
    argv += ["--pulls", "6", "--decode-requests", "3", "--warmup", "1", "--load-tokens", "256"]
    status = bench.main([*argv, *extra])
    report_file = out_dir / bench.JSON_NAME
    return status, json.loads(report_file.read_text()) if report_file.exists() else {}


def test_full_run_against_fake_engines(
    fake_engines: list[FakeEngines], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = _run_fake(tmp_path)
    out, err = capsys.readouterr()
    assert status == 0, out + err
    engines = fake_engines[0]
    # warm-up 1 + idle 6 + computing 6 pulled here, 3 more through the decode.
    assert engines.handoffs == 16 and engines.pulled == 3
    assert engines.loads > 0
    assert len(engines.leases) == 0  # every hold released by its pull
    for phase in bench.PHASES:
        row = report["phases"][phase]
        assert row["pulls"] == 6 and row["errors"] == 0
        assert 0 < row["wait_p50_ms"] <= row["pull_p50_ms"]
        # 4 blocks (128 tokens) of the 5 held, 2 layers x 16 KiB each.
        assert row["bytes_per_pull"] == 4 * 2 * 2 * 32 * 64 * 4
    assert report["load"]["requests"] > 0 and report["load"]["errors"] == 0
    decode = report["decode"]
    assert decode["ok"] == 3 and decode["outcomes"] == {"transferred": 3}
    assert decode["recompute_count"] == 0 and decode["transfers"] == 3
    assert report["leftover_processes"] == [] and report["problems"] == []
    assert "recompute count 0" in out
    assert f"wrote {tmp_path / 'out' / bench.JSON_NAME}" in out


def test_a_recompute_fails_the_run(
    fake_engines: list[FakeEngines],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(FakeEngines, "recomputed", 2)
    status, report = _run_fake(tmp_path)
    err = capsys.readouterr().err
    assert status == 1
    assert report["decode"]["recompute_count"] == 2
    assert report["problems"] == [
        "recompute count 2, must be 0: recomputed requests 2, failed pulls 0"
    ]
    assert "kv_pull_wait: recompute count 2, must be 0" in err
    assert "logs kept in" in err


# -- real engines -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_against_real_engines(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    argv = [
        sys.executable, "-m", "benchmarks.kv_pull_wait", "--quick",
        "--out-dir", str(out_dir), "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    completed = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=560, check=False
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "wait p50 ms" in completed.stdout
    report = json.loads((out_dir / bench.JSON_NAME).read_text())
    assert report["benchmark"] == "kv_pull_wait"
    for phase in bench.PHASES:
        row = report["phases"][phase]
        assert row["pulls"] == 10 and row["errors"] == 0, row
        assert row["wait_p50_ms"] > 0 and row["pull_p50_ms"] >= row["wait_p50_ms"]
        assert row["bytes_per_pull"] > 0
    assert report["load"]["requests"] > 0 and report["load"]["errors"] == 0
    decode = report["decode"]
    assert decode["ok"] == 5 and decode["errors"] == 0
    assert decode["recompute_count"] == 0
    assert decode["outcomes"].get("recomputed", 0) == 0
    assert report["leftover_processes"] == []
    assert report["problems"] == []


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
