"""A stand-in for a vLLM worker (prefill or decode role), for tests and proxy benchmarks.

It speaks the parts of vLLM's OpenAI server a PD proxy touches: ``/v1/completions``
and ``/v1/chat/completions`` (JSON or SSE), ``/v1/models`` and ``/health``. A prefill
worker asked with ``kv_transfer_params: {"do_remote_decode": true}`` answers one
token and a ``kv_transfer_params`` dict shaped like a vLLM NIXL producer's; a decode
worker streams N tokens. Every request is recorded (path, headers, JSON body), and
fault knobs make it fail, hang, stall, drop streams or fail health checks.

Streams are laid out as vLLM 0.32 writes them (pydantic's compact JSON, its key order,
``"prompt_token_ids"``/``"token_ids"`` null unless ``return_token_ids`` asks for them,
a separate role chunk first in chat streams, usage only with
``stream_options.include_usage``), so the proxy's byte-level handling of them is tested
against the real layout. Generation is a deterministic function of the token-id prefix
("greedy"): the next token is ``GENERATED_BASE + k`` where k counts the prefix's tokens
at or above ``GENERATED_BASE``, and its text is ``" tok<k>"``. A request whose token-id
prompt is another's prompt plus its first k output tokens therefore continues exactly
where that one would have gone on; word prompts map to ids below ``GENERATED_BASE``.

In-process::

    worker = FakeWorker("decode", tokens=8)
    await worker.start(); ...; await worker.stop()

As a process: ``python -m benchmarks.fake_worker --role prefill --port 18100``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from kv_transfer import params as kvp

ROLES = ("prefill", "decode")
# Output token ids start here; prompt words get ids below it.
GENERATED_BASE = 100_000


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDict[str]  # case-insensitive, as HTTP headers are
    body: Any  # the parsed JSON body, or None
    peer: tuple[str, int] | None = None  # the client's address: shows connection reuse


@dataclass
class Faults:
    """Misbehaviour switches; tests flip them on a running worker."""

    fail_requests: int = 0  # the next N generate requests answer ``fail_status``
    fail_status: int = 500
    hang: bool = False  # generate requests never answer
    delay_s: float = 0.0  # wait before answering a generate request
    first_chunk_delay_s: float = 0.0  # streams: pause between the headers and the first chunk
    # Streams: go silent, or cut the connection, after N chunks (the usage chunk counts;
    # with N = all of them, the cut comes before data: [DONE]).
    stall_after_chunks: int | None = None
    drop_after_chunks: int | None = None
    drop_inside_event: bool = False  # the cut comes after half of the next chunk
    unhealthy: bool = False  # /health answers 503
    omit_kv_transfer_params: bool = False  # prefill answers without kv_transfer_params
    # Generate requests wait until it is set (after being recorded): a test can act while a
    # request is known to be inside this worker, without guessing how long that takes.
    gate: asyncio.Event | None = None


@dataclass
class FakeWorker:
    role: str = "decode"
    host: str = "127.0.0.1"
    port: int = 0
    model: str = "fake-model"
    tokens: int = 16  # output tokens when the request sets no max_tokens
    token_delay_s: float = 0.0
    # Output tokens per streamed chunk (vLLM batches several under load or with a
    # stream interval).
    tokens_per_chunk: int = 1
    # Decode: the pdserve KV outcome reported in non-streamed answers to remote-prefill
    # requests, as a pdserve decode worker does (None: say nothing, as stock vLLM does).
    kv_outcome: str | None = None
    # Prefill: fields merged into the kv_transfer_params it hands out (e.g. a real KV server).
    kv_params_override: dict[str, Any] = field(default_factory=dict)
    # Non-streamed answers report this prefix-cache hit as
    # usage.prompt_tokens_details.cached_tokens, as vLLM does with
    # --enable-prompt-tokens-details (None: no such field, as vLLM without it).
    cached_tokens: int | None = None
    # What /metrics says in vllm:cache_config_info (the proxy's cache-aware routing reads it).
    block_size: int = 16
    prefix_caching_hash_algo: str = "sha256"
    record: bool = True
    faults: Faults = field(default_factory=Faults)
    requests: list[RecordedRequest] = field(default_factory=list)
    # Generate requests whose client (the proxy) went away before the answer ended.
    disconnects: int = 0
    # kv_transfer_params handed out by a prefill worker, in order.
    kv_issued: list[dict[str, Any]] = field(default_factory=list)
    # The exact bytes of every streamed response body sent.
    streams: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count()
        self.disconnected = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def generate_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith("/v1/") and r.method == "POST"]

    # -- handlers -----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        self._record(request, None)
        return web.Response(status=503 if self.faults.unhealthy else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        self._record(request, None)
        text = (
            "# TYPE vllm:cache_config_info gauge\n"
            f'vllm:cache_config_info{{block_size="{self.block_size}",enable_prefix_caching="True",'
            f'prefix_caching_hash_algo="{self.prefix_caching_hash_algo}"}} 1.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, None)
        card = {
            "id": self.model,
            "object": "model",
            "created": 0,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": 4096,
        }
        return web.Response(
            body=_dumps({"object": "list", "data": [card]}), content_type="application/json"
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            return await self._answer(request, chat)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            self.disconnected.set()
            raise

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._record(request, None)
            return _error(400, "invalid JSON")
        self._record(request, body)
        faults = self.faults
        if faults.gate is not None:
            await faults.gate.wait()
        if faults.hang:
            await asyncio.Event().wait()
        if faults.delay_s:
            await asyncio.sleep(faults.delay_s)
        if faults.fail_requests > 0:
            faults.fail_requests -= 1
            return _error(faults.fail_status, f"injected failure {faults.fail_status}")
        if body.get("model") not in (None, self.model):
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        kv_in = body.get("kv_transfer_params") or {}
        n = int(body.get("n") or 1)
        if self.role == "prefill":
            count = 1
        else:
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            count = int(limit) if limit else self.tokens
        request_id = request.headers.get("X-Request-Id") or f"fake-{next(self._ids)}"
        kv_out = None
        wants_kv = kv_in.get("do_remote_decode") and not faults.omit_kv_transfer_params
        if self.role == "prefill" and wants_kv:
            kv_out = self._kv_transfer_params(request_id)
            if self.record:
                self.kv_issued.append(kv_out)
        elif self.kv_outcome is not None and kv_in.get(kvp.DO_REMOTE_PREFILL):
            kv_out = kvp.DecodeOutcome(self.kv_outcome).to_params()
        prompt_ids = _prompt_ids(body, chat)
        # vLLM's UsageInfo field order.
        usage: dict[str, Any] = {
            "prompt_tokens": len(prompt_ids),
            "total_tokens": len(prompt_ids) + count * n,
            "completion_tokens": count * n,
        }
        if body.get("stream"):
            return await self._stream(request, body, chat, request_id, prompt_ids, count, n)
        output = _generate(prompt_ids, count)
        text = "".join(_token_text(t) for t in output)
        choices = [_choice(chat, index, text, "length") for index in range(n)]
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        payload = {
            "id": ("chatcmpl-" if chat else "cmpl-") + request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "kv_transfer_params": kv_out,
        }
        return web.Response(body=_dumps(payload), content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        request_id: str,
        prompt_ids: list[int],
        count: int,
        n: int,
    ) -> web.StreamResponse:
        """The SSE body vLLM 0.32's serving code writes (``completion_stream_generator``,
        ``chat_completion_stream_generator``), chunk for chunk and byte for byte."""
        faults = self.faults
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await out.prepare(request)
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
        }
        want_ids = bool(body.get("return_token_ids"))
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        continuous = include_usage and bool(options and options.get("continuous_usage_stats"))
        prompt_len = len(prompt_ids)
        output = _generate(prompt_ids, count)
        if faults.first_chunk_delay_s:
            await asyncio.sleep(faults.first_chunk_delay_s)
        sent = 0
        log = bytearray()
        slot = len(self.streams)
        if self.record:
            self.streams.append(b"")

        async def emit(data: bytes) -> None:
            await out.write(data)
            if self.record:
                log.extend(data)
                self.streams[slot] = bytes(log)

        async def event(chunk: dict[str, Any] | None) -> bool:
            """Send one event (None: data: [DONE]); False once a fault cut the stream."""
            nonlocal sent
            data = b"data: " + (_dumps(chunk) if chunk is not None else b"[DONE]") + b"\n\n"
            if faults.drop_after_chunks is not None and sent >= faults.drop_after_chunks:
                assert request.transport is not None
                if faults.drop_inside_event:
                    await emit(data[: len(data) // 2])
                    # Flushed, then closed without the body's last chunk: the half
                    # surely arrives, where a reset might overtake it.
                    request.transport.close()
                else:
                    request.transport.abort()
                return False
            if faults.stall_after_chunks is not None and sent >= faults.stall_after_chunks:
                await asyncio.Event().wait()
            await emit(data)
            sent += chunk is not None
            return True

        def with_usage(chunk: dict[str, Any], completion: int) -> dict[str, Any]:
            if continuous:
                usage: dict[str, Any] = _usage(prompt_len, completion)
                if chat:  # set explicitly (to None) by vLLM's chat code, so written
                    usage["completion_tokens_details"] = None
                chunk["usage"] = usage
            return chunk

        if chat:
            for index in range(n):
                role: dict[str, Any] = {
                    "index": index, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None,
                }  # fmt: skip
                chunk = with_usage({**head, "choices": [role]}, 0)
                chunk["prompt_token_ids"] = prompt_ids if want_ids else None
                chunk["prompt_text"] = None
                if not await event(chunk):
                    return out
        step = max(1, self.tokens_per_chunk)
        for start in range(0, count, step):
            ids = output[start : start + step]
            text = "".join(_token_text(t) for t in ids)
            finish = "length" if start + step >= count else None
            for index in range(n):
                choice: dict[str, Any]
                if chat:
                    choice = {"index": index, "delta": {"content": text}, "logprobs": None}
                    choice["finish_reason"] = finish
                    if finish is not None:
                        choice["stop_reason"] = None
                else:
                    choice = {
                        "index": index, "text": text, "logprobs": None,
                        "finish_reason": finish, "stop_reason": None,
                        "prompt_token_ids": prompt_ids if want_ids and start == 0 else None,
                    }  # fmt: skip
                choice["token_ids"] = ids if want_ids else None
                chunk = with_usage({**head, "choices": [choice]}, start + len(ids))
                if not await event(chunk):
                    return out
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
        if include_usage and not await event(
            {**head, "choices": [], "usage": _usage(prompt_len, count * n)}
        ):
            return out
        if not await event(None):
            return out
        await out.write_eof()
        return out

    def _kv_transfer_params(self, request_id: str) -> dict[str, Any]:
        # The fields a vLLM NIXL-style producer returns from request_finished().
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": f"fake-engine-{self.port}",
            "remote_request_id": f"{request_id}-{next(self._ids):08x}",
            "remote_host": self.host,
            "remote_port": self.port + 7000,
            "remote_block_ids": [[1, 2, 3]],
            "remote_blocks_expiry_time": time.time() + 30.0,
            "tp_size": 1,
            "block_size": 16,
            "transfer_mode": "fake-nixl",
            **self.kv_params_override,
        }

    def _record(self, request: web.Request, body: Any) -> None:
        if self.record:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.requests.append(
                RecordedRequest(
                    request.method,
                    request.path,
                    CIMultiDict(request.headers),
                    body,
                    tuple(peer[:2]) if peer else None,
                )
            )


def _dumps(payload: Any) -> bytes:
    return orjson.dumps(payload)


def _generate(prefix: list[int], count: int) -> list[int]:
    """``count`` output token ids after ``prefix``, each a function of the prefix before it."""
    done = sum(1 for t in prefix if t >= GENERATED_BASE)
    return [GENERATED_BASE + done + i for i in range(count)]


def _token_text(token_id: int) -> str:
    if token_id >= GENERATED_BASE:
        return f" tok{token_id - GENERATED_BASE}"
    return f" w{token_id}"


def _word_id(word: str) -> int:
    # Stable across processes (unlike hash()), so every fake worker tokenizes alike.
    return 1000 + zlib.crc32(word.encode()) % (GENERATED_BASE - 1000)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def _choice(chat: bool, index: int, text: str, finish: str) -> dict[str, Any]:
    if chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _prompt_ids(body: dict[str, Any], chat: bool) -> list[int]:
    """The prompt as token ids: one per word of a text prompt (of each message's content
    for chat), a token-id prompt as it is (the first prompt of a batch)."""
    if chat:
        messages = body.get("messages") or []
        words = [
            word
            for m in messages
            if isinstance(m, dict)
            for word in str(m.get("content", "")).split()
        ]
        return [_word_id(word) for word in words]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return [_word_id(word) for word in prompt.split()]
    if isinstance(prompt, list):
        return [t for t in prompt if isinstance(t, int)]
    return []


def _error(status: int, message: str) -> web.Response:
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    if status == 404:
        kind = "NotFoundError"
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.Response(status=status, body=_dumps(body), content_type="application/json")


async def _serve(args: argparse.Namespace) -> None:
    worker = FakeWorker(
        role=args.role,
        host=args.host,
        port=args.port,
        model=args.model,
        tokens=args.tokens,
        token_delay_s=args.token_delay_ms / 1000.0,
        record=False,
    )
    await worker.start()
    print(f"fake {worker.role} worker on {worker.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fake vLLM worker for proxy tests and benchmarks")
    parser.add_argument("--role", choices=ROLES, default="decode")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--tokens", type=int, default=16, help="output tokens without max_tokens")
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
