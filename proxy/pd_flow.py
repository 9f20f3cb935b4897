"""One client request through the PD handoff: prefill leg, then decode leg streamed back.

The prefill leg is the client's body with ``stream: false``, ``max_tokens: 1`` (and
``max_completion_tokens: 1`` for chat), no ``min_tokens`` / ``stream_options``, and
``kv_transfer_params: {"do_remote_decode": true}``. The decode leg is the client's
original bytes with the prefill's returned ``kv_transfer_params`` spliced in, so
unknown fields reach the worker exactly as sent. The decode response is relayed
without parsing: its own ``usage`` is the client's usage.

A decode leg that fails before the client has a byte moves the request to another decode
instance (``retries`` in the config), with a fresh prefill leg: the first prefill's
``kv_transfer_params`` are released at once and never offered to a second decode.

A decode leg that dies or stalls once the client's stream has started is continued on
another decode instance from the tokens the client has (``retries.mid_stream``): the
stream's decode legs ask for token ids, and the continuation is a token-id request whose
chunks are rewritten into the client's stream (``proxy.stream_resume``).

While no decode instance is routable but a prefill instance is, a prefill instance (a full
vLLM engine) serves the request whole, as a decode instance serves an aggregated one: the
client's bytes, no ``kv_transfer_params`` (``RoutePath.PREFILL_FALLBACK``). That leg is a
decode leg in all but the instance's role: the same retries, moves and continuations, on
the prefill pool's policy and load accounting, never twice on an instance that failed.

With ``prefill_bypass`` (a cache-aware decode policy) the decode instance is chosen before
the prefill leg, and when its prefix cache holds the prompt but a short tail it serves the
request whole (``RoutePath.CACHE_BYPASS``); otherwise the decode leg goes to that instance
after the prefill leg. With any cache-aware policy, the routed instance's predicted
prefix-cache hit is compared with the one its non-streamed answer reports
(``proxy.hit_check``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from kv_transfer import params as kvp
from proxy.config import PrefillBypassConfig, RetryConfig, TimeoutConfig
from proxy.errors import ProxyError, UnreadableBody
from proxy.health import HealthTracker
from proxy.hit_check import HitCheck, observed_cached_tokens
from proxy.instances import Instance, Role
from proxy.kv_release import KVReleaser
from proxy.metrics import ProxyMetrics
from proxy.registry import InstanceRegistry
from proxy.request import ClientRequest, Endpoint, dumps_body, with_prompt_ids
from proxy.routing.base import RoutingPolicy, RoutingRequest
from proxy.stream_resume import ASK_TOKEN_IDS, Ending, ResumableStream, resume_blocker
from proxy.upstream import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

if TYPE_CHECKING:
    from proxy.block_hashes import HashSettings
    from proxy.tokenizer import RoutingTokenizer

log = logging.getLogger(__name__)

# Status recorded for a request whose client went away before the response ended.
CLIENT_CLOSED_STATUS = 499
_PREFILL_DROPPED_FIELDS = ("min_tokens", "min_completion_tokens", "stream_options")
# Prefill answers worth trying on another instance (the rest of 4xx are the client's fault).
_RETRYABLE_4XX = frozenset({408, 429})
# Decode answers that say the instance is in trouble, not the request: another decode may
# serve it. 4xx are the client's and relayed; 501, 505 and the like would fail anywhere.
_RETRYABLE_DECODE_STATUSES = frozenset({500, 502, 503, 504})


class RoutePath(enum.Enum):
    DISAGGREGATED = "disaggregated"
    AGGREGATED = "aggregated"
    FALLBACK = "fallback"  # disaggregation wanted, but no prefill instance is routable
    # No decode instance is routable: a prefill instance serves the request whole.
    PREFILL_FALLBACK = "prefill_fallback"
    # The decode instance chosen first caches the prompt but a short tail: it serves the
    # request whole, without a prefill leg (prefill_bypass).
    CACHE_BYPASS = "cache_bypass"


class UpstreamReply(Exception):
    """A worker's own error answer (e.g. vLLM's 400), relayed to the client verbatim."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


