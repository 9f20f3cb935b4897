"""The pdserve proxy as a Ray actor.

The actor runs :class:`proxy.server.ProxyServer` on its own event loop and starts with
an empty instance list: the controller fills the registry through the admin API as
instances become ready, so the proxy never reads a hand-written list of workers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


class ProxyHost:
    """Body of the proxy actor (an async actor, wrapped with ``ray.remote``)."""

    def __init__(self, config: dict[str, Any], kv_secret: str = "") -> None:
        from proxy.config import ProxyConfig

        self._config = ProxyConfig.model_validate(config)
        if kv_secret:
            # The cluster's KV secret (the proxy releases prefill blocks of failed decode
            # legs with it). The proxy reads it from the environment like a worker does; this
            # actor's process is its own, so the variable reaches nothing else.
            from kv_transfer.config import SECRET_ENV, SECRET_FILE_ENV

            os.environ[SECRET_ENV] = kv_secret
            os.environ.pop(SECRET_FILE_ENV, None)
        self._server: Any = None

    async def ensure_started(self) -> bool:
        """Start the server unless it runs; True when it was (re)started just now.

        After Ray restarts this actor the server is down and its registry empty; the
        controller calls this on every reconcile pass and re-registers the instances.
        """
        if self._server is not None:
            return False
        from proxy.server import ProxyServer

        server = ProxyServer(self._config)
        await server.start()
        self._server = server
        logger.info("proxy listening on %s:%d", self._config.host, self._config.port)
        return True

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    def ping(self) -> bool:
        return self._server is not None
