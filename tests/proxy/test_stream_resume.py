"""The byte-level side of continuing a stream elsewhere (``proxy.stream_resume``): what the
relay keeps of a stream and strips from it, and how a continuation's chunks are rewritten.

The chunks below are what vLLM 0.32 writes (``model_dump_json(exclude_unset=True)``:
compact JSON in the models' field order), for ``return_token_ids: true`` and without."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from proxy_helpers import sse_events, without_token_ids

from proxy import stream_resume
from proxy.pd_flow import decode_body
from proxy.request import Endpoint, parse_client_request
from proxy.stream_resume import Continuation, Ending, ResumableStream, resume_blocker

HEAD = b'{"id":"cmpl-1","object":"text_completion","created":7,"model":"m","choices":['
CHAT_HEAD = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m",'


def completion_event(text: str, ids: list[int], prompt: list[int] | None, finish: bool) -> bytes:
    choice = (
        b'{"index":0,"text":' + orjson.dumps(text) + b',"logprobs":null,"finish_reason":'
        + (b'"length"' if finish else b"null") + b',"stop_reason":null,"prompt_token_ids":'
        + (orjson.dumps(prompt) if prompt is not None else b"null")
        + b',"token_ids":' + orjson.dumps(ids) + b"}"
    )  # fmt: skip
    return b"data: " + HEAD + choice + b"]}\n\n"


def completion_stream(prompt: list[int], outputs: list[list[int]], usage: bool) -> bytes:
    events = [
        completion_event(
            "".join(f" t{t}" for t in ids), ids, prompt if i == 0 else None, i == len(outputs) - 1
        )
        for i, ids in enumerate(outputs)
    ]
    if usage:
        count = sum(len(ids) for ids in outputs)
        events.append(
            b"data: " + HEAD + b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,'
            b'"completion_tokens":%d}}\n\n' % (len(prompt), len(prompt) + count, count)
        )
    return b"".join(events) + b"data: [DONE]\n\n"


def chat_role_event(prompt: list[int] | None) -> bytes:
    return (
        b"data: " + CHAT_HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant",'
        b'"content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":'
        + (orjson.dumps(prompt) if prompt is not None else b"null")
        + b',"prompt_text":null}\n\n'
    )  # fmt: skip


def chat_event(text: str, ids: list[int] | None, finish: bool = False) -> bytes:
    tail = b'"length","stop_reason":null' if finish else b"null"
    return (
        b"data: " + CHAT_HEAD + b'"choices":[{"index":0,"delta":{"content":'
        + orjson.dumps(text) + b'},"logprobs":null,"finish_reason":' + tail
        + b',"token_ids":' + orjson.dumps(ids) + b"}]}\n\n"
    )  # fmt: skip


def request(endpoint: Endpoint, **body: Any) -> Any:
    if endpoint is Endpoint.CHAT:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        body.setdefault("prompt", "hi")
    return parse_client_request(endpoint, orjson.dumps({"model": "m", "stream": True, **body}))


def relay(stream: ResumableStream, data: bytes, cuts: list[int]) -> list[bytes]:
    """Feed ``data`` in pieces cut at ``cuts``; every non-empty piece the relay gives back."""
    pieces, start = [], 0
    for cut in [*cuts, len(data)]:
        out = stream.feed(data[start:cut])
        if out:
            pieces.append(out)
        start = cut
    return pieces


PROMPT = [11, 12, 13]
OUTPUTS = [[100], [101, 102], [103], [104]]


# -- relaying -------------------------------------------------------------------------------


def test_every_split_point_yields_whole_events_without_the_token_ids() -> None:
    data = completion_stream(PROMPT, OUTPUTS, usage=True)
    expected = without_token_ids(data)
    assert expected.count(b'"token_ids":null') == len(OUTPUTS)
    for cut in range(1, len(data)):
        stream = ResumableStream(request(Endpoint.COMPLETIONS))
        pieces = relay(stream, data, [cut])
        assert b"".join(pieces) == expected
        # Only whole events reach the client, however the bytes arrived.
        assert all(piece.endswith(b"\n\n") for piece in pieces)


def test_random_splits_into_many_pieces() -> None:
    data = completion_stream(PROMPT, OUTPUTS, usage=False)
    rng = random.Random(5)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 30)))
        stream = ResumableStream(request(Endpoint.COMPLETIONS))
        assert b"".join(relay(stream, data, cuts)) == without_token_ids(data)


def test_byte_by_byte() -> None:
    data = completion_stream(PROMPT, OUTPUTS, usage=True)
    stream = ResumableStream(request(Endpoint.COMPLETIONS))
    pieces = relay(stream, data, list(range(1, len(data))))
    assert len(pieces) == len(OUTPUTS) + 2  # one per event: each goes out once it is whole
    assert b"".join(pieces) == without_token_ids(data)


def test_an_upstream_that_never_ends_an_event_is_relayed_after_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream_resume, "_MAX_PENDING", 100)
    stream = ResumableStream(request(Endpoint.COMPLETIONS, max_tokens=5))
    assert stream.feed(b"x" * 60) == b""
    assert stream.feed(b"y" * 60) == b"x" * 60 + b"y" * 60
    assert stream.after_break(None) == "the decode instance's stream is not SSE events"


def test_token_ids_the_client_asked_for_stay() -> None:
    data = completion_stream(PROMPT, OUTPUTS, usage=False)
    stream = ResumableStream(request(Endpoint.COMPLETIONS, return_token_ids=True))
    assert not stream.strips
    assert b"".join(relay(stream, data, [40, 41, 300])) == data


def test_a_partial_event_waits_and_a_break_discards_it() -> None:
    first, second = (
        completion_event(" t100", [100], PROMPT, False),
        completion_event(" t101", [101], None, False),
    )
    stream = ResumableStream(request(Endpoint.COMPLETIONS, max_tokens=5))
    assert stream.feed(first + second[:30]) == without_token_ids(first)
    assert stream.feed(b"") == b""
    plan = stream.after_break(None)
    # The half event never reached the client, so its token is generated again.
    assert isinstance(plan, Continuation) and plan.generated == 1
    assert plan.request.body["prompt"] == [*PROMPT, 100]


def test_flush_returns_bytes_that_never_ended_an_event() -> None:
    stream = ResumableStream(request(Endpoint.COMPLETIONS))
    assert stream.feed(b"data: {}") == b""
    assert stream.flush() == b"data: {}"
    assert stream.flush() == b""


def test_chat_prompt_ids_sit_in_the_role_chunk() -> None:
    data = chat_role_event(PROMPT) + chat_event(" a", [100]) + chat_event(" b", [101])
    stream = ResumableStream(request(Endpoint.CHAT, max_tokens=6))
    out = stream.feed(data)
    assert out == chat_role_event(None) + chat_event(" a", None) + chat_event(" b", None)
    plan = stream.after_break(None)
    assert isinstance(plan, Continuation)
    assert plan.request.body["prompt"] == [*PROMPT, 100, 101]
    assert plan.request.max_tokens == 4


def test_chunks_sent_only_for_the_token_ids_are_dropped_and_rule_a_resume_out() -> None:
    # With a reasoning parser holding a token back, vLLM sends {"delta":{}} only because
    # token ids were asked for: the client must not see it, and text and ids now disagree.
    swallowed = (
        b"data: " + CHAT_HEAD + b'"choices":[{"index":0,"delta":{},"logprobs":null,'
        b'"finish_reason":null,"token_ids":[100]}]}\n\n'
    )
    stream = ResumableStream(request(Endpoint.CHAT, max_tokens=6))
    out = stream.feed(chat_role_event(PROMPT) + swallowed + chat_event(" b", [101]))
    assert out == chat_role_event(None) + chat_event(" b", None)
    assert stream.after_break(None) == "a reasoning or tool-call parser shapes this chat stream"


def test_reasoning_deltas_rule_a_resume_out() -> None:
    reasoning = (
        b"data: " + CHAT_HEAD + b'"choices":[{"index":0,"delta":{"reasoning":"hm"},'
        b'"logprobs":null,"finish_reason":null,"token_ids":[100]}]}\n\n'
    )
    stream = ResumableStream(request(Endpoint.CHAT, max_tokens=6))
    stream.feed(chat_role_event(PROMPT) + reasoning)
    assert isinstance(stream.after_break(None), str)


def test_key_like_text_inside_a_string_is_not_taken_for_token_ids() -> None:
    text = '"token_ids":[1,2] and "prompt_token_ids":[3]'
    event = completion_event(text, [100], PROMPT, False)
    stream = ResumableStream(request(Endpoint.COMPLETIONS, max_tokens=5))
    out = stream.feed(event)
    assert orjson.loads(sse_events(out)[0])["choices"][0]["text"] == text
    plan = stream.after_break(None)
    assert isinstance(plan, Continuation) and plan.request.body["prompt"] == [*PROMPT, 100]


# -- at a break -----------------------------------------------------------------------------


def broken(endpoint: Endpoint, data: bytes, **body: Any) -> ResumableStream:
    stream = ResumableStream(request(endpoint, **body))
    stream.feed(data)
    return stream


def test_completions_continuation_keeps_the_sampling_fields() -> None:
    data = completion_stream(PROMPT, OUTPUTS, usage=False)
    cut = data.index(b"data: ", data.index(b"[101,102]"))  # two events in
    stream = broken(
        Endpoint.COMPLETIONS,
        data[:cut],
        max_tokens=9,
        min_tokens=5,
        seed=42,
        temperature=0.7,
        top_k=3,
        my_vendor_field={"x": 1},
        stream_options={"include_usage": True},
    )
    plan = stream.after_break(None)
    assert isinstance(plan, Continuation) and plan.generated == 3
    body = plan.request.body
    assert body["prompt"] == [*PROMPT, 100, 101, 102]
    assert (body["max_tokens"], body["min_tokens"]) == (6, 2)
    assert (body["seed"], body["temperature"], body["top_k"]) == (42, 0.7, 3)
    assert body["my_vendor_field"] == {"x": 1}
    assert body["stream"] is True and body["return_token_ids"] is True
    assert body["stream_options"] == {"include_usage": True}
    leg = plan.request
    assert leg.endpoint is Endpoint.COMPLETIONS and leg.single_sequence and leg.stream
    assert leg.prompt_tokens == 6 and leg.max_tokens == 6
    assert orjson.loads(leg.raw) == body


def test_completions_without_max_tokens_continue_from_vllms_default() -> None:
    stream = broken(Endpoint.COMPLETIONS, completion_event(" t", [100], PROMPT, False))
    plan = stream.after_break(None)
    assert isinstance(plan, Continuation) and plan.request.body["max_tokens"] == 15


def test_chat_continues_on_completions_with_the_shared_fields() -> None:
    data = chat_role_event(PROMPT) + chat_event(" a", [100])
    stream = broken(
        Endpoint.CHAT,
        data,
        max_completion_tokens=8,
        seed=3,
        tools=None,
        chat_template_kwargs={"x": 1},
        logprobs=False,
        cache_salt="s",
    )
    plan = stream.after_break(None)
    assert isinstance(plan, Continuation)
    assert plan.request.endpoint is Endpoint.COMPLETIONS
    body = plan.request.body
    assert body == {
        "model": "m",
        "seed": 3,
        "cache_salt": "s",
        "prompt": [*PROMPT, 100],
        "max_tokens": 7,
        "stream": True,
        "return_token_ids": True,
    }


def test_chat_without_a_limit_runs_to_the_context_length() -> None:
    data = chat_role_event(PROMPT) + chat_event(" a", [100])
    assert broken(Endpoint.CHAT, data).after_break(None) == (
        "no max_tokens and the model's context length is unknown"
    )
    plan = broken(Endpoint.CHAT, data).after_break(100)
    assert isinstance(plan, Continuation)
    assert plan.request.body["max_tokens"] == 100 - len(PROMPT) - 1


def test_chat_with_media_cannot_continue() -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    data = chat_role_event(PROMPT) + chat_event(" a", [100])
    assert broken(Endpoint.CHAT, data, messages=messages, max_tokens=4).after_break(None) == (
        "multimodal input"
    )


@pytest.mark.parametrize("usage", [False, True])
def test_a_stream_with_its_last_token_just_needs_its_ending(usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if usage else {}
    data = completion_stream(PROMPT, OUTPUTS, usage=False).removesuffix(b"data: [DONE]\n\n")
    plan = broken(Endpoint.COMPLETIONS, data, max_tokens=5, **options).after_break(None)
    assert isinstance(plan, Ending)
    events = sse_events(plan.data)
    assert events[-1] == b"[DONE]"
    if usage:
        chunk = HEAD + b'],"usage":{"prompt_tokens":3,"total_tokens":8,"completion_tokens":5}}'
        assert events == [chunk, b"[DONE]"]
    else:
        assert len(events) == 1


def test_a_stream_cut_after_its_usage_chunk_or_done() -> None:
    data = completion_stream(PROMPT, OUTPUTS, usage=True)
    options = {"stream_options": {"include_usage": True}}
    before_done = data.removesuffix(b"data: [DONE]\n\n")
    plan = broken(Endpoint.COMPLETIONS, before_done, **options).after_break(None)
    assert plan == Ending(b"data: [DONE]\n\n")
    assert broken(Endpoint.COMPLETIONS, data, **options).after_break(None) == Ending(b"")


def test_a_break_inside_a_character_cannot_continue() -> None:
    # vLLM holds back the text of a token that ends inside a UTF-8 character.
    data = completion_event(" a", [100], PROMPT, False) + completion_event("", [101], None, False)
    plan = broken(Endpoint.COMPLETIONS, data, max_tokens=5).after_break(None)
    assert plan == "the break fell inside a character"


def test_without_prompt_ids_a_stream_cannot_continue() -> None:
    data = without_token_ids(completion_event(" a", [100], PROMPT, False))
    plan = broken(Endpoint.COMPLETIONS, data, max_tokens=5).after_break(None)
    assert plan == "the decode instance did not report the prompt's token ids"


# -- the continuation's chunks ------------------------------------------------------------


def continuation_event(text: str, ids: list[int], finish: bool, usage: bytes = b"") -> bytes:
    head = b'{"id":"cmpl-2","object":"text_completion","created":99,"model":"m2","choices":['
    event = completion_event(text, ids, [1, 2, 3, 4, 5] if ids == [102] else None, finish)
    event = event.replace(HEAD, head)
    if usage:
        event = event.removesuffix(b"}\n\n") + b',"usage":' + usage + b"}\n\n"
    return event


@pytest.mark.parametrize("asked", [False, True])
def test_completions_continuation_chunks_join_the_original_stream(asked: bool) -> None:
    extra = {"return_token_ids": True} if asked else {}
    first = completion_stream(PROMPT, [[100], [101]], usage=False).split(b"data: [DONE]")[0]
    first = first.replace(b'"length"', b"null")  # cut before its end
    stream = ResumableStream(
        request(Endpoint.COMPLETIONS, max_tokens=4, stream_options={"include_usage": True}, **extra)
    )
    stream.feed(first)
    plan = stream.after_break(None)
    assert isinstance(plan, Continuation) and plan.generated == 2
    usage = b'{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}'
    rest = (
        continuation_event(" t102", [102], False)
        + continuation_event(" t103", [103], True)
        + b'data: {"id":"cmpl-2","object":"text_completion","created":99,"model":"m2",'
        b'"choices":[],"usage":' + usage + b"}\n\n"
        b"data: [DONE]\n\n"
    )
    out = b"".join(relay(stream, rest, [17, 200, 201]))
    ids = b"[102]" if asked else b"null"
    expected = (
        completion_event(" t102", [102], None, False).replace(b"[102]", ids)
        + completion_event(" t103", [103], None, True).replace(
            b"[103]", b"[103]" if asked else b"null"
        )
        + b"data: " + HEAD + b'],"usage":{"prompt_tokens":3,"total_tokens":7,'
        b'"completion_tokens":4}}\n\n'
        b"data: [DONE]\n\n"
    )  # fmt: skip
    assert out == expected
    # A break after the continuation's [DONE] leaves nothing to add.
    assert stream.after_break(None) == Ending(b"")


@pytest.mark.parametrize(("cached", "expected"), [(5, 3), (2, 2)])
def test_a_continuations_prefix_cache_hit_is_capped_at_the_clients_prompt(
    cached: int, expected: int
) -> None:
    """vLLM with --enable-prompt-tokens-details reports the continuation's hit, whose prompt
    holds the output so far: the client's answer says at most its own prompt was cached."""
    first = completion_stream(PROMPT, [[100], [101]], usage=False).split(b"data: [DONE]")[0]
    stream = ResumableStream(
        request(Endpoint.COMPLETIONS, max_tokens=4, stream_options={"include_usage": True})
    )
    stream.feed(first.replace(b'"length"', b"null"))
    assert isinstance(stream.after_break(None), Continuation)
    final = (
        b'data: {"id":"cmpl-2","object":"text_completion","created":99,"model":"m2",'
        b'"choices":[],"usage":{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2,'
        b'"prompt_tokens_details":{"cached_tokens":%d}}}\n\n' % cached
    )
    chunk = stream.feed(final)
    assert b'"prompt_tokens":3,' in chunk
    assert b'"prompt_tokens_details":{"cached_tokens":%d}' % expected in chunk, chunk


