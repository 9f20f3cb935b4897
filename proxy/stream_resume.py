"""Continuing a streamed answer on another decode instance after its decode instance died
or stalled mid-stream, so that the client sees one uninterrupted stream.

Decode legs of continuable requests ask vLLM for token ids (``return_token_ids``: the
prompt's ids in the first chunk, each chunk's new ids in its choice). The relay keeps them
as raw byte slices, with byte searches and no JSON parsing, and turns them back into the
``null`` vLLM writes when nobody asked, so a client that did not ask for them gets the
very bytes it would have got without them. It passes on whole events only: the upstream
body arrives in arbitrary slices (``UpstreamResponse.next_chunk`` returns what the socket
had), and a break must never leave the client half an event. Only when a stream breaks
are the ids parsed: the continuation is a ``/v1/completions`` request whose token-id
prompt is the original prompt plus every token generated so far, with ``max_tokens`` (and
``min_tokens``) reduced by those and the same sampling fields. Its chunks are parsed and
rewritten into the original stream's shape: the same ``id``, ``created``, ``model`` and
``object``, chat chunks for a chat stream, usage counted once for the whole answer.

The byte handling relies on the SSE layout vLLM writes: ``data: <json>\\n\\n`` events of
compact JSON (pydantic's ``model_dump_json``) in which a key such as ``"token_ids":[``
cannot occur inside a string value (a quote in a string is written ``\\"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.request import ClientRequest, Endpoint, dumps_body

# Spliced onto a decode leg's body: vLLM then reports token ids in every chunk.
ASK_TOKEN_IDS = b',"return_token_ids":true'

# vLLM's completions default when a request sets no max_tokens.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_EVENT_END = b"\n\n"
# vLLM writes both fields in every completions chunk: a list when asked, else null.
_PROMPT_IDS_RE = re.compile(rb'"prompt_token_ids":\[([^\]]*)\]')
_TOKEN_IDS_RE = re.compile(rb'"token_ids":\[([^\]]*)\]')
_NULL_PROMPT_IDS = b'"prompt_token_ids":null'
_NULL_TOKEN_IDS = b'"token_ids":null'
_TOKEN_IDS = b'"token_ids":['
_DONE_EVENT = b"data: [DONE]\n\n"
# Chat deltas a plain completions continuation cannot reproduce: a server-side reasoning
# or tool parser is at work on this stream.
_PARSED_DELTA_KEYS = (b'"reasoning":', b'"tool_calls":')
# A chat chunk vLLM sends only because token ids were asked for: the parser held the
# token back (``delta_message is None``). Without our request it would not exist.
_EMPTY_DELTA = b'"delta":{},"logprobs":null,"finish_reason":null'
_PARSER_AT_WORK = "a reasoning or tool-call parser shapes this chat stream"
# An upstream that never ends an event would otherwise grow the held-back bytes forever.
# Far above any vLLM event: the first one carries the prompt's ids, ~7 bytes a token.
_MAX_PENDING = 64 << 20

# Fields of a chat request that vLLM 0.32's completions endpoint accepts with the same
# meaning: a chat stream continues on /v1/completions with exactly these. The rest are
# chat-only (messages, tools, templates), typed differently (logprobs) or set by the
# continuation itself (max_tokens, stream, n, return_token_ids).
_CHAT_FIELDS_FOR_COMPLETIONS = frozenset(
    {
        "model", "frequency_penalty", "logit_bias", "presence_penalty", "response_format",
        "seed", "stop", "stream_options", "temperature", "top_p", "thinking_token_budget",
        "user", "top_k", "min_p", "repetition_penalty", "watermarking", "length_penalty",
        "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
        "skip_special_tokens", "spaces_between_special_tokens", "allowed_token_ids",
        "bad_words", "structured_outputs", "priority", "request_id", "session_id",
        "cache_salt", "vllm_xargs", "repetition_detection", "stream_interval",
    }
)  # fmt: skip


def _set(value: Any) -> bool:
    return value is not None


def _truthy(value: Any) -> bool:
    return bool(value)


def _logprobs(value: Any) -> bool:
    # completions: an int (0 included) asks; chat: true asks, false does not.
    return value is not None and value is not False


def _not_text_format(value: Any) -> bool:
    return bool(value) and not (isinstance(value, dict) and value.get("type") == "text")


def _reasoning_hidden(value: Any) -> bool:
    # vLLM then withholds token ids from the chunks a reasoning parser produces.
    return value is False


# Request fields with which a stream cannot be continued exactly, and why; each with the
# test saying whether the field's value is in force.
_BLOCKERS: dict[str, tuple[Any, str]] = {
    "best_of": (lambda v: isinstance(v, int) and v > 1, "best_of > 1"),
    "echo": (_truthy, "echo"),
    "logprobs": (_logprobs, "logprobs"),
    "top_logprobs": (_truthy, "top_logprobs"),
    "prompt_logprobs": (_set, "prompt_logprobs"),
    "logprob_token_ids": (_truthy, "logprob_token_ids"),
    "stop": (_truthy, "stop strings (one can span the break)"),
    "frequency_penalty": (_truthy, "frequency_penalty (it counts output tokens only)"),
    "presence_penalty": (_truthy, "presence_penalty (it counts output tokens only)"),
    "bad_words": (_truthy, "bad_words (one can span the break)"),
    "repetition_detection": (_truthy, "repetition_detection"),
    "response_format": (_not_text_format, "structured output (its grammar would restart)"),
    "structured_outputs": (_truthy, "structured output (its grammar would restart)"),
    "tools": (_truthy, "tools (tool-call parsing)"),
    "include_reasoning": (_reasoning_hidden, "include_reasoning: false"),
    "thinking_token_budget": (_set, "thinking_token_budget"),
    "truncate_prompt_tokens": (_set, "truncate_prompt_tokens"),
    "prompt_embeds": (_set, "prompt_embeds"),
    "mm_payload": (_set, "multimodal input"),
    "watermarking": (_set, "watermarking"),
    "return_token_offsets": (_truthy, "return_token_offsets"),
    "vllm_xargs": (_truthy, "vllm_xargs (custom logits processors)"),
}


def resume_blocker(req: ClientRequest) -> str | None:
    """Why this request's stream could not be continued exactly on another decode
    instance, or None when it can. Cheap: it runs for every streamed request."""
    if not req.single_sequence:
        return "n > 1, several prompts or beam search"
    body = req.body
    if _BLOCKERS.keys().isdisjoint(body):
        return None
    for field, (in_force, reason) in _BLOCKERS.items():
        if field in body and in_force(body[field]):
            return reason
    return None


@dataclass(frozen=True, slots=True)
class Ending:
    """The stream had all its tokens when it broke: what the client still lacks (the usage
    chunk it asked for, ``data: [DONE]``), written by the proxy itself."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Continuation:
    """The rest of the answer, asked of another decode instance."""

    request: ClientRequest  # a streamed /v1/completions request with a token-id prompt
    generated: int  # output tokens the client already has


