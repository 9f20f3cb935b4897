"""The PD benchmark's workload generator, goodput arithmetic and vllm bench command line."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import pytest

from benchmarks import goodput as gp
from benchmarks import workload as wl
from benchmarks.vllm_bench import ServeRun

# -- workload ---------------------------------------------------------------------------------


def test_same_seed_same_requests_other_seed_other_requests() -> None:
    spec = wl.WorkloadSpec(num_requests=300, seed=7)
    assert wl.generate(spec) == wl.generate(spec)
    assert wl.generate(spec) != wl.generate(wl.WorkloadSpec(num_requests=300, seed=8))


def test_lengths_follow_the_scaled_trace_medians_and_bounds() -> None:
    spec = wl.WorkloadSpec(num_requests=4000, seed=1)
    requests = wl.generate(spec)
    prompts = [r.prompt_tokens for r in requests]
    outputs = [r.output_tokens for r in requests]
    # Log-normal medians are the trace's (1020 and 129 tokens) divided by the scale.
    assert statistics.median(prompts) == pytest.approx(1020 / 4, rel=0.06)
    assert statistics.median(outputs) == pytest.approx(129 / 4, rel=0.06)
    # A heavy right tail: the mean sits above the median, as in the trace.
    assert statistics.mean(prompts) > statistics.median(prompts) * 1.15
    assert min(prompts) >= spec.min_prompt_tokens and max(prompts) <= spec.max_prompt_tokens
    assert min(outputs) >= spec.min_output_tokens and max(outputs) <= spec.max_output_tokens
    # The log of the lengths has the spread asked for (clipping trims it a little).
    logs = [math.log(p) for p in prompts]
    assert statistics.stdev(logs) == pytest.approx(spec.prompt_sigma, rel=0.1)


def test_shared_prefix_fraction_and_never_a_whole_prompt() -> None:
    spec = wl.WorkloadSpec(num_requests=2000, seed=3, shared_prefix_fraction=0.3)
    requests = wl.generate(spec)
    shared = [r for r in requests if r.shared_prefix_tokens]
    # Prompts no longer than the prefix cannot share it; of the others, the fraction asked.
    long_enough = [r for r in requests if r.prompt_tokens > spec.shared_prefix_tokens]
    assert len(shared) / len(long_enough) == pytest.approx(0.3, abs=0.04)
    assert all(r.shared_prefix_tokens == spec.shared_prefix_tokens for r in shared)
    assert all(r.prompt_tokens > r.shared_prefix_tokens for r in shared)
    # The fraction does not change the lengths drawn.
    other = wl.generate(wl.WorkloadSpec(num_requests=2000, seed=3, shared_prefix_fraction=0.0))
    assert [r.prompt_tokens for r in other] == [r.prompt_tokens for r in requests]
    info = wl.summary(requests)
    assert info["shared_prefix_request_fraction"] == len(shared) / len(requests)
    assert 0 < info["shared_prefix_token_fraction"] < info["shared_prefix_request_fraction"]


@pytest.mark.parametrize(
    "fields",
    [
        {"num_requests": 0},
        {"scale": 0},
        {"prompt_sigma": -1},
        {"min_prompt_tokens": 10, "max_prompt_tokens": 5},
        {"shared_prefix_fraction": 1.5},
    ],
)
def test_bad_specs_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(wl.WorkloadError):
        wl.WorkloadSpec(**fields)  # type: ignore[arg-type]


def test_lengths_jsonl_round_trip_and_errors(tmp_path: Path) -> None:
    requests = wl.generate(wl.WorkloadSpec(num_requests=20, seed=2, shared_prefix_fraction=1.0))
    path = tmp_path / "lengths.jsonl"
    wl.write_lengths_jsonl(path, requests)
    again = wl.read_lengths_jsonl(path, shared_prefix_tokens=128)
    assert [(r.prompt_tokens, r.output_tokens) for r in again] == [
        (r.prompt_tokens, r.output_tokens) for r in requests
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_tokens": 10, "output_tokens": 2}\n{"prompt_tokens": "x"}\n')
    with pytest.raises(wl.WorkloadError, match=r"bad.jsonl:2"):
        wl.read_lengths_jsonl(bad)
    bad.write_text('{"prompt_tokens": 0, "output_tokens": 2}\n')
    with pytest.raises(wl.WorkloadError, match=">= 1"):
        wl.read_lengths_jsonl(bad)
    with pytest.raises(wl.WorkloadError, match="cannot read"):
        wl.read_lengths_jsonl(tmp_path / "missing.jsonl")


def test_workload_flags_build_the_spec(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    wl.add_workload_arguments(parser)
    spec, requests = wl.workload_from_args(parser.parse_args(["--num-prompts", "5", "--seed", "9"]))
    assert spec.num_requests == 5 and spec.seed == 9 and len(requests) == 5
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"prompt_tokens": 50 + i, "output_tokens": 3}) + "\n"
                            for i in range(8)))  # fmt: skip
    _, mine = wl.workload_from_args(
        parser.parse_args(["--num-prompts", "6", "--workload-jsonl", str(path)])
    )
    assert [r.prompt_tokens for r in mine] == [50, 51, 52, 53, 54, 55]


def test_prompts_have_exact_token_counts_and_share_the_prefix(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    words = wl.single_token_words(
        encode, lambda ids: str(tokenizer.decode(ids)), range(len(tokenizer))
    )
    assert len(words) > 50
    requests = wl.generate(wl.WorkloadSpec(num_requests=40, seed=4, shared_prefix_fraction=0.5))
    first = wl.render_prompts(requests, words, seed=1, encode=encode, special_tokens=1)
    second = wl.render_prompts(requests, words, seed=2, encode=encode, special_tokens=1,
                               prefix_seed=1)  # fmt: skip
    for request, text in zip(requests, first, strict=True):
        # What vLLM counts: the text's tokens plus the BOS the server adds.
        assert len(tokenizer(text).input_ids) == request.prompt_tokens
    shared = [i for i, r in enumerate(requests) if r.shared_prefix_tokens]
    prefixes = {tuple(encode(first[i])[: requests[i].shared_prefix_tokens - 1]) for i in shared}
    assert len(prefixes) == 1
    # Another seed: other text after the prefix, the same prefix (no cross-run cache hits
    # beyond the shared system prompt).
    assert first != second
    for i in shared:
        n = requests[i].shared_prefix_tokens - 1
        assert encode(first[i])[:n] == encode(second[i])[:n]
    path = Path(tiny_model.parent / "custom.jsonl")
    wl.write_vllm_custom_jsonl(path, first, requests)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["output_tokens"] for line in lines] == [r.output_tokens for r in requests]


def test_too_few_one_token_words_is_an_error() -> None:
    requests = [wl.WorkloadRequest(10, 2)]
    with pytest.raises(wl.WorkloadError, match="one-token words"):
        wl.render_prompts(requests, [" a", " b"], seed=0, encode=lambda t: [1], special_tokens=0)


# -- goodput ----------------------------------------------------------------------------------


def _result(ttfts: list[float], latencies: list[float], lens: list[int], errors: list[str]) -> dict:
    return {"ttfts": ttfts, "latencies": latencies, "output_lens": lens, "errors": errors}


def test_outcomes_and_attainment_follow_vllms_rule() -> None:
    result = _result(
        ttfts=[0.1, 0.5, 0.1, 0.1, 0.0],
        latencies=[1.1, 1.0, 3.1, 0.2, 0.0],
        lens=[11, 11, 11, 1, 0],
        errors=["", "", "", "", "connection reset"],
    )
    outcomes = gp.outcomes_from_vllm(result)
    assert [o.tpot_s for o in outcomes] == pytest.approx([0.1, 0.05, 0.3, 0.0, 0.0])
    assert [o.ok for o in outcomes] == [True, True, True, True, False]
    # TTFT <= 200 ms and TPOT <= 100 ms: requests 0 and 3 (the one-token answer has TPOT 0).
    assert gp.attainment(outcomes, 0.2, 0.1) == pytest.approx(2 / 5)
    assert gp.attainment(outcomes, 1.0, 1.0) == pytest.approx(4 / 5)  # the failure never meets
    assert gp.attainment([], 1.0, 1.0) == 0.0


def test_outcomes_need_detailed_results() -> None:
    with pytest.raises(ValueError, match="save-detailed"):
        gp.outcomes_from_vllm({"ttfts": []})


def test_goodput_is_the_highest_rate_meeting_the_target() -> None:
    points = [(0.5, 1.0), (1.0, 0.95), (1.5, 0.9), (2.0, 0.6), (3.0, 0.1)]
    assert gp.goodput(points) == 1.5
    assert gp.goodput(points, target=0.96) == 0.5
    assert gp.goodput([(1.0, 0.5)]) == 0.0
    assert gp.ratio(3.0, 1.5) == 2.0
    assert gp.ratio(1.0, 0.0) is None


# -- vllm bench serve -------------------------------------------------------------------------


def test_serve_run_is_a_valid_vllm_bench_serve_command_line(tmp_path: Path) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    run = ServeRun(
        base_url="http://127.0.0.1:8000", served_model_name="m", tokenizer=tmp_path,
        dataset_jsonl=tmp_path / "w.jsonl", num_prompts=30, request_rate=1.5, seed=3,
        result_dir=tmp_path / "r", result_filename="x.json", ttft_slo_ms=2000, tpot_slo_ms=60,
    )  # fmt: skip
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(run.argv())
    assert args.dataset_name == "custom" and args.skip_chat_template
    assert args.request_rate == 1.5 and args.burstiness == 1.0 and args.num_prompts == 30
    assert args.goodput == ["ttft:2000", "tpot:60"]
    assert args.ignore_eos and args.temperature == 0 and args.save_detailed
    assert args.custom_output_len == -1 and args.seed == 3
    assert args.disable_shuffle  # results in file order, lined up with the workload
    assert run.command().startswith("vllm bench serve --backend vllm ")
    infinite = ServeRun(**{**run.__dict__, "request_rate": math.inf})
    assert parser.parse_args(infinite.argv()).request_rate == math.inf
