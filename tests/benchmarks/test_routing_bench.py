"""Tests of ``benchmarks.routing`` (``pdserve bench routing``).

Fast: argument checks, the proxy config each variant gets, the counters' figures, the
table and plot, the proxy's CPU time. Slow (real vLLM engines): the ``--quick`` run end to
end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from benchmarks import routing as bench
from benchmarks.cli import BENCHMARKS
from benchmarks.pd_vs_aggregated import Started
from deploy.cli import CliError
from deploy.worker_launch import WorkerSpec
from proxy.config import load_proxy_config
from tests.benchmarks.test_pd_vs_aggregated import _members, _sessions_mentioning

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    bench.apply_quick(args)
    bench.apply_defaults(args)
    return args


# -- command line -----------------------------------------------------------------------------


def test_registered_as_pdserve_bench_routing() -> None:
    assert BENCHMARKS["routing"][0] == "benchmarks.routing"


def test_defaults_and_quick() -> None:
    args = _args()
    assert args.preset == "small" and args.model is None and args.cores == (0, 1)
    assert args.num_prompts % args.num_prefixes == 0
    assert args.variants[:3] == ["kv_cache", "prefix_affinity", "least_load"]
    assert args.bypass_max_uncached_tokens == args.suffix_len + args.block_size
    assert args.out == Path("benchmarks/results/routing/routing.json")
    assert not args.setups_together and _args("--setups-together").setups_together
    quick = _args("--quick")
    assert quick.preset == "tiny" and quick.num_prompts == 6 and quick.num_prefixes == 2
    settings = bench.engine_settings(quick, Path("m"))
    assert settings.max_model_len % settings.block_size == 0
    assert settings.max_model_len >= quick.prefix_len + quick.suffix_len + quick.output_len


def test_bypass_variant_follows_the_proxy_config() -> None:
    from proxy.config import ProxyConfig

    has_bypass = "prefill_bypass" in ProxyConfig.model_fields
    assert ("kv_cache+bypass" in _args().variants) == has_bypass
    assert all(v.available for v in bench.VARIANTS if not v.bypass)


@pytest.mark.parametrize(
    "argv",
    [["--rate", "0"], ["--num-prompts", "0"], ["--variants", "nope"], ["--cores", "1,1"]],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_inconsistent_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="multiple of --num-prefixes"):
        bench.check_args(_args("--num-prompts", "10", "--num-prefixes", "4"))
    with pytest.raises(CliError, match="not a HF model directory"):
        bench.check_args(_args("--model", str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    with pytest.raises(CliError, match="max_position_embeddings 512"):
        bench.check_args(_args("--model", str(tmp_path)))
    with pytest.raises(CliError, match="not available"):
        bench.check_args(_args("--cores", "0,4096"))
    bench.check_args(_args("--model", str(tmp_path), "--prefix-len", "256"))


def test_runs_cover_every_setup_and_variant() -> None:
    setups = bench.build_setups((0, 1))
    pd, agg = setups
    assert [(e.name, e.role, e.core) for e in pd.engines] == [
        ("prefill-0", "prefill", "0"), ("decode-0", "decode", "0"),
        ("prefill-1", "prefill", "1"), ("decode-1", "decode", "1"),
    ]  # fmt: skip
    assert [(e.role, e.core) for e in agg.engines] == [("aggregated", "0"), ("aggregated", "1")]
    pairs = [(s.name, v.name) for s, v in bench.runs_of(setups, bench.VARIANTS)]
    assert len(pairs) == 4 * 2 + 1  # kv_cache-lw1: the policy's old default, for comparison
    assert ("2agg", "kv_cache-lw1") in pairs
    assert ("2agg", "kv_cache+bypass") not in pairs and ("2P2D", "kv_cache+bypass") in pairs


def test_dataset_is_vllms_prefix_repetition() -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from benchmarks.vllm_bench import ServeRun

    args = _args("--quick")
    run = ServeRun(
        base_url="http://127.0.0.1:1", served_model_name="m", tokenizer=Path("m"),
        dataset_jsonl=None, dataset_argv=bench.dataset_argv(args), num_prompts=6,
        request_rate=2.0, seed=0, result_dir=Path("r"), result_filename="x.json",
        ttft_slo_ms=2000, tpot_slo_ms=50,
    )  # fmt: skip
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    parsed = parser.parse_args(run.argv())
    assert parsed.dataset_name == "prefix_repetition" and parsed.dataset_path is None
    assert (parsed.prefix_repetition_prefix_len, parsed.prefix_repetition_suffix_len) == (256, 32)
    assert parsed.prefix_repetition_num_prefixes == 2
    assert parsed.prefix_repetition_output_len == 8 and parsed.ignore_eos
    assert not parsed.disable_shuffle  # the prefixes' prompts interleave


# -- the proxy's config -----------------------------------------------------------------------


def _engines(setup: Any, tmp_path: Path) -> list[Started]:
    engines = []
    for i, role in enumerate(setup.engines):
        spec = WorkerSpec(
            role=role.role, model=tmp_path, api_port=9000 + i, kv_events=True,
            kv_events_port=16000 + i, kv_events_replay_port=17000 + i,
        )  # fmt: skip
        engines.append(Started(role.name, spec.url, None, Path("/dev/null"), spec=spec))  # type: ignore[arg-type]
    return engines


@pytest.mark.parametrize("variant", bench.VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("setup_index", [0, 1])
def test_each_variant_gets_a_valid_proxy_config(
    variant: bench.Variant, setup_index: int, tmp_path: Path
) -> None:
    setup = bench.build_setups((0, 1))[setup_index]
    if variant.pd_only and not setup.prefill:
        pytest.skip("not measured")
    config = bench.proxy_config(setup, _engines(setup, tmp_path), variant, tmp_path, 256)
    path = tmp_path / "proxy.yaml"
    path.write_text(bench.proxy_config_text(config))
    if variant.bypass and not variant.available:
        with pytest.raises(ValueError, match="prefill_bypass"):
            load_proxy_config(path)
        return
    loaded = load_proxy_config(path)  # what `pdserve proxy --config` reads
    assert loaded.decode_policy.name == variant.policy
    assert loaded.admin.port is None
    assert len(loaded.decode) == 2 and len(loaded.prefill) == (2 if setup.prefill else 0)
    if setup.prefill:
        assert loaded.prefill_policy.name == variant.policy
    entries = [*loaded.prefill, *loaded.decode]
    if variant.tokenizes:
        assert loaded.routing_tokenizer is not None
        assert loaded.routing_tokenizer.model_dir == tmp_path
        events = [e.kv_events for e in entries if not isinstance(e, str)]
        assert len(events) == len(entries) and all(e and e["endpoint"] for e in events)
        assert len({e["endpoint"] for e in events if e}) == len(entries)
    else:
        # Neither tokenizer nor KV-event subscription: the cost kv_cache is compared with.
        assert loaded.routing_tokenizer is None
        assert all(isinstance(e, str) or e.kv_events is None for e in entries)
    if variant.bypass:
        assert config["prefill_bypass"] == {"max_uncached_tokens": 256}


# -- counters, table and plot -----------------------------------------------------------------


def _engine(queries: float, hits: float, computed: float) -> dict[str, float]:
    return {
        "prefix_cache_queries": queries, "prefix_cache_hits": hits,
        "prompt_tokens": queries, "computed_tokens": computed,
    }  # fmt: skip


def test_figures_from_counter_deltas() -> None:
    pd, agg = bench.build_setups((0, 1))
    engines = {
        "prefill-0": _engine(1000, 600, 400), "prefill-1": _engine(1000, 200, 800),
        # A decode engine queries its cache for every prompt it then pulls: not prefill work.
        "decode-0": _engine(1000, 0, 2), "decode-1": _engine(1000, 0, 2),
    }  # fmt: skip
    proxy = {"disaggregated": 9.0, "aggregated": 0.0, "cache_bypass": 1.0, "tokenize_s": 0.02}
    figures = bench.summarise_counters(pd, engines, proxy, 10, 0.005, input_tokens=2000)
    assert figures["hit_rate"] == pytest.approx(1 - 1204 / 2000)
    assert figures["hit_rate_by_pool"] == {"prefill": pytest.approx(0.4), "decode": 0.0}
    assert figures["prefill_tokens_computed"] == 1204
    assert figures["uncached_prompt_tokens"] == 1200 and figures["prompt_tokens"] == 2000
    assert figures["paths"] == {"disaggregated": 9.0, "cache_bypass": 1.0}
    assert figures["proxy_cpu_us_per_request"] == pytest.approx(500.0)
    assert figures["tokenize_ms_per_request"] == pytest.approx(2.0)
    idle = {"aggregated-0": _engine(0, 0, 0), "aggregated-1": _engine(0, 0, 0)}
    figures = bench.summarise_counters(agg, idle, {}, 0, 0.0, input_tokens=0)
    assert figures["hit_rate"] is None and figures["paths"] == {}


def _run(setup: str, variant: str, hit: float | None) -> dict[str, Any]:
    return {
        "setup": setup, "variant": variant, "completed": 6, "failed": 0, "num_prompts": 6,
        "ttft_ms": {"p50": 120.0, "p90": 480.0, "p99": 600.0}, "prefill_tokens_computed": 900.0,
        "hit_rate": hit, "proxy_cpu_us_per_request": 850.0, "tokenize_ms_per_request": 0.5,
        "paths": {"disaggregated": 6.0} if setup == "2P2D" else {"aggregated": 6.0},
    }  # fmt: skip


def test_table_and_plot(tmp_path: Path) -> None:
    report = {
        "config": {
            "model": "generated tiny preset", "rate": 2.0, "skipped_variants": ["x"],
            "workload": {"num_prompts": 6, "num_prefixes": 2, "prefix_len": 256,
                         "suffix_len": 32, "output_len": 8},
        },
        "indicative": True,
        "runs": [_run("2P2D", "kv_cache", 0.5), _run("2agg", "least_load", None)],
    }  # fmt: skip
    table = bench.format_table(report)
    lines = table.splitlines()
    assert "2 shared prefixes of 256 tokens" in lines[0]
    row = next(line for line in lines if line.startswith("2P2D"))
    assert row.split()[:9] == ["2P2D", "kv_cache", "6", "0", "120", "480", "900", "50%", "850"]
    assert row.endswith("disaggregated 6")
    assert next(line for line in lines if line.startswith("2agg")).split()[7] == "-"
    assert "not measured: x" in table and "indicative only" in table
    assert bench.plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_process_cpu_time_is_read_from_proc() -> None:
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    times = os.times()
    assert bench.process_cpu_s(os.getpid()) == pytest.approx(times.user + times.system, abs=0.05)


async def test_counters_are_read_from_metrics() -> None:
    text = (
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 750.0\n'
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0\n'
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 250\n'
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 7\n'
        'pdserve_requests_total{endpoint="c",model="m",path="disaggregated",status="200"} 5.0\n'
        'pdserve_requests_total{endpoint="c",model="m",path="cache_bypass",status="200"} 2.0\n'
        "pdserve_routing_tokenize_seconds_sum 0.25\n"
    )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    started = Started("x", url, None, Path("/dev/null"))  # type: ignore[arg-type]
    try:
        engine = await asyncio.to_thread(bench.read_engine_counters, started)
        proxy = await asyncio.to_thread(bench.read_proxy_counters, started)
    finally:
        await runner.cleanup()
    assert engine == {
        "prefix_cache_queries": 1000.0, "prefix_cache_hits": 750.0,
        "prompt_tokens": 1000.0, "computed_tokens": 250.0,
    }  # fmt: skip
    assert proxy["disaggregated"] == 5.0 and proxy["cache_bypass"] == 2.0
    assert proxy["aggregated"] == 0.0 and proxy["tokenize_s"] == 0.25


# -- a real run -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quick_real_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "routing.json"
    log_dir = tmp_path / "logs"
    argv = [sys.executable, "-m", "benchmarks.routing", "--quick"]
    argv += ["--log-dir", str(log_dir), "--out", str(out)]
    process = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    sessions: set[int] = set()
    while process.poll() is None:
        sessions |= _sessions_mentioning(str(log_dir), exclude=process.pid)
        time.sleep(0.5)
    stdout, stderr = process.communicate()
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert len(sessions) >= 7  # six engines and a proxy at least
    assert _members(sessions) == []
    report = json.loads(out.read_text())
    assert report["benchmark"] == "routing" and report["leftover_processes"] == []
    assert out.with_suffix(".png").is_file()
    runs = {(run["setup"], run["variant"]): run for run in report["runs"]}
    expected = {
        (setup.name, variant.name)
        for setup, variant in bench.runs_of(
            bench.build_setups((0, 1)),
            # --quick runs the policies as shipped, not the re-weighted comparison.
            [v for v in bench.VARIANTS if v.available and not v.options],
        )
    }
    assert set(runs) == expected
    for run in runs.values():
        assert run["completed"] == run["num_prompts"] == 6 and run["failed"] == 0, run
        assert run["ttft_ms"]["p50"] > 0 and run["command"].startswith("vllm bench serve ")
        assert "--dataset-name prefix_repetition" in run["command"]
        assert sum(run["paths"].values()) == 6, run["paths"]
        assert run["prefill_tokens_computed"] > 0 and run["proxy_cpu_us_per_request"] > 0
    for setup in ("2P2D", "2agg"):
        kv_cache = runs[(setup, "kv_cache")]
        assert kv_cache["hit_rate"] is not None and kv_cache["hit_rate"] > 0, kv_cache
        assert kv_cache["tokenize_ms_per_request"] > 0
        assert kv_cache["kv_event_batches"] > 0  # the index followed the engines
        assert runs[(setup, "least_load")]["tokenize_ms_per_request"] == 0
    assert runs[("2P2D", "kv_cache")]["paths"].get("disaggregated", 0) > 0
    assert runs[("2agg", "kv_cache")]["paths"] == {"aggregated": 6.0}
    assert "2P2D  kv_cache" in stdout