class ResumableStream:
    """What the client has been sent of one streamed answer, and the rewriting of the
    continuation's chunks into that answer's shape. One per request, across its legs."""

    __slots__ = (
        "_blocker",
        "_chat",
        "_continuing",
        "_head",
        "_ids",
        "_last",
        "_offset",
        "_pending",
        "_prompt_ids",
        "_raw_ids",
        "_req",
        "strips",
    )

    def __init__(self, req: ClientRequest) -> None:
        self._req = req
        self._chat = req.endpoint is Endpoint.CHAT
        # The proxy asked for the token ids, so they leave before the client sees them.
        self.strips = not req.body.get("return_token_ids")
        self._pending = bytearray()  # the start of an event whose end has not arrived
        self._prompt_ids: bytes | None = None  # raw, e.g. b"1,2,3"
        self._raw_ids: list[bytes] = []  # each chunk's raw ids, parsed only at a break
        self._ids: list[int] = []  # parsed output ids
        self._last = b""  # the last events relayed, as the client got them
        self._blocker: str | None = None  # something seen in the stream rules a resume out
        self._continuing = False
        self._offset = 0  # output tokens before the current continuation began
        self._head: dict[str, Any] = {}  # the original stream's id, object, created, model

    # -- relaying -----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` (any slice of the upstream body) the client may have now: the
        complete events, token ids it did not ask for removed. The rest waits for the
        next chunk, so a break never leaves the client half an event.

        It runs for every chunk of every continuable stream, so the usual one (a single
        whole event, its stream's prompt ids known) takes a short path of byte searches."""
        if (
            chunk.find(b"\n") == len(chunk) - 2  # one event: JSON holds no raw newline
            and chunk[-1] == 10  # ends "\n\n"
            and not self._pending
            and not self._continuing
            and self._prompt_ids is not None
        ):
            # From the end: the ids are the choice's last field, after all the other text.
            pos = chunk.rfind(_TOKEN_IDS)
            begin = pos + len(_TOKEN_IDS)
            end = chunk.find(b"]", begin)
            if pos >= 0 and end >= begin:
                self._raw_ids.append(chunk[begin:end])
                out = chunk[: begin - 1] + b"null" + chunk[end + 1 :] if self.strips else chunk
                if self._chat:
                    out = self._check_chat(chunk, out)
                if out:
                    self._last = out
                return out
        if self._pending or not chunk.endswith(_EVENT_END):
            chunk = self._whole_events(chunk)
            if not chunk:
                return chunk
        out = self._rewrite(chunk) if self._continuing else self._scan(chunk)
        if out:
            self._last = out
        return out

    def _whole_events(self, chunk: bytes) -> bytes:
        pending = self._pending
        if pending:
            # Held bytes hold no event end: only the new ones (and the byte before) can.
            start = len(pending) - 1
            pending += chunk
            cut = pending.rfind(_EVENT_END, start) + 2
            if cut == 1:
                return self._hold()
            events = bytes(pending[:cut])
            del pending[:cut]
            return events
        cut = chunk.rfind(_EVENT_END) + 2
        if cut == 1:
            pending += chunk
            return self._hold()
        pending += chunk[cut:]
        return chunk[:cut]

    def _hold(self) -> bytes:
        if len(self._pending) <= _MAX_PENDING:
            return b""
        self._blocker = "the decode instance's stream is not SSE events"
        return self.flush()

    def drop_partial(self) -> None:
        """A new leg starts: half an event left by a failed one is no part of its stream."""
        self._pending.clear()

    def flush(self) -> bytes:
        """At the end of the upstream body: bytes still held (none from vLLM, which ends
        every event)."""
        rest = bytes(self._pending)
        self._pending.clear()
        return rest

    def _scan(self, data: bytes) -> bytes:
        """Original stream, any number of events: note the ids, strip them if the proxy
        asked for them. Regular expressions: one C pass beats a Python loop over events."""
        if self._prompt_ids is None:
            found = _PROMPT_IDS_RE.search(data)
            if found is not None:
                self._prompt_ids = found.group(1)
                if self.strips:
                    data = data[: found.start()] + _NULL_PROMPT_IDS + data[found.end() :]
        # One pass: split on the pattern keeps its group (the ids) at the odd places.
        parts = _TOKEN_IDS_RE.split(data)
        out = data
        if len(parts) > 1:
            self._raw_ids += parts[1::2]
            if self.strips:
                out = _NULL_TOKEN_IDS.join(parts[0::2])
        return self._check_chat(data, out) if self._chat else out

    def _check_chat(self, data: bytes, out: bytes) -> bytes:
        """A chat stream shaped by a server-side parser cannot continue as plain text; the
        chunks vLLM sent only because token ids were asked for go."""
        for key in _PARSED_DELTA_KEYS:
            if key in data:
                self._blocker = _PARSER_AT_WORK
        if self.strips and _EMPTY_DELTA in out:
            self._blocker = _PARSER_AT_WORK
            out = _drop_empty_deltas(out)
        return out

    def _rewrite(self, data: bytes) -> bytes:
        """Continuation: each completions event rewritten into the original stream's
        shape. Parsing is fine here: this path runs only after a break."""
        out: list[bytes] = []
        for event in data.split(_EVENT_END):
            if not event:
                continue
            payload = event[6:] if event.startswith(b"data: ") else b""
            try:
                obj = orjson.loads(payload) if payload and payload != b"[DONE]" else None
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("choices"), list):
                rewritten = self._rewrite_chunk(obj)
                if rewritten is None:
                    continue
                event = b"data: " + orjson.dumps(rewritten)
            out.append(event + _EVENT_END)  # [DONE], error events: as they came
        return b"".join(out)

    def _rewrite_chunk(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        choices: list[Any] = obj["choices"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            usage = self._whole_usage(usage, per_chunk=bool(choices))
        if not choices:  # the final usage chunk
            return {**self._head, "choices": [], **({"usage": usage} if usage else {})}
        choice = choices[0]
        if not isinstance(choice, dict):
            return None
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self._ids += ids
        elif choice.get("text"):
            self._blocker = "the continuation's decode instance sent no token ids"
        shown_ids = None if self.strips else ids
        if not self._chat:
            for key in ("id", "created", "model"):
                obj[key] = self._head[key]
            choice["index"] = 0
            if "prompt_token_ids" in choice:
                choice["prompt_token_ids"] = None  # the client had the prompt's at the start
            choice["token_ids"] = shown_ids
            if usage is not None:
                obj["usage"] = usage
            return obj
        # vLLM's chat chunk layout (ChatCompletionStreamResponse, exclude_unset).
        finish = choice.get("finish_reason")
        chat_choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": choice.get("text", "")},
            "logprobs": None,
            "finish_reason": finish,
        }
        if finish is not None:
            chat_choice["stop_reason"] = choice.get("stop_reason")
        chat_choice["token_ids"] = shown_ids
        chunk: dict[str, Any] = {**self._head, "choices": [chat_choice]}
        if usage is not None:
            chunk["usage"] = usage
        if "system_fingerprint" in obj:
            chunk["system_fingerprint"] = obj["system_fingerprint"]
        return chunk

    def _whole_usage(self, usage: dict[str, Any], per_chunk: bool) -> dict[str, Any]:
        """The continuation's usage as the whole answer's: the original prompt, every
        output token (those before the break included)."""
        prompt = self._prompt_len()
        completion = self._offset + int(usage.get("completion_tokens") or 0)
        usage["prompt_tokens"] = prompt
        usage["total_tokens"] = prompt + completion
        usage["completion_tokens"] = completion
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            # The continuation's prompt holds the output so far: of the client's prompt, at
            # most all of it was cached.
            details["cached_tokens"] = min(details["cached_tokens"], prompt)
        if self._chat and per_chunk:
            usage.setdefault("completion_tokens_details", None)  # vLLM's chat sets it
        return usage

    def _prompt_len(self) -> int:
        raw = self._prompt_ids
        return raw.count(b",") + 1 if raw else 0

    # -- at a break -----------------------------------------------------------------------

    def after_break(self, context_length: int | None) -> Ending | Continuation | str:
        """The stream's decode leg broke: how it goes on (a continuation, or just its
        ending), or why it cannot. ``context_length``: the model's, for a chat request
        that set no output limit (None: unknown)."""
        self._pending.clear()  # half an event from the broken leg: the continuation redoes it
        if self._raw_ids:
            raw = b",".join(ids for ids in self._raw_ids if ids)
            try:
                self._ids += orjson.loads(b"[" + raw + b"]")
            except orjson.JSONDecodeError:
                return "the decode instance's token ids were unreadable"
            self._raw_ids.clear()
        if self._blocker is not None:
            return self._blocker
        event = _last_event(self._last)
        if event == b"[DONE]":
            return Ending(b"")
        try:
            last = orjson.loads(event) if event else None
        except orjson.JSONDecodeError:
            last = None
        if not isinstance(last, dict) or not isinstance(last.get("choices"), list):
            return "the last event relayed was not a chunk of the answer"
        self._head = {key: last.get(key) for key in ("id", "object", "created", "model")}
        generated = len(self._ids)
        choices = last["choices"]
        if not choices:  # the usage chunk went out: only [DONE] is missing
            return Ending(_DONE_EVENT)
        choice = choices[0]
        if not isinstance(choice, dict):
            return "the last event relayed was not a chunk of the answer"
        if choice.get("finish_reason") is not None:
            return self._ending(generated)
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        is_role_chunk = isinstance(delta, dict) and "role" in delta
        if text == "" and not is_role_chunk:
            # vLLM holds back the text of a token that ends inside a UTF-8 character; the
            # continuation could not recover it.
            return "the break fell inside a character"
        if self._prompt_ids is None:
            return "the decode instance did not report the prompt's token ids"
        try:
            prompt: list[int] = orjson.loads(b"[" + self._prompt_ids + b"]")
        except orjson.JSONDecodeError:
            return "the decode instance's prompt token ids were unreadable"
        limit = self._output_limit(len(prompt), context_length)
        if isinstance(limit, str):
            return limit
        remaining = limit - generated
        if remaining <= 0:
            return self._ending(generated)
        if self._chat and _has_media(self._req.body.get("messages")):
            return "multimodal input"
        self._continuing = True
        self._offset = generated
        return Continuation(self._continuation(prompt + self._ids, remaining), generated)

    def _output_limit(self, prompt_len: int, context_length: int | None) -> int | str:
        body = self._req.body
        if not self._chat:
            limit = body.get("max_tokens")
            return limit if isinstance(limit, int) else COMPLETIONS_DEFAULT_MAX_TOKENS
        for field in ("max_completion_tokens", "max_tokens"):
            limit = body.get(field)
            if isinstance(limit, int):
                return limit
        # Chat without a limit runs to the context's end; completions would stop at 16.
        if context_length is None:
            return "no max_tokens and the model's context length is unknown"
        return context_length - prompt_len

    def _ending(self, generated: int) -> Ending | str:
        options = self._req.body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            return Ending(_DONE_EVENT)
        if self._prompt_ids is None:
            return "the decode instance did not report the prompt's token ids"
        prompt = self._prompt_len()
        usage = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + generated,
            "completion_tokens": generated,
        }
        chunk = {**self._head, "choices": [], "usage": usage}
        return Ending(b"data: " + orjson.dumps(chunk) + _EVENT_END + _DONE_EVENT)

    def _continuation(self, prompt: list[int], max_tokens: int) -> ClientRequest:
        original = self._req.body
        if self._chat:
            body = {k: v for k, v in original.items() if k in _CHAT_FIELDS_FOR_COMPLETIONS}
        else:
            body = dict(original)
        body["prompt"] = prompt
        body["max_tokens"] = max_tokens
        min_tokens = original.get("min_tokens")
        if isinstance(min_tokens, int) and min_tokens:
            body["min_tokens"] = max(0, min_tokens - self._offset)
        body["stream"] = True
        body["return_token_ids"] = True
        return ClientRequest(
            endpoint=Endpoint.COMPLETIONS,
            raw=dumps_body(body),
            body=body,
            model=self._req.model,
            stream=True,
            prompt=prompt,
            prompt_tokens=len(prompt),
            max_tokens=max_tokens,
            single_sequence=True,
        )


def _last_event(data: bytes) -> bytes:
    """The payload of the last ``data:`` event in ``data`` (complete events)."""
    body = data.rstrip(b"\n")
    start = body.rfind(_EVENT_END)
    event = body[start + 2 :] if start >= 0 else body
    return event[6:] if event.startswith(b"data: ") else b""


def _drop_empty_deltas(data: bytes) -> bytes:
    """``data`` without the chat events vLLM sent only because token ids were asked for."""
    kept = [
        event + _EVENT_END
        for event in data.split(_EVENT_END)
        if event and _EMPTY_DELTA not in event
    ]
    return b"".join(kept)


def _has_media(messages: Any) -> bool:
    """Whether chat messages carry anything but text: placeholders in the prompt's token
    ids stand for it, and a token-id prompt cannot bring the media along."""
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if not (isinstance(part, dict) and part.get("type") in (None, "text")):
                    return True
    return False