class ClientGone(Exception):
    """Writing to the client failed: it disconnected."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.response = response


@dataclass(slots=True)
class RoutedPolicy:
    role: Role
    name: str
    policy: RoutingPolicy


@dataclass(slots=True)
class _RequestState:
    """One client request on its way through the flow, across all its attempts."""

    http: web.Request
    req: ClientRequest
    request_id: str
    headers: bytes  # the upstream legs' headers
    started: float  # loop time of arrival
    routing: RoutingRequest  # of the current leg
    deadline: float  # loop time after which no attempt starts (retries.deadline_s)
    path: RoutePath  # as the request is counted: the path of the leg the client got
    # What the next decode leg asks for: the client's request or, after a break
    # mid-stream, the continuation of its answer.
    leg: ClientRequest
    # Instances (URLs) whose serving leg failed for this request (decode instances, or
    # prefill instances serving it whole): never tried again, for any leg.
    failed: tuple[str, ...] = ()
    # Of those, the ones that refused the connection or never answered it: down, not busy.
    unreachable: tuple[str, ...] = ()
    retries: int = 0  # moves to another instance, at either stage
    mid_stream_moves: int = 0  # those made after the client had bytes
    # The last failed decode attempt's error, answered when no further attempt is made.
    error: ProxyError | UpstreamReply | None = None
    # The client's streamed response once its headers went out; legs after a break
    # write on into it.
    out: web.StreamResponse | None = None
    last_chunk: bytes = b""  # the last bytes written to the client
    # What the client has of a stream that can continue elsewhere; None: a break ends it.
    resume: ResumableStream | None = None
    not_resumable: str | None = None  # why not, for the log line at a break
    tokens_at_break: int = -1  # output tokens the client had at the last break


class PDFlow:
    def __init__(
        self,
        *,
        registry: InstanceRegistry,
        pool: UpstreamPool,
        prefill: RoutedPolicy,
        decode: RoutedPolicy,
        metrics: ProxyMetrics,
        health: HealthTracker,
        timeouts: TimeoutConfig,
        disagg_min_prompt_tokens: int,
        kv_releaser: KVReleaser | None = None,
        retries: RetryConfig | None = None,
        context_length: Callable[[str | None], int | None] | None = None,
        tokenizer: RoutingTokenizer | None = None,
        hash_settings: Callable[[], HashSettings | None] | None = None,
        hit_check: HitCheck | None = None,
        prefill_bypass: PrefillBypassConfig | None = None,
        send_token_ids: bool = False,
    ) -> None:
        """``context_length(model)``: the model's context length if known, which a chat
        stream without an output limit needs to continue after a break.

        ``tokenizer`` and ``hash_settings()`` (the settings the engines hash blocks with,
        None until known): given when a policy ``needs_kv_index``; then, and only then, each
        request's block keys are computed (in the tokenizer's pool) before routing.

        ``hit_check``: predicts the routed instance's prefix-cache hit and compares it with
        the engine's answer (with a cache-aware policy). ``prefill_bypass``: the cache-aware
        PD decision, which needs ``hit_check``. ``send_token_ids``: a completions prompt the
        proxy tokenized travels to the engines as those ids (routing_tokenizer.send_token_ids)."""
        self._registry = registry
        self._pool = pool
        self._prefill = prefill
        self._decode = decode
        self._metrics = metrics
        self._health = health
        self._timeouts = timeouts
        self._retry = retries or RetryConfig()
        self._disagg_min = disagg_min_prompt_tokens
        self._kv_releaser = kv_releaser
        self._context_length = context_length
        self._tokenizer = tokenizer
        self._hash_settings = hash_settings
        self._hit_check = hit_check
        self._send_token_ids = send_token_ids
        # The most uncached prompt tokens a decode instance computes itself, skipping the
        # prefill leg; None: the decode instance is chosen after the prefill leg, as always.
        self._bypass_max: int | None = None
        if prefill_bypass is not None:
            if hit_check is None:
                raise ValueError("prefill_bypass needs a cache-aware decode policy (kv_cache)")
            self._bypass_max = prefill_bypass.max_uncached_tokens
        self._needs_keys = (
            tokenizer is not None
            and hash_settings is not None
            and (prefill.policy.needs_kv_index or decode.policy.needs_kv_index)
        )
        self._timeout_counters = {
            stage: metrics.timeouts.labels(stage)
            for stage in ("connect", "prefill", "first_byte", "stall")
        }
        self._prefill_retries = metrics.retries.labels("prefill")
        self._decode_retries = metrics.retries.labels("decode")
        # By stage and by whether the moved request ended with HTTP 200.
        self._migrations = {
            (stage, ok): metrics.migrations.labels(stage, "succeeded" if ok else "failed")
            for stage in ("before_first_byte", "mid_stream")
            for ok in (True, False)
        }
        # Whether the last request routed went to a prefill instance for want of a decode
        # one: the change is logged once each way, not per request.
        self._serving_on_prefill = False

    # -- entry point ------------------------------------------------------------------

    async def run(
        self,
        http_request: web.Request,
        req: ClientRequest,
        request_id: str,
        headers: bytes,
        started: float,
    ) -> web.StreamResponse:
        """Serve the request; never raises except CancelledError (client disconnect)."""
        path = self._choose_path(req)
        state = _RequestState(
            http_request,
            req,
            request_id,
            headers,
            started,
            RoutingRequest(request_id, req.prompt, req.prompt_tokens, req.max_tokens),
            started + self._retry.deadline_s,
            path,
            req,
        )
        status = 500
        try:
            try:
                if self._needs_keys:
                    await self._attach_block_keys(state)
                if req.stream:
                    self._prepare_resume(state)
                response, status = await self._serve(state, path)
            except (ProxyError, UpstreamReply) as failure:
                if state.out is None:
                    raise
                # The client's stream had started: it ends with an SSE error event.
                response, status = await self._end_stream_with_error(state, _stream_error(failure))
            return response
        except ProxyError as exc:
            status = exc.status
            return error_response(exc, request_id)
        except UpstreamReply as reply:
            status = reply.status
            return web.Response(
                status=reply.status,
                body=reply.body,
                headers={"Content-Type": reply.content_type, "X-Request-Id": request_id},
            )
        except ClientGone as gone:
            status = CLIENT_CLOSED_STATUS
            return gone.response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_STATUS
            raise
        finally:
            endpoint = req.endpoint.value
            model = self._metrics.model_label(req.model, served=status == 200)
            path = state.path
            self._metrics.count_request(endpoint, model, status, path.value)
            elapsed = asyncio.get_running_loop().time() - started
            self._metrics.e2e.labels(endpoint, model, path.value).observe(elapsed)
            if state.retries:
                ok = status == 200
                before = state.retries - state.mid_stream_moves
                if before:
                    self._migrations["before_first_byte", ok].inc(before)
                if state.mid_stream_moves:
                    self._migrations["mid_stream", ok].inc(state.mid_stream_moves)

    async def _attach_block_keys(self, state: _RequestState) -> None:
        """The prompt's block keys (and exact token count) on the request's RoutingRequest,
        tokenized and hashed off the event loop; left None (routed on load) when the hash
        settings are not known yet or the prompt cannot be tokenized as the engine would."""
        assert self._tokenizer is not None and self._hash_settings is not None
        settings = self._hash_settings()
        if settings is None:
            return
        keys = await self._tokenizer.prompt_keys(state.req, settings)
        if keys is None:
            return
        state.routing.block_keys = keys.block_keys
        state.routing.prompt_tokens = keys.prompt_tokens
        req = state.req
        if (
            self._send_token_ids
            and keys.token_ids is not None
            and isinstance(req.body.get("prompt"), str)
            and not req.body.get("echo")
        ):
            # The engines read the ids the proxy hashed: they do not tokenize again.
            state.req = state.leg = with_prompt_ids(req, keys.token_ids)
            state.routing.prompt = keys.token_ids

    def _prepare_resume(self, state: _RequestState) -> None:
        """Whether a break mid-stream may continue elsewhere; if so the stream's decode legs
        ask for token ids and the relay keeps track of what the client has."""
        retry = self._retry
        if not retry.mid_stream:
            state.not_resumable = "retries.mid_stream is off"
        elif retry.decode_attempts < 2:
            state.not_resumable = "retries.decode_attempts is 1"
        else:
            state.not_resumable = resume_blocker(state.req)
            if state.not_resumable is None:
                state.resume = ResumableStream(state.req)

    def _choose_path(self, req: ClientRequest) -> RoutePath:
        registry = self._registry
        if not registry.routable(Role.DECODE):
            if registry.routable(Role.PREFILL):
                if not self._serving_on_prefill:
                    self._serving_on_prefill = True
                    log.warning(
                        "no decode instance is routable (%d registered): requests are served "
                        "whole by prefill instances (path %s) until one is",
                        len(registry.instances(Role.DECODE)), RoutePath.PREFILL_FALLBACK.value,
                    )  # fmt: skip
                return RoutePath.PREFILL_FALLBACK
            # Neither pool is routable: the request fails with a 503 (no decode instance).
        elif self._serving_on_prefill:
            self._serving_on_prefill = False
            log.info(
                "decode instances are routable again (%d): requests no longer go to prefill "
                "instances whole", len(registry.routable(Role.DECODE)),
            )  # fmt: skip
        if not req.single_sequence or req.prompt_tokens < self._disagg_min:
            return RoutePath.AGGREGATED
        if registry.routable(Role.PREFILL):
            return RoutePath.DISAGGREGATED
        if registry.instances(Role.PREFILL):
            return RoutePath.FALLBACK
        return RoutePath.AGGREGATED

    def _reroute(self, state: _RequestState, path: RoutePath) -> RoutePath:
        """The path of a further attempt: chosen again when the decode pool emptied, or
        came back, since ``path`` was chosen; whole on a prefill instance when every decode
        instance still routable is unreachable for this request (a lost node, before the
        health checks eject it); otherwise ``path``."""
        if path is RoutePath.CACHE_BYPASS:
            # Decided for the instance that failed: decided again among the others.
            path = self._choose_path(state.leg)
        if bool(self._registry.routable(Role.DECODE)) is (path is RoutePath.PREFILL_FALLBACK):
            return self._choose_path(state.leg)
        if (
            path is not RoutePath.PREFILL_FALLBACK
            and self._decode_pool_unreachable(state)
            and self._candidates(state, Role.PREFILL)
        ):
            return RoutePath.PREFILL_FALLBACK
        return path

    def _decode_pool_unreachable(self, state: _RequestState) -> bool:
        """Every routable decode instance refused or timed out this request's connection.
        Only then does a request go whole to a prefill instance while decodes are routable:
        a decode that answered (an error, a timeout, a broken stream) is busy or failing on
        this request, and moving decode work onto the prefill pool would not help."""
        routable = self._registry.routable(Role.DECODE)
        return bool(routable) and all(i.url in state.unreachable for i in routable)

    async def _serve(self, state: _RequestState, path: RoutePath) -> tuple[web.StreamResponse, int]:
        """Prefill leg (when disaggregated), then decode leg; both again, on another decode
        instance, for as long as the decode leg fails and ``retries`` allows: before the
        client has a byte the request starts over, after it the answer continues from the
        tokens the client has. On ``PREFILL_FALLBACK`` the decode leg goes to a prefill
        instance, which serves the request whole."""
        while True:
            leg = state.leg
            load = leg.prompt_tokens + leg.max_tokens
            whole_on_prefill = path is RoutePath.PREFILL_FALLBACK
            role = Role.PREFILL if whole_on_prefill else Role.DECODE
            # Checked before the prefill leg: prefilling for a request no one can decode
            # would only strand KV blocks on the prefill instance.
            if not self._candidates(state, role):
                raise state.error or ProxyError(503, "no healthy decode instance")
            prefilled_at: float | None = None
            kv_params: dict[str, Any] | None = None
            # The decode instance chosen before the prefill leg (the cache-aware PD
            # decision), its load counted from then on; None: chosen after it.
            chosen: Instance | None = None
            if path is RoutePath.DISAGGREGATED and self._bypass_max is not None:
                chosen, path = self._decode_first(state, load)
            status = 500
            try:
                if path is RoutePath.DISAGGREGATED:
                    kv_params = await self._prefill_with_retry(state)
                    if kv_params is None:  # the prefill pool emptied meanwhile
                        path = RoutePath.FALLBACK
                    else:
                        prefilled_at = asyncio.get_running_loop().time()
                resume = state.resume
                # A continuation asks for token ids itself; the client's request only when
                # the relay needs them and the client did not ask.
                ask_ids = resume is not None and resume.strips and leg is state.req
                body = decode_body(leg, kv_params, ask_ids)
                if state.out is None:
                    state.path = path
                candidates = self._candidates(state, role)
                if not candidates:
                    raise state.error or ProxyError(503, "no healthy decode instance")
                if chosen is not None and any(c is chosen for c in candidates):
                    instance = chosen  # its load is counted already
                else:
                    routed = self._prefill if whole_on_prefill else self._decode
                    instance = self._select(routed, candidates, state.routing)
                    instance.in_flight_requests += 1
                    instance.in_flight_tokens += load
                if chosen is not None and chosen is not instance:
                    # Ejected, drained or removed while the prefill leg ran.
                    chosen.in_flight_requests -= 1
                    chosen.in_flight_tokens -= load
                chosen = None
                try:
                    # A prefill instance's queue holds the prompt until its first byte.
                    queued = leg.prompt_tokens if whole_on_prefill else 0
                    response, status = await self._decode_leg(
                        state, instance, body, path, prefilled_at, queued
                    )
                    return response, status
                except (ProxyError, UpstreamReply) as failure:
                    if state.out is None:
                        backoff = self._retry_after(state, instance, failure)
                        if backoff is None:
                            raise
                    else:
                        step = self._continue_after(state, instance, failure)
                        if isinstance(step, ProxyError):
                            raise step from None
                        if isinstance(step, Ending):
                            return await self._end_stream(state, step.data), 200
                        backoff = step
                        # A continuation is routed like any request: disaggregated unless
                        # its prompt is short or no prefill instance is routable (whole on
                        # a prefill instance while no decode instance is). Its
                        # prompt (the original one plus the tokens so far) is then
                        # prefilled where the original prompt most likely still sits in
                        # the prefix cache, and the new decode instance pulls the KV
                        # instead of computing prompt and output again between the steps
                        # of the requests it decodes.
                        path = self._choose_path(state.leg)
                finally:
                    instance.in_flight_requests -= 1
                    instance.in_flight_tokens -= load
            finally:
                if chosen is not None:  # the attempt failed before its decode leg
                    chosen.in_flight_requests -= 1
                    chosen.in_flight_tokens -= load
                if kv_params is not None and status != 200 and self._kv_releaser is not None:
                    # The decode leg did not complete: its blocks may never be read. Released
                    # now, not when the request ends: a retry leaves them behind for good.
                    # Releasing blocks a decode did read (or still reads) is harmless.
                    self._kv_releaser.release_soon(kv_params)
            if backoff:
                await asyncio.sleep(backoff)
            # The decode pool may have emptied, or come back, during the attempt or the wait.
            path = self._reroute(state, path)

    def _decode_first(self, state: _RequestState, load: int) -> tuple[Instance, RoutePath]:
        """The cache-aware PD decision: the decode instance, chosen before any prefill leg
        by the decode pool's (cache-aware) policy and counted as loaded with the request
        from now on, and the request's path: ``CACHE_BYPASS`` when that instance's prefix
        cache holds some of the prompt and at most ``prefill_bypass.max_uncached_tokens``
        of it are not (the instance serves the request whole), else ``DISAGGREGATED``.
        A short prompt with nothing cached is not a bypass: ``disagg_min_prompt_tokens``
        decides about those. Decided only on an instance whose predictions are trusted."""
        assert self._hit_check is not None and self._bypass_max is not None
        instance = self._select(self._decode, self._candidates(state, Role.DECODE), state.routing)
        instance.in_flight_requests += 1
        instance.in_flight_tokens += load
        routing = state.routing
        if self._hit_check.trusted(instance.url):
            cached = self._hit_check.predict(
                instance.url, routing.block_keys, routing.prompt_tokens
            )
            if cached and routing.prompt_tokens - cached <= self._bypass_max:
                return instance, RoutePath.CACHE_BYPASS
        return instance, RoutePath.DISAGGREGATED

    def _candidates(self, state: _RequestState, role: Role) -> list[Instance]:
        """Routable instances of ``role`` for the request's serving leg, but none it failed on."""
        candidates = self._registry.routable(role)
        if state.failed:
            candidates = [c for c in candidates if c.url not in state.failed]
        return candidates

    def _next_role(self, state: _RequestState) -> Role:
        """The role of the instance a further serving leg goes to (see ``_reroute``)."""
        if not self._registry.routable(Role.DECODE) or self._decode_pool_unreachable(state):
            return Role.PREFILL
        return Role.DECODE

    def _retry_after(
        self, state: _RequestState, instance: Instance, failure: ProxyError | UpstreamReply
    ) -> float | None:
        """Record a decode leg that failed before the client had a byte; the wait before the
        request moves to another decode instance, or None when it may not move."""
        state.failed += (instance.url,)
        state.error = failure
        backoff = self._move_backoff(state)
        if backoff is None:
            return None
        state.retries += 1
        self._decode_retries.inc()
        if isinstance(failure, ProxyError):
            reason = failure.message
        else:
            reason = f"it answered HTTP {failure.status}: {failure.body[:200]!r}"
        log.warning(
            "request %s: %s instance %s failed before the client had a byte (%s); "
            "moving the request to another %s instance (move %d of at most %d)",
            state.request_id, instance.role, instance.url, reason, self._next_role(state),
            state.retries, self._retry.decode_attempts - 1,
        )  # fmt: skip
        return backoff

    def _continue_after(
        self, state: _RequestState, instance: Instance, failure: ProxyError | UpstreamReply
    ) -> float | Ending | ProxyError:
        """Record a decode leg that failed after the client had bytes: the wait before the
        answer continues on another decode instance, the ending the proxy writes itself
        when the stream had all its tokens, or the error the stream ends with."""
        url = instance.url
        state.failed += (url,)
        if isinstance(failure, UpstreamReply):
            error = ProxyError(
                502, f"{instance.role} instance {url} answered HTTP {failure.status} to the "
                f"continuation of the stream: {failure.body[:200]!r}",
            )  # fmt: skip
        else:
            error = failure
        state.error = error
        resume = state.resume
        if resume is None:
            return self._not_continued(state, instance, error, state.not_resumable or "unknown")
        if isinstance(failure, UpstreamReply) and failure.status not in _RETRYABLE_DECODE_STATUSES:
            return self._not_continued(state, instance, error, "the continuation was refused")
        context_length = self._context_length(state.req.model) if self._context_length else None
        step = resume.after_break(context_length)
        if isinstance(step, str):
            return self._not_continued(state, instance, error, step)
        if isinstance(step, Ending):
            log.warning(
                "request %s: %s instance %s failed after the stream's last token (%s); "
                "the proxy ends the stream itself",
                state.request_id, instance.role, url, error.message,
            )  # fmt: skip
            return step
        if step.generated > state.tokens_at_break:
            # New tokens reached the client since the last break: the budget bounds waiting
            # for an answer, not generating a long one, so it starts again here.
            state.tokens_at_break = step.generated
            state.deadline = asyncio.get_running_loop().time() + self._retry.deadline_s
        backoff = self._move_backoff(state)
        if backoff is None:
            return self._not_continued(
                state, instance, error, "no attempt, time or untried instance left"
            )
        leg = step.request
        state.leg = leg
        # The original prompt's block keys, if any, are a prefix of the continuation's (its
        # prompt is the engine's prompt ids plus the output so far): a lower bound of its hits.
        state.routing = RoutingRequest(
            state.request_id,
            leg.prompt,
            leg.prompt_tokens,
            leg.max_tokens,
            state.routing.block_keys,
        )
        state.retries += 1
        state.mid_stream_moves += 1
        self._decode_retries.inc()
        log.warning(
            "request %s: %s instance %s failed mid-stream after %d output tokens (%s); "
            "continuing the stream on another %s instance (move %d of at most %d)",
            state.request_id, instance.role, url, step.generated, error.message,
            self._next_role(state), state.retries, self._retry.decode_attempts - 1,
        )  # fmt: skip
        return backoff

    def _not_continued(
        self, state: _RequestState, instance: Instance, error: ProxyError, why: str
    ) -> ProxyError:
        log.warning(
            "request %s: %s instance %s failed mid-stream (%s); the stream ends with an "
            "error: it cannot continue elsewhere (%s)",
            state.request_id, instance.role, instance.url, error.message, why,
        )  # fmt: skip
        return error

    def _move_backoff(self, state: _RequestState) -> float | None:
        """The wait before the request's next move to another instance, or None when
        ``retries`` allows none (attempts, deadline) or no untried instance is left: a
        decode instance, or while none is routable, a prefill instance to serve it whole."""
        retry = self._retry
        if state.retries + 1 >= retry.decode_attempts:
            return None
        backoff = min(retry.backoff_s * 2**state.retries, retry.backoff_max_s)
        if asyncio.get_running_loop().time() + backoff >= state.deadline:
            return None
        if not self._candidates(state, self._next_role(state)):
            return None
        return backoff

    def _select(
        self, routed: RoutedPolicy, candidates: list[Instance], routing: RoutingRequest
    ) -> Instance:
        instance = routed.policy.select(candidates, routing)
        counter = self._metrics.decisions.get((routed.role, instance.url))
        if counter is None:
            counter = self._metrics.decision_counter(routed.role, routed.name, instance.url)
        counter.inc()
        return instance

    def _predicted_hit(self, instance: Instance, routing: RoutingRequest) -> int | None:
        """The prompt tokens ``instance``'s prefix cache is predicted to hold (for the hit
        check), or None when the proxy checks nothing or has nothing to predict from."""
        if self._hit_check is None or not routing.block_keys:
            return None
        return self._hit_check.predict(instance.url, routing.block_keys, routing.prompt_tokens)

    def _check_hit(self, instance: Instance, predicted: int, answer: bytes) -> None:
        """Compare the prediction with the hit the engine reports in its answer, if any."""
        observed = observed_cached_tokens(answer)
        if observed is not None:
            assert self._hit_check is not None
            self._hit_check.record(instance, predicted, observed)

    def _deadline_passed(self, state: _RequestState, leg: str) -> ProxyError:
        return ProxyError(
            504,
            f"request {state.request_id} used up its {self._retry.deadline_s:g}s deadline "
            f"before its {leg} leg could start",
        )

    def _within(self, budget: float, stage_s: float) -> str:
        """How long a leg was given (its stage timeout, or less when the request's deadline
        came first), for error messages."""
        if budget < stage_s:
            return f"{budget:.2f}s (what was left of the request's {self._retry.deadline_s:g}s)"
        return f"{stage_s:g}s"

    # -- prefill leg --------------------------------------------------------------------

    async def _prefill_with_retry(self, state: _RequestState) -> dict[str, Any] | None:
        """kv_transfer_params from a prefill instance, trying a second one once (within the
        request's deadline).

        None when no prefill instance is routable at all (none that did not fail the
        request while serving it whole, either).
        """
        body = prefill_body(state.leg)
        failed: Instance | None = None
        error: ProxyError | None = None
        for attempt in range(2):
            candidates = self._candidates(state, Role.PREFILL)
            if failed is not None:
                candidates = [c for c in candidates if c is not failed]
            if not candidates:
                break
            if attempt:
                if asyncio.get_running_loop().time() >= state.deadline:
                    break
                self._prefill_retries.inc()
            instance = self._select(self._prefill, candidates, state.routing)
            outcome = await self._prefill_once(state, instance, body)
            if isinstance(outcome, dict):
                return outcome
            error, failed = outcome, instance
        if error is not None:
            raise error
        return None

    async def _prefill_once(
        self, state: _RequestState, instance: Instance, body: bytes
    ) -> dict[str, Any] | ProxyError:
        loop = asyncio.get_running_loop()
        routing = state.routing
        sent = loop.time()
        # The stage's timeout, cut to what is left of the request's deadline.
        budget = min(self._timeouts.prefill_s, state.deadline - sent)
        if budget <= 0:
            return self._deadline_passed(state, "prefill")
        tokens = routing.prompt_tokens
        predicted = self._predicted_hit(instance, routing)
        instance.in_flight_requests += 1
        instance.in_flight_tokens += tokens
        instance.queued_prompt_tokens += tokens
        url = instance.url
        try:
            async with asyncio.timeout(budget):
                upstream = await self._pool.request(
                    url, b"POST", state.leg.endpoint.path_bytes, body, state.headers
                )
                try:
                    data = await upstream.read()
                except BaseException:
                    upstream.close()
                    raise
        except UpstreamConnectTimeout:
            self._timeout_counters["connect"].inc()
            self._health.record_failure(instance, "connect timeout")
            return ProxyError(
                504, f"connecting to prefill instance {url} timed out "
                f"after {self._timeouts.connect_s:g}s",
            )  # fmt: skip
        except UpstreamConnectError as exc:
            self._health.record_failure(instance, str(exc))
            return ProxyError(502, f"cannot connect to prefill instance {url}: {exc}")
        except UpstreamError as exc:
            return ProxyError(502, f"prefill instance {url} failed: {_describe(exc)}")
        except TimeoutError:
            self._timeout_counters["prefill"].inc()
            return ProxyError(
                504,
                f"prefill instance {url} did not answer within "
                f"{self._within(budget, self._timeouts.prefill_s)}",
            )
        finally:
            instance.in_flight_requests -= 1
            instance.in_flight_tokens -= tokens
            instance.queued_prompt_tokens -= tokens
        elapsed = loop.time() - sent
        status = upstream.status
        if status != 200:
            if 400 <= status < 500 and status not in _RETRYABLE_4XX:
                raise UpstreamReply(status, data, upstream.content_type)
            return ProxyError(502, f"prefill instance {url} answered HTTP {status}: {data[:200]!r}")
        try:
            params = orjson.loads(data).get(kvp.FIELD)
        except (orjson.JSONDecodeError, AttributeError):
            params = None
        if not isinstance(params, dict):
            return ProxyError(502, f"prefill instance {url} returned no kv_transfer_params")
        self._metrics.stage_prefill.observe(elapsed)
        self._prefill.policy.observe(instance, routing, elapsed)
        if predicted is not None:
            self._check_hit(instance, predicted, data)
        return params

    # -- decode leg ---------------------------------------------------------------------

    async def _decode_leg(
        self,
        state: _RequestState,
        instance: Instance,
        body: bytes,
        path: RoutePath,
        prefilled_at: float | None,
        queued: int = 0,
    ) -> tuple[web.StreamResponse, int]:
        """Relay the decode instance's answer to the client (or, on ``PREFILL_FALLBACK``,
        the answer of a prefill instance serving the request whole).

        Raises ProxyError, or UpstreamReply (a 5xx answer; any other than 200 to a
        continuation), when the leg fails: before the client has a byte, the request may
        then start over on another decode instance; after it, the answer may continue on
        one (see ``_serve``). ``queued``: prompt tokens counted in the instance's
        ``queued_prompt_tokens`` until its first byte.
        """
        loop = asyncio.get_running_loop()
        metrics = self._metrics
        leg = state.leg
        resume = state.resume
        routing = state.routing
        url = instance.url
        what = f"{instance.role} instance {url}"  # for error messages
        # The routing policy that learns from this leg: a prefill instance's policy
        # models prefill legs, which a request served whole is not.
        policy = self._decode.policy if instance.role is Role.DECODE else None
        sent = loop.time()
        budget = min(self._timeouts.first_byte_s, state.deadline - sent)
        if budget <= 0:
            raise self._deadline_passed(state, "decode")
        if prefilled_at is not None:
            metrics.stage_handoff.observe(sent - prefilled_at)
        upstream: UpstreamResponse | None = None
        streaming = False  # this leg's first chunk came: a silence from now on is a stall
        # The prefix-cache hit predicted for a request this instance computes whole (not a
        # continuation, whose block keys cover only the original prompt).
        predicted = None
        if prefilled_at is None and leg is state.req and not leg.stream:
            predicted = self._predicted_hit(instance, routing)
        instance.queued_prompt_tokens += queued
        try:
            async with asyncio.timeout(budget) as deadline:
                upstream = await self._pool.request(
                    url, b"POST", leg.endpoint.path_bytes, body, state.headers
                )
                if not (leg.stream and upstream.status == 200):
                    data = await upstream.read()
                    metrics.stage_decode_first_token.observe(loop.time() - sent)
                    instance.queued_prompt_tokens -= queued
                    queued = 0
                    if state.out is not None:
                        # Refused a continuation: the client's stream is under way, so
                        # the answer is never relayed as one of its own.
                        raise UpstreamReply(upstream.status, data, upstream.content_type)
                    if upstream.status == 200:
                        if policy is not None:
                            policy.observe(instance, routing, loop.time() - sent)
                        if predicted is not None:
                            self._check_hit(instance, predicted, data)
                        if prefilled_at is not None:
                            metrics.kv_handoff_outcomes[handoff_outcome(data)].inc()
                    elif upstream.status in _RETRYABLE_DECODE_STATUSES:
                        raise UpstreamReply(upstream.status, data, upstream.content_type)
                    response = web.Response(
                        status=upstream.status,
                        body=data,
                        headers={
                            "Content-Type": upstream.content_type,
                            "X-Request-Id": state.request_id,
                        },
                    )
                    return response, upstream.status
                chunk = await upstream.next_chunk()
                instance.queued_prompt_tokens -= queued
                queued = 0
                if resume is not None:
                    chunk = await _first_events(upstream, resume, chunk)
                if not chunk:
                    raise ProxyError(502, f"{what} ended the stream without data")
                streaming = True
                now = loop.time()
                metrics.stage_decode_first_token.observe(now - sent)
                out = state.out
                first_leg = out is None
                if out is None:
                    out = state.out = web.StreamResponse(
                        headers={
                            "Content-Type": upstream.content_type,
                            "Cache-Control": "no-cache",
                            "X-Request-Id": state.request_id,
                        }
                    )
                tail = b""
                try:
                    if first_leg:
                        await out.prepare(state.http)
                    if upstream.at_end:
                        tail = chunk
                    else:
                        await out.write(chunk)
                except ConnectionResetError:
                    raise ClientGone(out) from None
                state.last_chunk = chunk
                if prefilled_at is not None:
                    # vLLM streams carry no kv_transfer_params; the decode's own
                    # pdserve_kv_recomputed_* counters cover these.
                    metrics.kv_handoff_outcomes["unreported"].inc()
                endpoint = state.req.endpoint.value
                model = metrics.model_label(state.req.model, served=True)  # the decode said 200
                if first_leg:
                    ttft = loop.time() - state.started
                    metrics.ttft.labels(endpoint, model, state.path.value).observe(ttft)
                itl = metrics.itl.labels(endpoint, model)
                transport = state.http.transport
                if transport is None:
                    raise ClientGone(out)
                # A write waits for the client only if something is already queued for it
                # or the chunk alone could fill the buffer past its high-water mark.
                backlog = transport.get_write_buffer_size
                big = transport.get_write_buffer_limits()[1] // 2
                stall_s = self._timeouts.stall_s
                # Re-arming the deadline costs a timer; doing it only once it has slid by
                # a tenth of the budget keeps stall detection within 10 % of stall_s.
                slack = stall_s / 10
                armed = now
                deadline.reschedule(now + stall_s)
                last = now
                while not upstream.at_end:
                    chunk = await upstream.next_chunk()
                    if not chunk:
                        break
                    now = loop.time()
                    itl.observe(now - last)
                    last = now
                    if now - armed > slack:
                        deadline.reschedule(now + stall_s)
                        armed = now
                    if resume is not None:
                        # Whole events only, without the token ids the client did not ask
                        # for; part of an event waits for the rest.
                        chunk = resume.feed(chunk)
                        if not chunk:
                            continue
                    state.last_chunk = chunk
                    if upstream.at_end:
                        tail = chunk  # goes out with the end-of-stream marker
                        break
                    try:
                        if backlog() or len(chunk) > big:
                            # A slow reader is not a decode stall: the deadline measures
                            # only waits for the instance, so it stops while the write
                            # waits for the client and restarts once it is done.
                            deadline.reschedule(None)
                            await out.write(chunk)
                            armed = loop.time()
                            deadline.reschedule(armed + stall_s)
                        else:
                            await out.write(chunk)  # cannot wait: nothing is queued
                    except ConnectionResetError:
                        raise ClientGone(out) from None
            if resume is not None:
                tail += resume.flush()
            if policy is not None:
                policy.observe(instance, routing, loop.time() - sent)
            try:
                await out.write_eof(tail)
            except ConnectionResetError:
                raise ClientGone(out) from None
            return out, 200
        except UpstreamConnectTimeout:
            self._timeout_counters["connect"].inc()
            self._health.record_failure(instance, "connect timeout")
            state.unreachable += (url,)
            raise ProxyError(
                504, f"connecting to {what} timed out after {self._timeouts.connect_s:g}s",
            ) from None  # fmt: skip
        except UpstreamConnectError as exc:
            self._health.record_failure(instance, str(exc))
            state.unreachable += (url,)
            raise ProxyError(502, f"cannot connect to {what}: {exc}") from None
        except UpstreamError as exc:
            raise ProxyError(502, f"{what} failed: {_describe(exc)}") from None
        except TimeoutError:
            if not streaming:
                self._timeout_counters["first_byte"].inc()
                raise ProxyError(
                    504, f"{what} sent nothing within "
                    f"{self._within(budget, self._timeouts.first_byte_s)}",
                ) from None  # fmt: skip
            self._timeout_counters["stall"].inc()
            raise ProxyError(
                504, f"{what} stalled for more than {self._timeouts.stall_s:g}s"
            ) from None
        finally:
            instance.queued_prompt_tokens -= queued
            if upstream is not None:
                # A no-op after a complete read; otherwise it drops the connection,
                # which makes vLLM abort the request.
                upstream.close()

    async def _end_stream(self, state: _RequestState, data: bytes) -> web.StreamResponse:
        """End the client's stream with ``data`` (the rest of a complete answer)."""
        out = state.out
        assert out is not None
        try:
            await out.write_eof(data)
        except ConnectionResetError:
            raise ClientGone(out) from None
        return out

    async def _end_stream_with_error(
        self, state: _RequestState, error: ProxyError
    ) -> tuple[web.StreamResponse, int]:
        # Close a half-relayed event first, or the client would glue the error onto it.
        separator = b"" if state.last_chunk.endswith(b"\n\n") else b"\n\n"
        await self._end_stream(state, separator + error.sse_event())
        assert state.out is not None
        return state.out, error.status