def test_chat_stream_continues_as_chat_chunks() -> None:
    first = chat_role_event(PROMPT) + chat_event(" a", [100])
    stream = ResumableStream(
        request(
            Endpoint.CHAT,
            max_tokens=3,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    stream.feed(first)
    assert isinstance(stream.after_break(None), Continuation)
    usage = b'{"prompt_tokens":4,"total_tokens":%d,"completion_tokens":%d}'
    rest = (
        continuation_event(" b", [101], False, usage % (5, 1))
        + continuation_event(" c", [102], True, usage % (6, 2))
        + b'data: {"id":"cmpl-2","object":"text_completion","created":99,"model":"m2",'
        b'"choices":[],"usage":' + usage % (6, 2) + b"}\n\n"
        b"data: [DONE]\n\n"
    )
    out = stream.feed(rest)
    running = b',"usage":{"prompt_tokens":3,"total_tokens":%d,"completion_tokens":%d,'
    running += b'"completion_tokens_details":null}}\n\n'
    expected = (
        chat_event(" b", None).removesuffix(b"}\n\n") + running % (5, 2)
        + chat_event(" c", None, finish=True).removesuffix(b"}\n\n") + running % (6, 3)
        + b"data: " + CHAT_HEAD
        + b'"choices":[],"usage":{"prompt_tokens":3,"total_tokens":6,"completion_tokens":3}}'
        + b"\n\ndata: [DONE]\n\n"
    )  # fmt: skip
    assert out == expected


def test_error_events_of_a_continuation_pass_as_they_are() -> None:
    stream = broken(Endpoint.COMPLETIONS, completion_event(" a", [100], PROMPT, False))
    assert isinstance(stream.after_break(None), Continuation)
    error = b'data: {"error":{"message":"boom","type":"x","param":null,"code":500}}\n\n'
    assert stream.feed(error + b"data: [DONE]\n\n") == error + b"data: [DONE]\n\n"


# -- which requests can continue ------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "fields", "reason"),
    [
        (Endpoint.COMPLETIONS, {"n": 2}, "n > 1"),
        (Endpoint.COMPLETIONS, {"prompt": ["a", "b"]}, "n > 1"),
        (Endpoint.COMPLETIONS, {"use_beam_search": True}, "beam search"),
        (Endpoint.COMPLETIONS, {"best_of": 3}, "best_of"),
        (Endpoint.COMPLETIONS, {"echo": True}, "echo"),
        (Endpoint.COMPLETIONS, {"logprobs": 0}, "logprobs"),
        (Endpoint.CHAT, {"logprobs": True}, "logprobs"),
        (Endpoint.CHAT, {"top_logprobs": 2}, "top_logprobs"),
        (Endpoint.COMPLETIONS, {"prompt_logprobs": 1}, "prompt_logprobs"),
        (Endpoint.COMPLETIONS, {"stop": ["\n"]}, "stop"),
        (Endpoint.CHAT, {"stop": "x"}, "stop"),
        (Endpoint.COMPLETIONS, {"frequency_penalty": 0.5}, "frequency_penalty"),
        (Endpoint.COMPLETIONS, {"presence_penalty": -1}, "presence_penalty"),
        (Endpoint.COMPLETIONS, {"response_format": {"type": "json_object"}}, "structured"),
        (Endpoint.CHAT, {"structured_outputs": {"json": {}}}, "structured"),
        (Endpoint.CHAT, {"tools": [{"type": "function"}]}, "tools"),
        (Endpoint.CHAT, {"include_reasoning": False}, "include_reasoning"),
        (Endpoint.COMPLETIONS, {"bad_words": ["x"]}, "bad_words"),
        (Endpoint.COMPLETIONS, {"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
    ],
)
def test_requests_that_cannot_continue_exactly(
    endpoint: Endpoint, fields: dict[str, Any], reason: str
) -> None:
    blocker = resume_blocker(request(endpoint, **fields))
    assert blocker is not None and reason in blocker


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"stop": []},
        {"stop": None},
        {"logprobs": None},
        {"frequency_penalty": 0},
        {"response_format": {"type": "text"}},
        {"seed": 1, "temperature": 0.8, "top_p": 0.9, "min_tokens": 2, "n": 1},
        {"return_token_ids": True, "stop_token_ids": [2], "ignore_eos": True},
    ],
)
def test_requests_that_can_continue(fields: dict[str, Any]) -> None:
    for endpoint in Endpoint:
        assert resume_blocker(request(endpoint, **fields)) is None


# -- the decode leg's body ------------------------------------------------------------------


def test_decode_body_splices_fields_onto_the_clients_bytes() -> None:
    req = request(Endpoint.COMPLETIONS, max_tokens=3, return_token_ids=False)
    assert decode_body(req, None, False) is req.raw
    spliced = decode_body(req, {"a": 1}, True)
    assert spliced.startswith(req.raw[:-1])
    # The later key wins, as JSON parsers (vLLM's included) read duplicates.
    assert orjson.loads(spliced) == {
        **req.body,
        "return_token_ids": True,
        "kv_transfer_params": {"a": 1},
    }
    assert orjson.loads(decode_body(req, None, True))["return_token_ids"] is True
