"""The served model list, fetched from the decode pool and cached.

``/v1/models`` answers from the cache and requests naming a model no decode
instance serves get a 404 like vLLM's. While no decode instance has answered yet,
model names are not checked (the workers will check them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson

from proxy.background import supervised
from proxy.errors import ProxyError
from proxy.instances import Instance, Role
from proxy.registry import InstanceRegistry
from proxy.upstream import UpstreamError, UpstreamPool

CACHE_TTL_S = 10.0
FETCH_TIMEOUT_S = 2.0
# After a failed fetch, wait this long before asking again (requests do not pile up on it).
RETRY_AFTER_S = 1.0


log = logging.getLogger(__name__)


class ModelCatalog:
    def __init__(
        self,
        registry: InstanceRegistry,
        pool: UpstreamPool,
        on_models: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        """``on_models(ids)`` is called with every model list fetched."""
        self._registry = registry
        self._pool = pool
        self._on_models = on_models
        self._body: bytes | None = None
        self._ids: frozenset[str] | None = None
        # max_model_len by model id, as the cards say (vLLM's cards carry it).
        self._context_lengths: dict[str, int] = {}
        self._fetched_at = 0.0
        self._attempted_at = -RETRY_AFTER_S
        self._refreshing: asyncio.Task[None] | None = None

    async def models_body(self) -> bytes:
        """The ``/v1/models`` response of a healthy decode instance."""
        if self._body is None or self._stale():
            await self.refresh()
        if self._body is None:
            raise ProxyError(503, "no decode instance answered /v1/models")
        return self._body

    async def check_model(self, model: str | None) -> None:
        """Raises ProxyError(404) for a model the decode pool does not serve."""
        if model is None:
            return
        if self._ids is None:
            await self.refresh()
        elif self._stale():
            self._refresh_in_background()
        if self._ids is not None and model not in self._ids:
            # The pool may have just gained the model (a LoRA load, a new instance).
            await self.refresh()
            if self._ids is not None and model not in self._ids:
                raise ProxyError(404, f"The model `{model}` does not exist.", "model")

    def context_length(self, model: str | None) -> int | None:
        """The model's context length from the last model list (a request naming no model
        means the only one served); None when unknown. Never fetches."""
        lengths = self._context_lengths
        if model is None:
            return next(iter(lengths.values())) if len(lengths) == 1 else None
        return lengths.get(model)

    async def refresh(self) -> None:
        """Fetch the list now (concurrent callers share one fetch; failures back off)."""
        task = self._refreshing
        if task is None or task.done():
            now = time.monotonic()
            if now - self._attempted_at < RETRY_AFTER_S:
                return
            self._attempted_at = now
            task = self._refreshing = asyncio.create_task(self._fetch())
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        # A background task: nothing awaits it when a stale list is refreshed, so an
        # unexpected error with one instance is logged and the next one is asked.
        for instance in self._registry.routable(Role.DECODE):
            with supervised(log, "fetching /v1/models from %s", instance.url):
                if await self._fetch_from(instance):
                    return

    async def _fetch_from(self, instance: Instance) -> bool:
        try:
            status, body = await self._pool.get(instance.url, "/v1/models", FETCH_TIMEOUT_S)
        except (UpstreamError, TimeoutError, OSError):
            return False
        if status != 200:
            return False
        try:
            data = orjson.loads(body)
            cards = [card for card in data["data"] if isinstance(card.get("id"), str)]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return False
        ids = frozenset(card["id"] for card in cards)
        self._context_lengths = {
            card["id"]: card["max_model_len"]
            for card in cards
            if isinstance(card.get("max_model_len"), int)
        }
        self._body, self._ids, self._fetched_at = body, ids, time.monotonic()
        if self._on_models is not None:
            self._on_models(ids)
        return True

    async def stop(self) -> None:
        task, self._refreshing = self._refreshing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched_at > CACHE_TTL_S

    def _refresh_in_background(self) -> None:
        task = self._refreshing
        now = time.monotonic()
        if (task is None or task.done()) and now - self._attempted_at >= RETRY_AFTER_S:
            self._attempted_at = now
            self._refreshing = asyncio.create_task(self._fetch())
