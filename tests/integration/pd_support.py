"""Helpers for the end-to-end PD tests: exact-length prompts, requests, transfer accounting."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

# Words the prompts are drawn from. Prompts of different tests use different random orders,
# so no two tests share a first KV block (each test sees cold caches on P and D).
_WORD_TEXT = """
river mountain orange window quiet engine garden silver market thunder pencil harbor violet
lantern meadow copper whisper castle rocket velvet island marble falcon ember canyon glacier
puzzle saddle tunnel walnut zephyr breeze cobalt dragon forest granite hollow jungle kettle
lemon mirror nectar oyster pepper quartz ribbon signal timber umbrella valley wagon yonder
zenith anchor basket candle desert feather goblet hammer igloo jacket kernel ladder magnet
needle orchard parrot quiver rattle sparrow
"""
WORDS = tuple(_WORD_TEXT.split())
FILLERS = (".", ",", "s", " a", " I", "e", ";", " o", "!", " x")


def load_tokenizer(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def token_count(tokenizer: Any, text: str) -> int:
    """Prompt tokens as vLLM counts them for /v1/completions (BOS included)."""
    return len(tokenizer.encode(text).ids)


def prompt_with_tokens(tokenizer: Any, n_tokens: int, seed: int, prefix: str = "") -> str:
    """A prompt of exactly ``n_tokens`` tokens (BOS included), starting with ``prefix``."""
    rng = random.Random(seed)
    text = prefix
    while True:
        words = rng.sample(WORDS, len(WORDS))
        extended = False
        for word in words:
            candidate = f"{text} {word}" if text else word
            count = token_count(tokenizer, candidate)
            if count == n_tokens:
                return candidate
            if count < n_tokens:
                text, extended = candidate, True
                break
        if extended:
            continue
        for filler in FILLERS:
            candidate = text + filler
            if token_count(tokenizer, candidate) == n_tokens:
                return candidate
        raise AssertionError(f"cannot build a prompt of {n_tokens} tokens from {text!r}")


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int | None


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)


def async_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=300
    )


def _extra(obj: Any, name: str) -> Any:
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


def _request_args(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "extra_body": {"return_token_ids": True},
    }


def complete(
    base_url: str, prompt: str, *, max_tokens: int = 16, stream: bool = False
) -> Generation:
    api = client(base_url)
    if not stream:
        response = api.completions.create(prompt=prompt, **_request_args(max_tokens))
        choice = response.choices[0]
        return Generation(
            token_ids=list(_extra(choice, "token_ids") or []),
            text=choice.text,
            finish_reason=choice.finish_reason,
            prompt_tokens=response.usage.prompt_tokens if response.usage else None,
        )
    ids: list[int] = []
    text, finish, prompt_tokens = "", None, None
    chunks = api.completions.create(
        prompt=prompt,
        stream=True,
        stream_options={"include_usage": True},
        **_request_args(max_tokens),
    )
    for chunk in chunks:
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
        for choice in chunk.choices:
            ids += list(_extra(choice, "token_ids") or [])
            text += choice.text
            finish = choice.finish_reason or finish
    return Generation(ids, text, finish, prompt_tokens)


async def acomplete(
    base_url: str, prompt: str, *, max_tokens: int = 16, stream: bool = False
) -> Generation:
    api = async_client(base_url)
    try:
        if not stream:
            response = await api.completions.create(prompt=prompt, **_request_args(max_tokens))
            choice = response.choices[0]
            return Generation(
                list(_extra(choice, "token_ids") or []),
                choice.text,
                choice.finish_reason,
                response.usage.prompt_tokens if response.usage else None,
            )
        ids: list[int] = []
        text, finish = "", None
        chunks = await api.completions.create(
            prompt=prompt, stream=True, **_request_args(max_tokens)
        )
        async for chunk in chunks:
            for choice in chunk.choices:
                ids += list(_extra(choice, "token_ids") or [])
                text += choice.text
                finish = choice.finish_reason or finish
        return Generation(ids, text, finish, None)
    finally:
        await api.close()


def chat(
    base_url: str, messages: list[dict[str, str]], *, max_tokens: int = 16, stream: bool = False
) -> Generation:
    api = client(base_url)
    if not stream:
        response = api.chat.completions.create(
            messages=messages,  # type: ignore[arg-type]
            **_request_args(max_tokens),
        )
        choice = response.choices[0]
        return Generation(
            list(_extra(choice, "token_ids") or []),
            choice.message.content or "",
            choice.finish_reason,
            response.usage.prompt_tokens if response.usage else None,
        )
    ids: list[int] = []
    text, finish = "", None
    chunks = api.chat.completions.create(
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        **_request_args(max_tokens),
    )
    for chunk in chunks:
        for choice in chunk.choices:
            ids += list(_extra(choice, "token_ids") or [])
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return Generation(ids, text, finish, None)


def assert_same_generation(pd: Generation, reference: Generation) -> None:
    assert reference.token_ids, "the reference engine returned no token ids"
    assert pd.token_ids == reference.token_ids, (
        f"PD tokens differ from the aggregated engine:\n PD:  {pd.token_ids}\n ref: "
        f"{reference.token_ids}"
    )
    assert pd.text == reference.text
    assert pd.finish_reason == reference.finish_reason


def block_bytes(model_dir: Path, block_size: int, elem_size: int = 4) -> int:
    """KV bytes of one block over all layers (float32 cache, CPU layout [H, bs, 2*D])."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return (
        config["num_hidden_layers"]
        * config["num_key_value_heads"]
        * block_size
        * 2
        * head_dim
        * elem_size
    )


def blocks_to_pull(prompt_tokens: int, block_size: int, cached_full_blocks: int = 0) -> int:
    """Blocks a decode instance must pull: the prompt's blocks minus its own prefix-cache hit.

    vLLM never serves the last prompt token from cache (it must compute its logits), so the
    local hit is at most ``(prompt_tokens - 1) // block_size`` blocks.
    """
    hit = min(cached_full_blocks, (prompt_tokens - 1) // block_size)
    return math.ceil(prompt_tokens / block_size) - hit


def counter(server: Any, name: str) -> float:
    value = server.metric(name)
    return 0.0 if value is None else float(value)


def wait_for_counter(server: Any, name: str, expected: float, timeout_s: float = 15.0) -> float:
    """Poll ``name`` until it reaches ``expected`` (stats reach /metrics a step or two late)."""
    deadline = time.monotonic() + timeout_s
    value = counter(server, name)
    while value < expected and time.monotonic() < deadline:
        time.sleep(0.25)
        value = counter(server, name)
    return value
