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
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from kv_transfer import params as kvp
from proxy.config import RetryConfig, TimeoutConfig
from proxy.errors import ProxyError, UnreadableBody
from proxy.health import HealthTracker
from proxy.instances import Instance, Role
from proxy.kv_release import KVReleaser
from proxy.metrics import ProxyMetrics
from proxy.registry import InstanceRegistry
from proxy.request import ClientRequest, Endpoint, dumps_body
from proxy.routing.base import RoutingPolicy, RoutingRequest
from proxy.upstream import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

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
    routing: RoutingRequest
    deadline: float  # loop time after which no attempt starts (retries.deadline_s)
    # Decode instances (URLs) whose leg failed for this request: never tried again.
    failed_decodes: tuple[str, ...] = ()
    retries: int = 0  # moves to another decode instance
    # The last failed decode attempt's error, answered when no further attempt is made.
    error: ProxyError | UpstreamReply | None = None


@dataclass(slots=True)
class _Stream:
    """Per-request relay state the error handlers need after the deadline fires."""

    out: web.StreamResponse | None = None
    last_chunk: bytes = b""


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
    ) -> None:
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
        self._timeout_counters = {
            stage: metrics.timeouts.labels(stage)
            for stage in ("connect", "prefill", "first_byte", "stall")
        }
        self._prefill_retries = metrics.retries.labels("prefill")
        self._decode_retries = metrics.retries.labels("decode")
        # By whether the moved request ended with HTTP 200.
        self._migrations = {
            ok: metrics.migrations.labels("before_first_byte", "succeeded" if ok else "failed")
            for ok in (True, False)
        }

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
        )
        status = 500
        try:
            response, status, path = await self._serve(state, path)
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
            self._metrics.count_request(endpoint, model, status, path.value)
            elapsed = asyncio.get_running_loop().time() - started
            self._metrics.e2e.labels(endpoint, model, path.value).observe(elapsed)
            if state.retries:
                self._migrations[status == 200].inc(state.retries)

    def _choose_path(self, req: ClientRequest) -> RoutePath:
        if not req.single_sequence or req.prompt_tokens < self._disagg_min:
            return RoutePath.AGGREGATED
        if self._registry.routable(Role.PREFILL):
            return RoutePath.DISAGGREGATED
        if self._registry.instances(Role.PREFILL):
            return RoutePath.FALLBACK
        return RoutePath.AGGREGATED

    async def _serve(
        self, state: _RequestState, path: RoutePath
    ) -> tuple[web.StreamResponse, int, RoutePath]:
        """Prefill leg (when disaggregated), then decode leg; both again, on another decode
        instance, for as long as the decode leg fails before the client has a byte and
        ``retries`` allows."""
        req = state.req
        load = req.prompt_tokens + req.max_tokens
        while True:
            # Checked before the prefill leg: prefilling for a request no one can decode
            # would only strand KV blocks on the prefill instance.
            if not self._decode_candidates(state):
                raise state.error or ProxyError(503, "no healthy decode instance")
            body = req.raw
            prefilled_at: float | None = None
            kv_params: dict[str, Any] | None = None
            if path is RoutePath.DISAGGREGATED:
                kv_params = await self._prefill_with_retry(state)
                if kv_params is None:  # the prefill pool emptied meanwhile
                    path = RoutePath.FALLBACK
                else:
                    prefilled_at = asyncio.get_running_loop().time()
                    body = with_kv_transfer_params(req, kv_params)
            status = 500
            try:
                candidates = self._decode_candidates(state)
                if not candidates:
                    raise state.error or ProxyError(503, "no healthy decode instance")
                instance = self._select(self._decode, candidates, state.routing)
                instance.in_flight_requests += 1
                instance.in_flight_tokens += load
                try:
                    response, status = await self._decode_leg(
                        state, instance, body, path, prefilled_at
                    )
                    return response, status, path
                except (ProxyError, UpstreamReply) as failure:
                    backoff = self._retry_after(state, instance, failure)
                    if backoff is None:
                        raise
                finally:
                    instance.in_flight_requests -= 1
                    instance.in_flight_tokens -= load
            finally:
                if kv_params is not None and status != 200 and self._kv_releaser is not None:
                    # The decode leg did not complete: its blocks may never be read. Released
                    # now, not when the request ends: a retry leaves them behind for good.
                    # Releasing blocks a decode did read (or still reads) is harmless.
                    self._kv_releaser.release_soon(kv_params)
            if backoff:
                await asyncio.sleep(backoff)

    def _decode_candidates(self, state: _RequestState) -> list[Instance]:
        candidates = self._registry.routable(Role.DECODE)
        if state.failed_decodes:
            candidates = [c for c in candidates if c.url not in state.failed_decodes]
        return candidates

    def _retry_after(
        self, state: _RequestState, instance: Instance, failure: ProxyError | UpstreamReply
    ) -> float | None:
        """Record a decode leg that failed before the client had a byte; the wait before the
        request moves to another decode instance, or None when it may not move."""
        state.failed_decodes += (instance.url,)
        state.error = failure
        retry = self._retry
        if state.retries + 1 >= retry.decode_attempts:
            return None
        backoff = min(retry.backoff_s * 2**state.retries, retry.backoff_max_s)
        if asyncio.get_running_loop().time() + backoff >= state.deadline:
            return None
        if not self._decode_candidates(state):
            return None
        state.retries += 1
        self._decode_retries.inc()
        if isinstance(failure, ProxyError):
            reason = failure.message
        else:
            reason = f"it answered HTTP {failure.status}: {failure.body[:200]!r}"
        log.warning(
            "request %s: decode instance %s failed before the client had a byte (%s); "
            "moving the request to another decode instance (move %d of at most %d)",
            state.request_id, instance.url, reason, state.retries, retry.decode_attempts - 1,
        )  # fmt: skip
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

        None when no prefill instance is routable at all.
        """
        body = prefill_body(state.req)
        failed: Instance | None = None
        error: ProxyError | None = None
        for attempt in range(2):
            candidates = self._registry.routable(Role.PREFILL)
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
        instance.in_flight_requests += 1
        instance.in_flight_tokens += tokens
        instance.queued_prompt_tokens += tokens
        url = instance.url
        try:
            async with asyncio.timeout(budget):
                upstream = await self._pool.request(
                    url, b"POST", state.req.endpoint.path_bytes, body, state.headers
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
        return params

    # -- decode leg ---------------------------------------------------------------------

    async def _decode_leg(
        self,
        state: _RequestState,
        instance: Instance,
        body: bytes,
        path: RoutePath,
        prefilled_at: float | None,
    ) -> tuple[web.StreamResponse, int]:
        """Relay the decode instance's answer to the client.

        Raises ProxyError or UpstreamReply (a 5xx answer) only while the client has no byte
        yet: another decode instance may then serve the request. Once a stream has started,
        a failure ends it with an SSE error event instead.
        """
        loop = asyncio.get_running_loop()
        metrics = self._metrics
        req = state.req
        request_id = state.request_id
        routing = state.routing
        url = instance.url
        stream = _Stream()
        sent = loop.time()
        budget = min(self._timeouts.first_byte_s, state.deadline - sent)
        if budget <= 0:
            raise self._deadline_passed(state, "decode")
        if prefilled_at is not None:
            metrics.stage_handoff.observe(sent - prefilled_at)
        upstream: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(budget) as deadline:
                upstream = await self._pool.request(
                    url, b"POST", req.endpoint.path_bytes, body, state.headers
                )
                if not (req.stream and upstream.status == 200):
                    data = await upstream.read()
                    metrics.stage_decode_first_token.observe(loop.time() - sent)
                    if upstream.status == 200:
                        self._decode.policy.observe(instance, routing, loop.time() - sent)
                        if prefilled_at is not None:
                            metrics.kv_handoff_outcomes[handoff_outcome(data)].inc()
                    elif upstream.status in _RETRYABLE_DECODE_STATUSES:
                        raise UpstreamReply(upstream.status, data, upstream.content_type)
                    response = web.Response(
                        status=upstream.status,
                        body=data,
                        headers={
                            "Content-Type": upstream.content_type,
                            "X-Request-Id": request_id,
                        },
                    )
                    return response, upstream.status
                chunk = await upstream.next_chunk()
                if not chunk:
                    raise ProxyError(502, f"decode instance {url} ended the stream without data")
                now = loop.time()
                metrics.stage_decode_first_token.observe(now - sent)
                out = web.StreamResponse(
                    headers={
                        "Content-Type": upstream.content_type,
                        "Cache-Control": "no-cache",
                        "X-Request-Id": request_id,
                    }
                )
                stream.out = out
                tail = b""
                try:
                    await out.prepare(state.http)
                    if upstream.at_end:
                        tail = chunk
                    else:
                        await out.write(chunk)
                except ConnectionResetError:
                    raise ClientGone(out) from None
                stream.last_chunk = chunk
                if prefilled_at is not None:
                    # vLLM streams carry no kv_transfer_params; the decode's own
                    # pdserve_kv_recomputed_* counters cover these.
                    metrics.kv_handoff_outcomes["unreported"].inc()
                endpoint = req.endpoint.value
                model = metrics.model_label(req.model, served=True)  # the decode answered 200
                ttft = loop.time() - state.started
                metrics.ttft.labels(endpoint, model, path.value).observe(ttft)
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
                    stream.last_chunk = chunk
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
            self._decode.policy.observe(instance, routing, loop.time() - sent)
            try:
                await out.write_eof(tail)
            except ConnectionResetError:
                raise ClientGone(out) from None
            return out, 200
        except UpstreamConnectTimeout:
            self._timeout_counters["connect"].inc()
            self._health.record_failure(instance, "connect timeout")
            raise ProxyError(
                504, f"connecting to decode instance {url} timed out "
                f"after {self._timeouts.connect_s:g}s",
            ) from None  # fmt: skip
        except UpstreamConnectError as exc:
            self._health.record_failure(instance, str(exc))
            raise ProxyError(502, f"cannot connect to decode instance {url}: {exc}") from None
        except UpstreamError as exc:
            error = ProxyError(502, f"decode instance {url} failed: {_describe(exc)}")
            if stream.out is None:
                raise error from None
            return await _end_stream_with_error(stream, error)
        except TimeoutError:
            if stream.out is None:
                self._timeout_counters["first_byte"].inc()
                raise ProxyError(
                    504, f"decode instance {url} sent nothing within "
                    f"{self._within(budget, self._timeouts.first_byte_s)}",
                ) from None  # fmt: skip
            self._timeout_counters["stall"].inc()
            error = ProxyError(
                504, f"decode instance {url} stalled for more than {self._timeouts.stall_s:g}s"
            )
            return await _end_stream_with_error(stream, error)
        finally:
            if upstream is not None:
                # A no-op after a complete read; otherwise it drops the connection,
                # which makes vLLM abort the request.
                upstream.close()


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


def with_kv_transfer_params(req: ClientRequest, params: dict[str, Any]) -> bytes:
    """The client's bytes with ``kv_transfer_params`` appended, without re-serialising.

    ``parse_client_request`` removed any the client sent, so the key appears once."""
    raw = req.raw.rstrip()
    return raw[:-1] + _FIELD_PREFIX + orjson.dumps(params) + b"}"


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


async def _end_stream_with_error(
    stream: _Stream, error: ProxyError
) -> tuple[web.StreamResponse, int]:
    out = stream.out
    assert out is not None
    # Close a half-relayed event first, or the client would glue the error onto it.
    separator = b"" if stream.last_chunk.endswith(b"\n\n") else b"\n\n"
    try:
        await out.write(separator + error.sse_event())
        await out.write_eof()
    except ConnectionResetError:
        raise ClientGone(out) from None
    return out, error.status


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
