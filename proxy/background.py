"""The proxy's background loops: one lifecycle for all of them, and supervision.

A loop is an :class:`BackgroundTask` owned by a component with explicit ``start`` and
``stop``; every iteration runs under :func:`supervised`, so an unexpected error is logged
with what was being done and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any


@contextlib.contextmanager
def supervised(logger: logging.Logger, what: str, *args: object) -> Iterator[None]:
    """Run one iteration of a background loop: an unexpected error is logged, with a
    traceback and ``what % args``, instead of ending the loop. Cancellation passes."""
    try:
        yield
    except Exception:
        logger.exception("unexpected error in " + what + "; carrying on", *args)


class BackgroundTask:
    """One named task running ``run()``: started at most once until stopped; ``stop``
    cancels it and waits until it has finished (its ``finally`` blocks have run)."""

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
