"""ProxyServer: wires the registry, policies, upstream pool, health checks and listeners
together behind an explicit async start()/stop().

Embedders (the Ray deployment) construct one, ``await start()``, then feed it
instances through :attr:`registry` (or ``add_instance`` / ``remove_instance`` /
``drain_instance`` / ``undrain_instance``); the admin API drives the same registry.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.admin import AdminAPI
from proxy.api import PublicAPI
from proxy.block_hashes import HashSettings
from proxy.catalog import ModelCatalog
from proxy.config import InstanceEntry, ProxyConfig
from proxy.hash_settings import HashSettingsProbe
from proxy.health import HealthChecker, HealthTracker
from proxy.hit_check import HitCheck
from proxy.instances import Instance, KvEventsEndpoint, Role
from proxy.kv_events import KV_INDEX_KEY, KVEventSubscriber
from proxy.kv_index import KVIndex
from proxy.kv_release import KVReleaser
from proxy.metrics import ProxyMetrics
from proxy.pd_flow import PDFlow, RoutedPolicy
from proxy.registry import InstanceRegistry
from proxy.routing import load_policy
from proxy.routing.base import RoutingPolicy
from proxy.tokenizer import RoutingTokenizer
from proxy.upstream import UpstreamPool

log = logging.getLogger(__name__)

# Streams still open at stop() get this long to finish before they are cut.
SHUTDOWN_GRACE_S = 5.0


class _ServerLog:
    """The logger aiohttp's HTTP server reports to (``RequestHandler(logger=...)``).

    aiohttp logs every request its HTTP parser refuses (bad framing, an unknown method) at
    ERROR with a traceback, although it answers it with a 400, and does the same when a body
    that does not decode fails its drain after the answer ("Unhandled exception"): any client
    could fill the log with tracebacks. Those are the client's fault: one line at INFO.
    Anything else keeps ERROR and its traceback, a ``RequestPayloadError`` out of a handler
    (a 500) included."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def exception(self, msg: str, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        drained = isinstance(exc, web.RequestPayloadError) and msg == "Unhandled exception"
        if isinstance(exc, HttpProcessingError) or drained:
            detail = " ".join(str(exc).split())[:300]
            self._log.info(msg + " (a malformed request): %s", *args, detail)
        else:
            self._log.exception(msg, *args, exc_info=exc_info, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


_SERVER_LOG = _ServerLog(logging.getLogger("aiohttp.server"))


class ProxyServer:
    def __init__(
        self,
        config: ProxyConfig,
        *,
        prefill_policy: RoutingPolicy | None = None,
        decode_policy: RoutingPolicy | None = None,
    ) -> None:
        """Policies default to the config's; ValueError names a bad policy or URL."""
        self.config = config
        self.registry = InstanceRegistry()
        for role, items in ((Role.PREFILL, config.prefill), (Role.DECODE, config.decode)):
            for item in items:
                entry = InstanceEntry.of(item)
                try:
                    self.registry.add(entry.url, role, entry.kv_events)
                except ValueError as exc:
                    # One line naming the field, as the CLI prints config errors.
                    raise ValueError(f"{role.value}: {exc}") from None
        self.metrics = ProxyMetrics(self.registry.instances)
        self._prefill = RoutedPolicy(
            Role.PREFILL,
            config.prefill_policy.name,
            prefill_policy
            or load_policy(config.prefill_policy.name, config.prefill_policy.options),
        )
        self._decode = RoutedPolicy(
            Role.DECODE,
            config.decode_policy.name,
            decode_policy or load_policy(config.decode_policy.name, config.decode_policy.options),
        )
        self.registry.on_remove(self._forget)
        self._pool = UpstreamPool(
            config.upstream_keepalive_s,
            config.timeouts.connect_s,
            config.upstream_max_connections_per_instance,
        )
        self._kv_releaser = KVReleaser(config.kv_secret(), self.metrics.kv_releases)
        self._tracker = HealthTracker(self.registry, config.health, self.metrics)
        self.health_checker = HealthChecker(self.registry, self._pool, config.health, self._tracker)
        self._catalog = ModelCatalog(self.registry, self._pool, self.metrics.set_known_models)
        # Which prefix blocks each instance holds, from its KV events (None: subscription
        # off). For routing code; kept off the request path by its own tasks.
        self.kv_index: KVIndex | None = None
        self.kv_events: KVEventSubscriber | None = None
        events = config.kv_events
        if events.subscribe:
            self.kv_index = KVIndex(
                events.max_blocks_per_instance, events.max_instances, block_size=events.block_size
            )
            self.kv_events = KVEventSubscriber(
                self.registry, self.kv_index, events, self.metrics.registry
            )
        # Cache-aware routing (a policy with needs_kv_index): the engines' hash settings, read
        # from their /metrics, and the model's tokenizer. None, and no work, otherwise.
        self.hash_settings: HashSettingsProbe | None = None
        self.routing_tokenizer: RoutingTokenizer | None = None
        # Predicted against observed prefix-cache hits, and the instances routed on load alone
        # while they disagree; with cache-aware routing only.
        self.hit_check: HitCheck | None = None
        self._bind_kv_policies()
        self._runners: list[web.AppRunner] = []
        self.port: int | None = None
        self.admin_port: int | None = None

    def _bind_kv_policies(self) -> None:
        config = self.config
        routed = [r for r in (self._prefill, self._decode) if r.policy.needs_kv_index]
        if config.prefill_bypass is not None and not self._decode.policy.needs_kv_index:
            raise ValueError(
                f"prefill_bypass skips the prefill leg when the chosen decode instance caches "
                f"the prompt: it needs a cache-aware decode_policy (kv_cache), not "
                f"{self._decode.name}"
            )
        if not routed:
            return
        names = ", ".join(sorted({r.name for r in routed}))
        if self.kv_index is None:
            raise ValueError(
                f"routing policy {names} routes on the engines' KV events: it needs "
                f"kv_events.subscribe: true"
            )
        tokenizer_config = config.routing_tokenizer
        self.hash_settings = HashSettingsProbe(
            self.registry,
            self._pool,
            pythonhashseed=tokenizer_config.engine_pythonhashseed if tokenizer_config else None,
            interval_s=config.health.interval_s,
            timeout_s=max(config.health.timeout_s, 5.0),
        )
        self.hit_check = HitCheck(
            self.kv_index,
            self.hash_settings.settings_for,
            config.cache_check,
            self.metrics,
        )
        for item in routed:
            item.policy.bind_kv_index(self.kv_index, self.hit_check.settings_for)
        if tokenizer_config is None:
            log.warning(
                "routing policy %s without routing_tokenizer: only token-id prompts get block "
                "keys; text and chat prompts are routed on load alone",
                names,
            )
        self.routing_tokenizer = RoutingTokenizer(
            tokenizer_config.model_dir if tokenizer_config else None,
            tokenizer_config.workers if tokenizer_config else 1,
            self.metrics.registry,
        )

    def _hash_reference(self) -> HashSettings | None:
        return self.hash_settings.reference if self.hash_settings is not None else None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._runners:
            raise RuntimeError("ProxyServer is already started")
        try:
            await self._start_listeners()
        except BaseException:
            await self.stop()
            raise
        await self.health_checker.start()
        if self.kv_events is not None:
            await self.kv_events.start()
        if self.routing_tokenizer is not None:
            await self.routing_tokenizer.start()
        if self.hash_settings is not None:
            await self.hash_settings.start()
        log.info("proxy listening on %s (admin: %s)", self.url, self.admin_url or "off")

    async def stop(self) -> None:
        if self.hash_settings is not None:
            await self.hash_settings.stop()
        if self.kv_events is not None:
            await self.kv_events.stop()
        await self.health_checker.stop()
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        await self._catalog.stop()
        await self._kv_releaser.stop()
        await self._pool.close()
        if self.routing_tokenizer is not None:
            self.routing_tokenizer.close()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def admin_url(self) -> str | None:
        if self.admin_port is None:
            return None
        return f"http://{self.config.admin.host}:{self.admin_port}"

    # -- instances ----------------------------------------------------------------------

    def add_instance(
        self, url: str, role: Role | str, kv_events: KvEventsEndpoint | None = None
    ) -> Instance:
        return self.registry.add(url, role, kv_events)

    def remove_instance(self, url: str) -> Instance:
        return self.registry.remove(url)

    def drain_instance(self, url: str) -> Instance:
        return self.registry.drain(url)

    def undrain_instance(self, url: str) -> Instance:
        return self.registry.undrain(url)

    def _forget(self, instance: Instance) -> None:
        routed = self._prefill if instance.role is Role.PREFILL else self._decode
        routed.policy.forget(instance)
        self.metrics.forget_instance(instance.role, instance.url)
        if self.hit_check is not None:
            self.hit_check.forget(instance)

    # -- wiring -------------------------------------------------------------------------

    async def _start_listeners(self) -> None:
        config = self.config
        flow = PDFlow(
            registry=self.registry,
            pool=self._pool,
            prefill=self._prefill,
            decode=self._decode,
            metrics=self.metrics,
            health=self._tracker,
            timeouts=config.timeouts,
            disagg_min_prompt_tokens=config.disagg_min_prompt_tokens,
            kv_releaser=self._kv_releaser,
            retries=config.retries,
            context_length=self._catalog.context_length,
            tokenizer=self.routing_tokenizer,
            hash_settings=self._hash_reference if self.hash_settings is not None else None,
            hit_check=self.hit_check,
            prefill_bypass=config.prefill_bypass,
            send_token_ids=bool(
                config.routing_tokenizer is not None and config.routing_tokenizer.send_token_ids
            ),
        )
        public = PublicAPI(
            flow=flow,
            catalog=self._catalog,
            registry=self.registry,
            metrics=self.metrics,
            max_body_bytes=config.max_body_bytes,
        )
        app = web.Application(client_max_size=config.max_body_bytes)
        if self.kv_index is not None:
            app[KV_INDEX_KEY] = self.kv_index
        public.install(app)
        admin = AdminAPI(self.registry, config.admin.token)
        if config.admin.port is None and config.admin.token:
            admin.install(app)
        public.install_fallback(app)
        self.port = await self._listen(app, config.host, config.port)
        if config.admin.port is not None:
            admin_app = web.Application()
            admin.install(admin_app)
            public.install_fallback(admin_app)
            self.admin_port = await self._listen(admin_app, config.admin.host, config.admin.port)

    async def _listen(self, app: web.Application, host: str, port: int) -> int:
        # handler_cancellation: a client that disconnects cancels its handler, which
        # closes both upstream legs at once (vLLM aborts the request on disconnect).
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_S,
            logger=_SERVER_LOG,
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        return int(runner.addresses[-1][1])
