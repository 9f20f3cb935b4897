"""Helpers for the end-to-end PD tests: exact-length prompts and OpenAI requests.

KV transfer accounting (``block_bytes``, ``blocks_to_pull``) and the /metrics readers live in
tests/engine_support.py, shared with the connector's real-engine tests.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
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


async def until(predicate: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Poll ``predicate`` on the event loop until it holds; AssertionError naming ``what``
    after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)