async def _first_events(upstream: UpstreamResponse, resume: ResumableStream, chunk: bytes) -> bytes:
    """The first complete events of a stream the relay keeps track of: vLLM's first chunk
    may reach the proxy in pieces, and the client must never be left half an event."""
    resume.drop_partial()
    events = resume.feed(chunk)
    while not events and chunk and not upstream.at_end:
        chunk = await upstream.next_chunk()
        events = resume.feed(chunk)
    if upstream.at_end:
        events += resume.flush()
    return events


def _stream_error(failure: ProxyError | UpstreamReply) -> ProxyError:
    """A failure after the client's stream started, as the SSE error event ending it."""
    if isinstance(failure, ProxyError):
        return failure
    return ProxyError(
        502, f"continuing the stream failed: an instance answered HTTP {failure.status}: "
        f"{failure.body[:200]!r}",
    )  # fmt: skip


def prefill_body(req: ClientRequest) -> bytes:
    body = dict(req.body)
    body["stream"] = False
    body["max_tokens"] = 1
    if req.endpoint is Endpoint.CHAT:
        body["max_completion_tokens"] = 1
    for field in _PREFILL_DROPPED_FIELDS:
        body.pop(field, None)
    body[kvp.FIELD] = kvp.prefill_leg_params()
    return dumps_body(body)


