"""Active health checks, ejection after consecutive failures, re-admission on recovery.

Every ``interval_s`` each registered instance gets ``GET /health``. An instance that
fails ``failures_to_eject`` checks in a row is ejected (routing never sees it); an
ejected one that passes ``successes_to_readmit`` checks in a row is routable again.
The request flow also reports connection failures here, so a dead instance is
ejected as soon as requests notice, not only at the next check. Any answer but 200
(a 503 while the engine is down, a 500) is a failed check.

The checks run in a :class:`proxy.background.BackgroundTask`, each round supervised.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.background import BackgroundTask, supervised
from proxy.config import HealthConfig
from proxy.instances import Instance
from proxy.metrics import ProxyMetrics
from proxy.registry import InstanceRegistry
from proxy.upstream import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)


class HealthTracker:
    """Counts consecutive successes and failures and flips ``Instance.healthy``."""

    def __init__(
        self, registry: InstanceRegistry, config: HealthConfig, metrics: ProxyMetrics
    ) -> None:
        self._registry = registry
        self._config = config
        self._metrics = metrics

    def record_success(self, instance: Instance) -> None:
        if instance.healthy:
            instance.consecutive_failures = 0
            return
        instance.consecutive_successes += 1
        if instance.consecutive_successes >= self._config.successes_to_readmit:
            instance.consecutive_failures = 0
            instance.consecutive_successes = 0
            self._registry.set_healthy(instance, True)
            log.warning("re-admitted %s instance %s", instance.role, instance.url)

    def record_failure(self, instance: Instance, reason: str) -> None:
        instance.consecutive_successes = 0
        instance.consecutive_failures += 1
        if instance.healthy and instance.consecutive_failures >= self._config.failures_to_eject:
            self._registry.set_healthy(instance, False)
            if self._registry.get(instance.url) is instance:
                # A check or request that ends after the instance was removed must not
                # bring back the series removal dropped.
                self._metrics.ejections.labels(instance.role.value, instance.url).inc()
            log.warning(
                "ejected %s instance %s after %d consecutive failures (last: %s)",
                instance.role,
                instance.url,
                instance.consecutive_failures,
                reason,
            )


class HealthChecker:
    def __init__(
        self,
        registry: InstanceRegistry,
        pool: UpstreamPool,
        config: HealthConfig,
        tracker: HealthTracker,
    ) -> None:
        self._registry = registry
        self._pool = pool
        self._config = config
        self._tracker = tracker
        self._loop = BackgroundTask("pdserve-health-checker", self._run)

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def check_all(self) -> None:
        """One round over every registered instance, concurrently."""
        instances = self._registry.instances()
        if instances:
            await asyncio.gather(*(self._check_supervised(instance) for instance in instances))

    async def _run(self) -> None:
        while True:
            with supervised(log, "health check round"):
                await self.check_all()
            await asyncio.sleep(self._config.interval_s)

    async def _check_supervised(self, instance: Instance) -> None:
        """One instance's check; an unexpected error counts as a failed check."""
        failed = True
        with supervised(log, "health check of %s instance %s", instance.role, instance.url):
            await self._check(instance)
            failed = False
        if failed:
            self._tracker.record_failure(instance, "unexpected error checking it (logged)")

    async def _check(self, instance: Instance) -> None:
        try:
            status, _ = await self._pool.get(instance.url, "/health", self._config.timeout_s)
        except (UpstreamError, TimeoutError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._tracker.record_failure(instance, reason)
            return
        if status == 200:
            self._tracker.record_success(instance)
        else:
            self._tracker.record_failure(instance, f"/health answered {status}")
