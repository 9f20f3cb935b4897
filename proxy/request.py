"""Parse and check a client's completions / chat request once, keeping only what
routing and the PD flow need; every other field passes through untouched."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

import orjson

from kv_transfer.params import ROUTER_ONLY_FIELDS
from proxy.errors import ProxyError

# Output length assumed for load accounting when the client sets none
# (OpenAI's completions default; chat has no cap, so guess a typical answer).
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 256


class Endpoint(enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat_completions"

    @property
    def path(self) -> str:
        return "/v1/completions" if self is Endpoint.COMPLETIONS else "/v1/chat/completions"

    @property
    def path_bytes(self) -> bytes:
        return b"/v1/completions" if self is Endpoint.COMPLETIONS else b"/v1/chat/completions"


@dataclass(slots=True)
class ClientRequest:
    endpoint: Endpoint
    raw: bytes
    body: dict[str, Any]
    model: str | None
    stream: bool
    prompt: str | list[int]
    prompt_tokens: int
    max_tokens: int
    # False for n > 1, batched prompts and beam search: one KV handoff carries one sequence.
    single_sequence: bool


def parse_client_request(endpoint: Endpoint, raw: bytes) -> ClientRequest:
    """Raises ProxyError(400) naming the offending field."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object")
    if any(field in body for field in ROUTER_ONLY_FIELDS):
        # They tell an engine which host to dial and whose KV to load: only the proxy sets them.
        for field in ROUTER_ONLY_FIELDS:
            body.pop(field, None)
        raw = dumps_body(body)

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProxyError(400, "`model` must be a string", "model")
    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise ProxyError(400, "`stream` must be a boolean", "stream")
    n = _optional_int(body, "n", minimum=1)
    if endpoint is Endpoint.COMPLETIONS:
        prompt, batch = _completion_prompt(body)
        max_tokens = _optional_int(body, "max_tokens", minimum=1)
        default_max = DEFAULT_COMPLETION_MAX_TOKENS
    else:
        prompt, batch = _chat_prompt(body), False
        max_tokens = _optional_int(body, "max_completion_tokens", minimum=1)
        if max_tokens is None:
            max_tokens = _optional_int(body, "max_tokens", minimum=1)
        default_max = DEFAULT_CHAT_MAX_TOKENS
    return ClientRequest(
        endpoint=endpoint,
        raw=raw,
        body=body,
        model=model,
        stream=stream,
        prompt=prompt,
        prompt_tokens=estimate_tokens(prompt),
        max_tokens=max_tokens or default_max,
        single_sequence=(n is None or n == 1) and not batch and not body.get("use_beam_search"),
    )


def with_prompt_ids(req: ClientRequest, token_ids: list[int]) -> ClientRequest:
    """``req`` with its completions prompt replaced by ``token_ids`` (what the engine would
    have computed from the text), its other fields as the client sent them."""
    body = dict(req.body)
    body["prompt"] = token_ids
    return replace(
        req, raw=dumps_body(body), body=body, prompt=token_ids, prompt_tokens=len(token_ids)
    )


def dumps_body(body: dict[str, Any]) -> bytes:
    """A parsed client body as JSON again; ProxyError(400) if it nests too deeply to write.

    orjson reads up to 1024 levels of nesting but writes at most 254, and a parsed body holds
    nothing else it cannot write."""
    try:
        return orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError: "Recursion limit reached"
        raise ProxyError(
            400, "request body is nested too deeply: the proxy forwards at most 254 levels"
        ) from None


def estimate_tokens(prompt: str | list[int]) -> int:
    """Exact for token ids; UTF-8 bytes / 4 for text (no tokenizer in the proxy)."""
    if isinstance(prompt, list):
        return len(prompt)
    size = len(prompt) if prompt.isascii() else len(prompt.encode())
    return max(1, size // 4)


def _optional_int(body: dict[str, Any], field: str, minimum: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProxyError(400, f"`{field}` must be an integer", field)
    if value < minimum:
        raise ProxyError(400, f"`{field}` must be at least {minimum}, got {value}", field)
    return value


def _completion_prompt(body: dict[str, Any]) -> tuple[str | list[int], bool]:
    """The routing prompt and whether the request batches several prompts."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, False
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return prompt, False
        elif isinstance(first, str):
            if all(isinstance(p, str) for p in prompt):
                return first, len(prompt) > 1
        elif isinstance(first, list) and all(
            isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt
        ):
            return first, len(prompt) > 1
    if "prompt" not in body or prompt is None:
        raise ProxyError(400, "`prompt` is required", "prompt")
    raise ProxyError(
        400,
        "`prompt` must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists, and must not be empty",
        "prompt",
    )


def _chat_prompt(body: dict[str, Any]) -> str:
    """The messages flattened to text, for prefix routing and length estimates."""
    messages = body.get("messages")
    if messages is None:
        raise ProxyError(400, "`messages` is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise ProxyError(400, "`messages` must be a non-empty list", "messages")
    parts: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ProxyError(400, f"`messages[{index}]` must be an object", "messages")
        role = message.get("role")
        if not isinstance(role, str):
            raise ProxyError(400, f"`messages[{index}].role` must be a string", "messages")
        parts.append(role)
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
    return "\n".join(parts)
