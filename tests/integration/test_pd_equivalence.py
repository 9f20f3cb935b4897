"""1P1D through the real proxy is token-identical to one aggregated vLLM engine.

Every request is greedy (temperature 0) on the tiny model. Each test also checks, on the decode
worker's transfer counter, that the KV really crossed the connector and that exactly the blocks
the decode instance lacked were pulled, so a proxy that quietly fell back to local prefill (which
would also produce identical tokens) fails here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from engine_support import PDDeployment, block_bytes, blocks_to_pull
from pd_support import (
    Generation,
    acomplete,
    assert_same_generation,
    chat,
    complete,
    load_tokenizer,
    prompt_with_tokens,
    token_count,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BYTES = "pdserve_kv_transfer_bytes_total"
MAX_TOKENS = 24


@dataclass
class PulledBytes:
    """Measures what the decode worker pulled during a block of requests."""

    deployment: PDDeployment
    before: float = 0.0

    def __enter__(self) -> PulledBytes:
        self.before = self.deployment.decode.counter(BYTES)
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def expect_blocks(self, blocks: int) -> None:
        per_block = block_bytes(self.deployment.model_dir, self.deployment.block_size)
        expected = self.before + blocks * per_block
        got = self.deployment.decode.wait_for_counter(BYTES, expected)
        assert got == expected, (
            f"decode pulled {(got - self.before) / per_block:.2f} blocks, expected {blocks}"
        )


PROMPT_CASES = {
    # name: prompt tokens as a function of the block size (BOS included)
    "inside_first_block": lambda bs: bs // 2 + 3,
    "on_block_boundary": lambda bs: 2 * bs,
    "one_past_boundary": lambda bs: 2 * bs + 1,
    "spans_eight_blocks": lambda bs: 8 * bs + 11,
}


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_prompt_lengths_match_aggregated(real_pd: PDDeployment, case: str) -> None:
    tokenizer = load_tokenizer(real_pd.model_dir)
    n_tokens = PROMPT_CASES[case](real_pd.block_size)
    prompt = prompt_with_tokens(tokenizer, n_tokens, seed=list(PROMPT_CASES).index(case) + 1)
    assert token_count(tokenizer, prompt) == n_tokens

    reference = complete(real_pd.aggregated.url, prompt, max_tokens=MAX_TOKENS)
    assert reference.prompt_tokens == n_tokens  # the engine counts what the tokenizer counts
    transferred_before = _handoffs(real_pd, "transferred")
    with PulledBytes(real_pd) as pulled:
        result = complete(real_pd.proxy.url, prompt, max_tokens=MAX_TOKENS)
        pulled.expect_blocks(blocks_to_pull(n_tokens, real_pd.block_size))
    assert result.prompt_tokens == n_tokens
    assert_same_generation(result, reference)
    # The proxy read the real decode worker's own word that the KV was transferred.
    assert _handoffs(real_pd, "transferred") == transferred_before + 1


def _handoffs(real_pd: PDDeployment, outcome: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(real_pd.proxy.metrics_text()):
        for sample in family.samples:
            if sample.name == "pdserve_kv_handoffs_total" and sample.labels["outcome"] == outcome:
                return sample.value
    return 0.0


def test_streaming_completion_matches(real_pd: PDDeployment) -> None:
    tokenizer = load_tokenizer(real_pd.model_dir)
    n_tokens = 3 * real_pd.block_size + 7
    prompt = prompt_with_tokens(tokenizer, n_tokens, seed=101)
    reference = complete(real_pd.aggregated.url, prompt, max_tokens=MAX_TOKENS)
    with PulledBytes(real_pd) as pulled:
        streamed = complete(real_pd.proxy.url, prompt, max_tokens=MAX_TOKENS, stream=True)
        pulled.expect_blocks(blocks_to_pull(n_tokens, real_pd.block_size))
    assert streamed.prompt_tokens == n_tokens  # include_usage passes through
    assert_same_generation(streamed, reference)


@pytest.mark.parametrize("stream", [False, True], ids=["non_stream", "stream"])
def test_chat_matches(real_pd: PDDeployment, stream: bool) -> None:
    tokenizer = load_tokenizer(real_pd.model_dir)
    question = prompt_with_tokens(tokenizer, 90, seed=202 + int(stream))
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": question},
    ]
    reference = chat(real_pd.aggregated.url, messages, max_tokens=MAX_TOKENS)
    assert reference.prompt_tokens is not None
    with PulledBytes(real_pd) as pulled:
        result = chat(real_pd.proxy.url, messages, max_tokens=MAX_TOKENS, stream=stream)
        pulled.expect_blocks(blocks_to_pull(reference.prompt_tokens, real_pd.block_size))
    assert_same_generation(result, reference)


def test_sixteen_concurrent_requests(real_pd: PDDeployment) -> None:
    tokenizer = load_tokenizer(real_pd.model_dir)
    bs = real_pd.block_size
    lengths = [bs // 4 + i * (bs // 2 + 5) for i in range(16)]  # 9 .. ~600 tokens
    prompts = [prompt_with_tokens(tokenizer, n, seed=300 + i) for i, n in enumerate(lengths)]

    async def run_all(base_url: str, streams: list[bool]) -> list[Generation]:
        return list(
            await asyncio.gather(
                *(
                    acomplete(base_url, prompt, max_tokens=MAX_TOKENS, stream=stream)
                    for prompt, stream in zip(prompts, streams, strict=True)
                )
            )
        )

    references = asyncio.run(run_all(real_pd.aggregated.url, [False] * 16))
    with PulledBytes(real_pd) as pulled:
        results = asyncio.run(run_all(real_pd.proxy.url, [i % 2 == 1 for i in range(16)]))
        pulled.expect_blocks(sum(blocks_to_pull(n, bs) for n in lengths))
    for index, (result, reference) in enumerate(zip(results, references, strict=True)):
        assert result.token_ids == reference.token_ids, f"request {index} differs"
        assert result.text == reference.text, f"request {index} differs"


def test_repeated_prompt_with_prefix_caching(real_pd: PDDeployment) -> None:
    """The second time, P and D both hit their prefix caches; D pulls only the last block."""
    tokenizer = load_tokenizer(real_pd.model_dir)
    bs = real_pd.block_size
    n_tokens = 5 * bs + 9
    prompt = prompt_with_tokens(tokenizer, n_tokens, seed=404)
    reference = complete(real_pd.aggregated.url, prompt, max_tokens=MAX_TOKENS)
    hits_before = real_pd.decode.counter("vllm:prefix_cache_hits_total")
    with PulledBytes(real_pd) as pulled:
        first = complete(real_pd.proxy.url, prompt, max_tokens=MAX_TOKENS)
        pulled.expect_blocks(blocks_to_pull(n_tokens, bs))
    with PulledBytes(real_pd) as pulled:
        second = complete(real_pd.proxy.url, prompt, max_tokens=MAX_TOKENS, stream=True)
        # D cached the pulled blocks, so only the block holding the last prompt token is pulled.
        pulled.expect_blocks(blocks_to_pull(n_tokens, bs, cached_full_blocks=n_tokens // bs))
    assert_same_generation(first, reference)
    assert_same_generation(second, reference)
    hits = real_pd.decode.counter("vllm:prefix_cache_hits_total") - hits_before
    assert hits >= (n_tokens // bs) * bs, "decode did not reuse its prefix cache"


def test_decode_already_holds_part_of_the_prompt(real_pd: PDDeployment) -> None:
    """D computed a shared prefix itself; for the longer prompt it pulls only the rest."""
    tokenizer = load_tokenizer(real_pd.model_dir)
    bs = real_pd.block_size
    prefix_blocks = 6
    prefix = prompt_with_tokens(tokenizer, prefix_blocks * bs, seed=505)
    full_tokens = 9 * bs + 13
    prompt = prompt_with_tokens(tokenizer, full_tokens, seed=506, prefix=prefix)
    prefix_ids = tokenizer.encode(prefix).ids
    assert tokenizer.encode(prompt).ids[: len(prefix_ids)] == prefix_ids

    # Straight to the decode worker, no kv_transfer_params: it prefills locally and caches.
    with PulledBytes(real_pd) as pulled:
        complete(real_pd.decode.url, prefix, max_tokens=1)
        pulled.expect_blocks(0)
    reference = complete(real_pd.aggregated.url, prompt, max_tokens=MAX_TOKENS)
    with PulledBytes(real_pd) as pulled:
        result = complete(real_pd.proxy.url, prompt, max_tokens=MAX_TOKENS)
        pulled.expect_blocks(blocks_to_pull(full_tokens, bs, cached_full_blocks=prefix_blocks))
    assert_same_generation(result, reference)
