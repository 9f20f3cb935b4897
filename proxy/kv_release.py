"""Frees a prefill instance's KV blocks when the proxy knows no decode leg will read them.

The decode leg failed before the client got a byte (connect refused, an error answer, a
timeout, the client went away, no decode instance left): the prefill instance would hold
the prompt's blocks until its lease ends. The proxy tells its block server to release them
at once, authenticated like any decode instance, on a control connection (no KV access).
A release of blocks already released or never held is harmless, so the proxy may send one
whenever the outcome is in doubt. Only pdserve workers' params are acted on; stock vLLM
workers (other transfer modes) are left to their own timeouts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter

from kv_transfer import params as kvp
from kv_transfer import wire
from kv_transfer.block_client import BlockClient, ClientSettings

logger = logging.getLogger(__name__)

OUTCOMES = ("released", "not_held", "failed")


class KVReleaser:
    """Sends releases off the event loop (a blocking client in a thread), tracked as tasks
    of this object so ``stop`` leaves none behind."""

    def __init__(self, secret: bytes, counter: Counter, timeout_s: float = 2.0) -> None:
        self._client = BlockClient(
            ClientSettings(secret=secret, connect_timeout_s=timeout_s, io_timeout_s=timeout_s),
            None,
        )
        self._outcomes = {outcome: counter.labels(outcome) for outcome in OUTCOMES}
        self._tasks: set[asyncio.Task[None]] = set()

    def release_soon(self, params: dict[str, Any]) -> None:
        try:
            remote = kvp.RemotePrefill.parse(params)
        except kvp.ParamsError:
            return  # not ours (stock vLLM) or nothing to address
        task = asyncio.get_running_loop().create_task(self._release(remote))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, remote: kvp.RemotePrefill) -> None:
        endpoints = [(remote.host, remote.port + r) for r in range(max(1, remote.tp_size))]
        for endpoint in endpoints:
            try:
                known = await asyncio.to_thread(self._client.release, endpoint, remote.request_id)
            except (wire.WireError, wire.RemoteError, OSError) as exc:
                self._outcomes["failed"].inc()
                logger.warning(
                    "could not release KV of %s at %s:%d: %s", remote.request_id, *endpoint, exc
                )
            except Exception:
                self._outcomes["failed"].inc()
                logger.exception("releasing KV of %s at %s:%d failed", remote.request_id, *endpoint)
            else:
                self._outcomes["released" if known else "not_held"].inc()

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._client.close)