_FIELD_PREFIX = b',"' + kvp.FIELD.encode() + b'":'


def decode_body(req: ClientRequest, kv_params: dict[str, Any] | None, ask_token_ids: bool) -> bytes:
    """The request's bytes with ``kv_transfer_params`` (and ``return_token_ids``) appended,
    without re-serialising.

    ``parse_client_request`` removed any ``kv_transfer_params`` the client sent, so the key
    appears once; a client's own ``return_token_ids`` (then false) is overridden by the later
    key, as JSON parsers read duplicates."""
    if kv_params is None and not ask_token_ids:
        return req.raw
    parts = [req.raw.rstrip()[:-1]]
    if ask_token_ids:
        parts.append(ASK_TOKEN_IDS)
    if kv_params is not None:
        parts += (_FIELD_PREFIX, orjson.dumps(kv_params))
    parts.append(b"}")
    return b"".join(parts)


_OUTCOME_MARKERS = tuple(
    (outcome, f'"{kvp.OUTCOME}":"{outcome}"'.encode())
    for outcome in (kvp.Outcome.RECOMPUTED, kvp.Outcome.LOCAL_CACHE, kvp.Outcome.TRANSFERRED)
)


def handoff_outcome(decode_body: bytes) -> str:
    """What a decode worker says happened to the prompt's KV, from its non-streamed answer.

    A byte search, not a parse: the answer is relayed as is, and vLLM writes compact JSON."""
    for outcome, marker in _OUTCOME_MARKERS:
        if marker in decode_body:
            return outcome
    return "unreported"


def error_response(error: ProxyError, request_id: str | None = None) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    response = web.Response(status=error.status, body=error.body(), headers=headers)
    if isinstance(error, UnreadableBody):
        # aiohttp drops the connection after this answer: say so, or a client that pools
        # connections would send its next request down a closing one.
        response.force_close()
    return response


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
