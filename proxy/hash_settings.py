"""Each instance's prefix-cache hash settings, read from the engine, never assumed.

A cache-aware policy compares a prompt's block keys with the blocks an instance's KV events
reported, which only match when the proxy hashes exactly as that engine does
(``proxy.block_hashes.HashSettings``). Block size and hash algorithm come from the engine's
``/metrics``: the labels of its ``vllm:cache_config_info`` line (``block_size``,
``prefix_caching_hash_algo``, ``enable_prefix_caching``). The NONE_HASH seed is not exposed
over HTTP: it is ``resolve_none_hash_seed(algo, PYTHONHASHSEED)``, and pdserve's worker
launch leaves ``PYTHONHASHSEED`` unset, so the seed is vLLM's default for the sha256
algorithms; engines started with ``PYTHONHASHSEED`` need ``routing_tokenizer.
engine_pythonhashseed`` set to the same value. (With an xxhash algorithm and no
PYTHONHASHSEED an engine's hashes are random per process: the instance stays unknown.)
``block_size`` is taken as the hash block size: true for single-KV-cache-group models without
decode context parallelism, which is what ``proxy.block_hashes`` targets.

A background task (supervised like the health checks) reads each instance once, the first
time it is healthy, and again after it was re-registered; never on the request path. The
first settings read become the proxy's reference, the ones it hashes prompts with; an
instance whose settings differ (or whose engine has no prefix caching) is logged once and
stays unknown, so routing treats it as caching nothing. Until an instance is known it is
routed on load alone.
"""

from __future__ import annotations

import asyncio
import logging
import re

from proxy.background import BackgroundTask, supervised
from proxy.block_hashes import HashSettings, resolve_none_hash_seed
from proxy.instances import Instance
from proxy.registry import InstanceRegistry
from proxy.upstream import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

_INFO_LINE = re.compile(r"^vllm:cache_config_info\{(?P<labels>.*)\}\s", re.M)
_LABEL = re.compile(r'(?P<name>[A-Za-z_][A-Za-z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def parse_cache_config_info(metrics_text: str) -> dict[str, str] | None:
    """The labels of the first ``vllm:cache_config_info`` sample, or None if there is none."""
    match = _INFO_LINE.search(metrics_text)
    if match is None:
        return None
    return {
        m.group("name"): m.group("value").replace('\\"', '"').replace("\\\\", "\\")
        for m in _LABEL.finditer(match.group("labels"))
    }


def settings_from_labels(labels: dict[str, str], pythonhashseed: str | None) -> HashSettings:
    """HashSettings from ``vllm:cache_config_info`` labels; ValueError says what is missing."""
    if labels.get("enable_prefix_caching", "True") not in ("True", "true", "1"):
        raise ValueError("prefix caching is off on this engine")
    size = labels.get("block_size", "")
    if not size.isdigit():
        raise ValueError(f"no usable block_size label ({size!r})")
    algo = labels.get("prefix_caching_hash_algo")
    if not algo:
        raise ValueError("no prefix_caching_hash_algo label")
    return HashSettings(int(size), algo, resolve_none_hash_seed(algo, pythonhashseed))


class HashSettingsProbe:
    """Reads every instance's hash settings once (see the module docstring)."""

    def __init__(
        self,
        registry: InstanceRegistry,
        pool: UpstreamPool,
        *,
        pythonhashseed: str | None = None,
        interval_s: float = 2.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._registry = registry
        self._pool = pool
        self._seed = pythonhashseed
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        # By URL: the Instance object read (a re-registered URL is read again) and what
        # it uses; None when its settings are unusable (logged once).
        self._known: dict[str, tuple[Instance, HashSettings | None]] = {}
        self.reference: HashSettings | None = None
        self._loop = BackgroundTask("pdserve-hash-settings", self._run)
        registry.on_remove(self._on_remove)

    # -- reading -------------------------------------------------------------------------

    def settings_for(self, url: str) -> HashSettings | None:
        """The reference settings if ``url``'s engine uses them, else None."""
        known = self._known.get(url)
        if known is None or known[1] is None or known[1] != self.reference:
            return None
        return known[1]

    def learn(self, instance: Instance, labels: dict[str, str] | None) -> HashSettings | None:
        """Record what ``instance``'s /metrics said (None: no cache_config_info line)."""
        settings: HashSettings | None = None
        try:
            if labels is None:
                raise ValueError("its /metrics has no vllm:cache_config_info line")
            settings = settings_from_labels(labels, self._seed)
        except ValueError as exc:
            log.warning(
                "hash settings of %s instance %s unusable (%s): cache-aware routing treats "
                "it as caching nothing", instance.role, instance.url, exc,
            )  # fmt: skip
        if settings is not None:
            if self.reference is None:
                self.reference = settings
                log.info("prefix-cache hash settings (from %s): %s", instance.url, settings)
            elif settings != self.reference:
                log.warning(
                    "%s instance %s hashes blocks with %s, not %s like the first instance "
                    "read: cache-aware routing treats it as caching nothing",
                    instance.role, instance.url, settings, self.reference,
                )  # fmt: skip
        self._known[instance.url] = (instance, settings)
        return settings

    # -- background task -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def probe_all(self) -> None:
        """Read every healthy instance not read yet, concurrently."""
        pending = []
        for instance in self._registry.instances():
            known = self._known.get(instance.url)
            if instance.healthy and (known is None or known[0] is not instance):
                pending.append(instance)
        if pending:
            await asyncio.gather(*(self._probe_supervised(instance) for instance in pending))

    async def _run(self) -> None:
        while True:
            with supervised(log, "hash settings round"):
                await self.probe_all()
            await asyncio.sleep(self._interval_s)

    async def _probe_supervised(self, instance: Instance) -> None:
        with supervised(log, "reading the hash settings of %s", instance.url):
            try:
                status, body = await self._pool.get(instance.url, "/metrics", self._timeout_s)
            except (UpstreamError, TimeoutError, OSError):
                return  # not reachable now: tried again next round
            if status != 200:
                return
            if self._registry.get(instance.url) is not instance:
                return  # removed meanwhile
            self.learn(instance, parse_cache_config_info(body.decode("utf-8", "replace")))

    def _on_remove(self, instance: Instance) -> None:
        known = self._known.get(instance.url)
        if known is not None and known[0] is instance:
            del self._known[instance.url]
