"""The cluster controller: a detached, named Ray actor that owns one xPyD deployment.

It creates one placement group per pool (and one more per scale-up step), launches an
instance actor (:mod:`deploy.instance_actor`) per prefill/decode instance and the proxy
actor (:mod:`deploy.proxy_actor`), and every ``reconcile_interval_s`` pushes the set of
ready instances into the proxy through the proxy's admin API. The proxy therefore learns
its upstreams from Ray, and after a proxy restart its registry is refilled within one
pass. Instance and proxy actors are owned by the controller: they share its fate.

Taking an instance out of service never drops requests on purpose: ``scale`` down and
``restart`` first drain it in the proxy (nothing new is routed there) and wait, up to
``controller.drain_timeout_s``, until its in-flight requests have finished and, for a
prefill instance, until decode instances have pulled the KV blocks it holds. Whatever is
still in flight when the worker stops is moved by the proxy to another instance (a decode
leg that fails before its first byte is retried elsewhere, a broken stream continues on
another decode instance, a failed prefill leg is retried on another prefill instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from deploy.instance_actor import InstancePlan
from deploy.topology import Topology, validate_topology
from deploy.worker_launch import port_is_free

logger = logging.getLogger(__name__)

CONTROLLER_NAME = "pdserve-controller"
ROLES = ("prefill", "decode")
# A pool's placement group that cannot be placed within this time never will be.
_PLACEMENT_TIMEOUT_S = 30.0
_ACTOR_CALL_TIMEOUT_S = 10.0
# Stopping a worker waits up to 20 s for a graceful exit (worker_launch.stop_worker), then
# up to 15 s for its ports; the new process starts within seconds.
_RESTART_CALL_TIMEOUT_S = 120.0
_DRAIN_POLL_S = 0.2
_METRICS_TIMEOUT_S = 3.0


class ControllerError(RuntimeError):
    """A request to the controller cannot be honoured; the message is user-facing."""


@dataclass
class InstanceRecord:
    plan: InstancePlan
    actor: Any
    group: str  # key into Controller._groups
    # launching | running | draining (being retired) | restarting (planned restart) | failed
    state: str = "launching"
    ever_ready: bool = False
    url: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def registration(record: InstanceRecord) -> dict[str, Any]:
    """The admin API's ``POST /admin/instances`` body that registers ``record``'s instance:
    its URL and role, and where it publishes KV events (as its actor reported them)."""
    payload: dict[str, Any] = {"url": record.url, "role": record.plan.role}
    kv_events = record.info.get("kv_events")
    if kv_events is not None:
        payload["kv_events"] = kv_events
    return payload


@dataclass(frozen=True)
class DrainResult:
    """How the wait for a drained instance to empty ended."""

    seconds: float
    timed_out: bool
    in_flight_requests: int  # the proxy's count when the wait ended
    kv_blocks_held: int | None  # prefill only; None when not read (decode, no metric)


@dataclass
class _Group:
    placement_group: Any
    members: set[str] = field(default_factory=set)


class Controller:
    """Body of the controller actor (an async actor, wrapped with ``ray.remote``)."""

    def __init__(self, topology: dict[str, Any], run_dir: str, kv_secret: str = "") -> None:
        # `pdserve up` resolves (or generates) the KV secret and hands it over apart from the
        # topology, which `topology()` reports: the secret only goes into instance plans.
        given = validate_topology(topology, source="controller")
        self._kv_secret = kv_secret or given.configured_kv_secret(env={})
        self._topology: Topology = validate_topology(given.without_secrets(), source="controller")
        self._run_dir = run_dir
        self._records: dict[str, InstanceRecord] = {}
        self._groups: dict[str, _Group] = {}
        self._group_seq = 0
        self._core_use: Counter[int] = Counter()
        self._proxy: Any = None
        self._reconciler: asyncio.Task[None] | None = None
        self._http: Any = None
        self._sync_lock: asyncio.Lock | None = None
        self._scale_lock: asyncio.Lock | None = None
        self._last_sd: dict[str, list[str]] | None = None
        self._shutting_down = False

    # -- lifecycle ------------------------------------------------------------------

    def ping(self) -> str:
        return "ok"

    def urls(self) -> dict[str, str]:
        proxy = self._topology.proxy
        host = _display_host(proxy.host)
        admin_host = _display_host(proxy.admin.host)
        return {
            "api": f"http://{host}:{proxy.port}/v1",
            "metrics": f"http://{host}:{proxy.port}/metrics",
            "admin": f"http://{admin_host}:{proxy.admin.port}",
        }

    async def start_proxy(self) -> dict[str, str]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from deploy.proxy_actor import ProxyHost

        self._sync_lock = asyncio.Lock()
        self._scale_lock = asyncio.Lock()
        # The proxy lives on the controller's node: the admin API listens on loopback.
        node_id = ray.get_runtime_context().get_node_id()
        self._proxy = (
            ray.remote(ProxyHost)
            .options(
                name="pdserve-proxy",
                num_cpus=0,
                max_restarts=-1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(self._topology.proxy.model_dump(mode="json"), self._kv_secret)
        )
        await asyncio.wait_for(self._proxy.ensure_started.remote(), timeout=120)
        self._reconciler = asyncio.create_task(self._reconcile_forever())
        return self.urls()

    async def launch(self) -> list[str]:
        """Place and start the topology's instances; returns their names (not yet ready)."""
        names: list[str] = []
        for role in ROLES:
            count = self._topology.pool(role).replicas
            if count:
                names += [rec.plan.name for rec in await self._launch_pool(role, count)]
        return names

    async def wait_ready(self, name: str) -> dict[str, Any]:
        record = self._records.get(name)
        if record is None:
            raise ControllerError(f"no instance {name}")
        timeout = self._topology.controller.ready_timeout_s
        try:
            info = await asyncio.wait_for(record.actor.wait_ready.remote(timeout), timeout + 30)
        except Exception as exc:
            record.state = "failed"
            record.error = _one_line(exc)
            raise ControllerError(f"{name} did not become ready: {record.error}") from None
        record.info = info
        record.url = info["url"]
        record.ever_ready = True
        record.state = "running"
        await self._sync_proxy()
        return dict(info)

    async def shutdown(self) -> None:
        """Stop every worker process, then the proxy, then release the placement groups."""
        import ray

        self._shutting_down = True
        if self._reconciler is not None:
            self._reconciler.cancel()
        records = list(self._records.values())
        await asyncio.gather(*(self._stop_actor(r) for r in records), return_exceptions=True)
        self._records.clear()
        if self._proxy is not None:
            try:
                await asyncio.wait_for(self._proxy.stop.remote(), 30)
            except Exception as exc:
                logger.warning("proxy stop failed: %s", _one_line(exc))
            ray.kill(self._proxy, no_restart=True)
            self._proxy = None
        for group in self._groups.values():
            ray.util.remove_placement_group(group.placement_group)
        self._groups.clear()
        self._write_file_sd()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- queries --------------------------------------------------------------------

    async def instances(self) -> list[dict[str, Any]]:
        await self._refresh_infos()
        rows = []
        for record in sorted(
            self._records.values(), key=lambda r: (ROLES.index(r.plan.role), r.plan.index)
        ):
            row = dict(record.info)
            row.update(
                name=record.plan.name,
                role=record.plan.role,
                url=record.url or row.get("url", ""),
                controller_state=record.state,
                error=record.error,
            )
            rows.append(row)
        return rows

    def topology(self) -> dict[str, Any]:
        return self._topology.without_secrets()

    # -- scaling --------------------------------------------------------------------

    async def scale(self, prefill: int | None, decode: int | None) -> dict[str, Any]:
        """Resize the pools; removed instances drain (no new requests, in-flight finish)."""
        assert self._scale_lock is not None, "start_proxy() first"
        async with self._scale_lock:
            try:
                target = self._topology.with_replicas(prefill, decode)
            except ValueError as exc:
                raise ControllerError(str(exc)) from None
            adds: dict[str, int] = {}
            removes: list[InstanceRecord] = []
            for role in ROLES:
                live = sorted(
                    (
                        r
                        for r in self._records.values()
                        if r.plan.role == role and r.state != "draining"
                    ),
                    key=lambda r: r.plan.index,
                )
                want = target.pool(role).replicas
                if want > len(live):
                    adds[role] = want - len(live)
                elif want < len(live):
                    # Newest first: they sit in the newest placement groups, which then empty.
                    removes += live[want:]
            self._check_capacity(adds)
            previous, self._topology = self._topology, target
            launched: list[InstanceRecord] = []
            try:
                for role, count in adds.items():
                    launched += await self._launch_pool(role, count)
                await asyncio.gather(*(self.wait_ready(r.plan.name) for r in launched))
            except BaseException:
                # Leave the pools as they were: nothing half-started stays behind.
                self._topology = previous
                await asyncio.gather(*(self._retire(r) for r in launched), return_exceptions=True)
                raise
            await asyncio.gather(*(self._retire(r) for r in removes))
            return {
                "prefill": target.prefill.replicas,
                "decode": target.decode.replicas,
                "added": [r.plan.name for r in launched],
                "removed": [r.plan.name for r in removes],
            }

    def _check_capacity(self, adds: dict[str, int]) -> None:
        import ray

        available = ray.available_resources()
        needed: dict[str, float] = {}
        for role, count in adds.items():
            for key, amount in self._topology.pool(role).resources.ray_bundle().items():
                needed[key] = needed.get(key, 0.0) + amount * count
        for key, amount in needed.items():
            have = available.get(key, 0.0)
            if amount > have + 1e-9:
                raise ControllerError(
                    f"not enough {key} for {', '.join(f'{n} more {r}' for r, n in adds.items())}: "
                    f"needs {amount:g}, the cluster has {have:g} free"
                )

    async def _retire(self, record: InstanceRecord) -> None:
        record.state = "draining"
        url = record.url
        if url:
            await self._admin("POST", "/admin/instances/drain", json={"url": url}, ok=(200, 404))
            await self._wait_drained(record, "retiring it")
            await self._admin("DELETE", "/admin/instances", params={"url": url}, ok=(200, 404))
        await self._stop_actor(record)
        self._records.pop(record.plan.name, None)
        self._write_file_sd()

    async def _wait_drained(self, record: InstanceRecord, purpose: str) -> DrainResult:
        """Wait, up to ``drain_timeout_s``, until the drained instance has no request in
        flight in the proxy and, for a prefill instance, holds no KV blocks.

        A prefill instance's requests leave the proxy's count when its prefill leg answers,
        but the decode instance still has to pull the prompt's blocks from it: stopping it
        then makes that decode compute the prompt again. The blocks are freed as they are
        pulled, or a lease after the decode side gave up, so this wait is short. A worker
        that exports no such gauge (a stock vLLM server) or does not answer at all (it
        died) has nothing to wait for; one too busy to answer in time is waited for. On
        timeout the instance is stopped anyway: the proxy moves what is left."""
        url = record.url
        prefill = record.plan.role == "prefill"
        started = time.monotonic()
        deadline = started + self._topology.controller.drain_timeout_s
        while True:
            entry = await self._proxy_entry(url)
            in_flight = 0 if entry is None else int(entry.get("in_flight_requests", 0))
            blocks: int | None = None
            unknown = False
            if in_flight == 0 and prefill:
                try:
                    blocks = await self._kv_blocks_held(url)
                except TimeoutError:
                    unknown = True
            if in_flight == 0 and not blocks and not unknown:
                return DrainResult(time.monotonic() - started, False, 0, blocks)
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(_DRAIN_POLL_S)
        held = ""
        if prefill:
            if blocks is None and not unknown:  # not read while requests were in flight
                with contextlib.suppress(TimeoutError):
                    blocks = await self._kv_blocks_held(url)
            held = f", {'unknown' if blocks is None else blocks} KV block(s) held"
        logger.warning(
            "%s (%s %s): drain timed out after %.0f s before %s; stopping it with %d "
            "request(s) in flight%s (the proxy moves what is left)",
            record.plan.name,
            record.plan.role,
            url,
            self._topology.controller.drain_timeout_s,
            purpose,
            in_flight,
            held,
        )
        return DrainResult(time.monotonic() - started, True, in_flight, blocks)

    async def _kv_blocks_held(self, url: str) -> int | None:
        """``pdserve_kv_blocks_held`` on the worker's own /metrics: None when it does not
        export it or does not answer (nothing listens, an error status); TimeoutError when
        it is too slow to answer (a busy engine may still hold blocks)."""
        import aiohttp

        from deploy.worker_metrics import kv_blocks_in

        try:
            async with self._session().get(
                f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=_METRICS_TIMEOUT_S)
            ) as resp:
                if resp.status != 200:
                    return None
                text = await resp.text(errors="replace")
        except TimeoutError:
            raise
        except (aiohttp.ClientError, OSError):
            return None
        return kv_blocks_in(text)

    # -- planned restart ------------------------------------------------------------

    async def restart(self, name: str) -> dict[str, Any]:
        """Restart one instance's worker without losing requests.

        Drain it in the proxy (nothing new is routed there), wait as a retired instance's
        drain does (in-flight requests, and a prefill instance's held KV blocks, bounded by
        ``drain_timeout_s``), stop the worker and start it again on the same ports through
        its supervisor, wait until it answers ``/health``, put it back in rotation and wait,
        briefly, until the proxy's health checks have re-admitted it, so that the next
        restart of a rolling restart never finds the pool empty. Requests still in flight
        when the drain times out are moved by the proxy when the worker stops: a decode leg
        that fails before its first byte is retried on another decode instance, a stream
        that breaks continues there, a failed prefill leg is retried on another prefill
        instance (and a decode whose KV pull fails computes the prompt again).

        While it runs the record's state is ``restarting``: the reconcile loop neither
        removes it from the proxy, nor registers it again, nor undrains it. Runs under the
        scale lock: one topology change at a time.
        """
        assert self._scale_lock is not None, "start_proxy() first"
        async with self._scale_lock:
            record = self._records.get(name)
            if record is None:
                known = ", ".join(sorted(self._records)) or "none"
                raise ControllerError(f"no instance {name!r} (instances: {known})")
            if record.state != "running" or not record.url:
                raise ControllerError(
                    f"{name} is {record.state}; only a running instance can be restarted"
                )
            url = record.url
            started = time.monotonic()
            record.state = "restarting"
            try:
                await self._admin(
                    "POST", "/admin/instances/drain", json={"url": url}, ok=(200, 404)
                )
                drain = await self._wait_drained(record, "restarting it")
            except Exception as exc:
                # Nothing was stopped: it serves as before.
                record.state = "running"
                await self._undrain_quietly(url)
                raise ControllerError(
                    f"{name}: restart abandoned before its worker was stopped: {_one_line(exc)}"
                ) from None
            try:
                await asyncio.wait_for(
                    record.actor.restart_worker.remote(), _RESTART_CALL_TIMEOUT_S
                )
                timeout = self._topology.controller.ready_timeout_s
                record.info = await asyncio.wait_for(
                    record.actor.wait_ready.remote(timeout), timeout + 30
                )
            except Exception as exc:
                # Its supervisor keeps starting the worker as after a crash: back in rotation,
                # the proxy's health checks decide when it gets requests again.
                record.state = "running"
                record.error = _one_line(exc)
                await self._undrain_quietly(url)
                raise ControllerError(
                    f"{name} did not come back after its restart: {record.error} (it stays "
                    "registered and gets requests again once its health checks pass)"
                ) from None
            record.error = None
            record.state = "running"
            back = await self._undrain_quietly(url)
            try:
                await self._sync_proxy()  # registers it again if the proxy restarted meanwhile
            except Exception as exc:  # the reconcile loop tries again within a second
                logger.warning("%s: proxy sync after its restart failed: %s", name, _one_line(exc))
            readmitted = await self._wait_readmitted(url)
            return {
                "name": name,
                "url": url,
                "seconds": time.monotonic() - started,
                "drain_seconds": drain.seconds,
                "drain_timed_out": drain.timed_out,
                "in_flight_at_stop": drain.in_flight_requests,
                "kv_blocks_at_stop": drain.kv_blocks_held,
                "undrained": back,
                "readmitted": readmitted,
            }

    async def _undrain_quietly(self, url: str) -> bool:
        """Put ``url`` back in rotation; False (logged) if the proxy did not take it."""
        try:
            await self._admin("POST", "/admin/instances/undrain", json={"url": url}, ok=(200, 404))
        except Exception as exc:
            logger.warning("%s: cannot put it back in rotation: %s", url, _one_line(exc))
            return False
        return True

    async def _wait_readmitted(self, url: str) -> bool:
        """Wait until the proxy routes to ``url`` (healthy, not draining) again.

        The proxy's checks ejected it while it was down; re-admission takes
        ``successes_to_readmit`` checks. Bounded: if the proxy is slow to agree, the
        instance is in rotation anyway and the checks decide."""
        health = self._topology.proxy.health
        limit = (health.successes_to_readmit + 2) * (health.interval_s + health.timeout_s)
        deadline = time.monotonic() + limit
        while True:
            try:
                entry = await self._proxy_entry(url)
            except Exception as exc:
                logger.warning("%s: cannot read the proxy's view of it: %s", url, _one_line(exc))
                return False
            if entry is not None and entry.get("healthy") and not entry.get("draining"):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_DRAIN_POLL_S)

    # -- launching ------------------------------------------------------------------

    async def _launch_pool(self, role: str, count: int) -> list[InstanceRecord]:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from deploy.instance_actor import InstanceSupervisor

        pool = self._topology.pool(role)
        bundle = pool.resources.ray_bundle()
        self._group_seq += 1
        key = f"{role}-{self._group_seq}"
        group = placement_group(
            [dict(bundle) for _ in range(count)], strategy=pool.placement_strategy.value
        )
        try:
            await asyncio.wait_for(group.ready(), _PLACEMENT_TIMEOUT_S)
        except TimeoutError:
            ray.util.remove_placement_group(group)
            raise ControllerError(
                f"{role}: cannot place {count} x {bundle} ({pool.placement_strategy.value}); "
                f"cluster has {ray.available_resources()} free"
            ) from None
        self._groups[key] = _Group(group)
        records = []
        for bundle_index in range(count):
            plan = self._plan(role)
            self._check_ports(plan)
            actor = (
                ray.remote(InstanceSupervisor)
                .options(
                    name=f"pdserve-{plan.name}",
                    num_cpus=pool.resources.cpus,
                    num_gpus=pool.resources.gpus,
                    resources=_custom_resources(pool.resources.ray_bundle()),
                    max_restarts=self._topology.ray.max_restarts,
                    max_concurrency=8,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=bundle_index
                    ),
                )
                .remote(plan)
            )
            record = InstanceRecord(plan=plan, actor=actor, group=key)
            self._records[plan.name] = record
            self._groups[key].members.add(plan.name)
            records.append(record)
        return records

    def _plan(self, role: str) -> InstancePlan:
        pool = self._topology.pool(role)
        used = {r.plan.index for r in self._records.values() if r.plan.role == role}
        index = next(i for i in range(pool.max_replicas) if i not in used)
        name = f"{role}-{index}"
        events_ports, replay_ports = self._topology.kv_events_ports(role)
        return InstancePlan(
            name=name,
            role=role,
            index=index,
            model=str(self._topology.model_path()),
            served_model_name=self._topology.served_model_name,
            kv_secret=self._kv_secret,
            host=self._topology.worker_host,
            api_port=pool.port + index,
            kv_port=pool.kv_port + index if pool.kv_port is not None else None,
            cpu_core=self._assign_core(role, index),
            kv_cache_gib=pool.kv_cache_gib,
            accelerator=self._topology.accelerator.value,
            run_dir=self._run_dir,
            engine_id=f"pdserve-{name}",
            vllm_args=list(pool.vllm_args),
            env=dict(pool.env),
            ready_timeout_s=self._topology.controller.ready_timeout_s,
            restart_backoff_s=self._topology.controller.restart_backoff_s,
            restart_backoff_max_s=self._topology.controller.restart_backoff_max_s,
            startup_niceness=self._topology.controller.startup_niceness,
            pin_process_tree=pool.resources.pin_process_tree,
            kv_events=pool.kv_events.enabled,
            kv_events_port=events_ports[index] if events_ports else None,
            kv_events_replay_port=replay_ports[index] if replay_ports else None,
        )

    def _assign_core(self, role: str, index: int) -> int | None:
        if self._topology.accelerator.value != "cpu":
            return None
        cores = self._topology.pool(role).resources.cpu_cores
        if cores:
            core = cores[index % len(cores)]
        else:
            candidates = range(os.cpu_count() or 1)
            core = min(candidates, key=lambda c: (self._core_use[c], c))
        if self._core_use[core]:
            logger.warning(
                "%s-%d shares CPU core %d with %d other engine(s) of this cluster where they run "
                "on one node: each serves slower, and one that (re)starts stalls the others; "
                "give each instance a core of its own (resources.cpu_cores, more cores or nodes)",
                role,
                index,
                core,
                self._core_use[core],
            )
        self._core_use[core] += 1
        return core

    def _check_ports(self, plan: InstancePlan) -> None:
        # Only meaningful when the worker binds on this node; multi-node binds 0.0.0.0.
        if plan.host not in ("127.0.0.1", "localhost"):
            return
        ports = {
            "port": plan.api_port,
            "kv_port": plan.kv_port,
            "kv_events.port": plan.kv_events_port if plan.kv_events else None,
            "kv_events.replay_port": plan.kv_events_replay_port if plan.kv_events else None,
        }
        for field_name, port in ports.items():
            if port and not port_is_free(plan.host, port):
                raise ControllerError(
                    f"{plan.role}.{field_name}: port {port} ({plan.name}) is in use"
                )

    async def _stop_actor(self, record: InstanceRecord) -> None:
        import ray

        try:
            await asyncio.wait_for(record.actor.stop.remote(), 60)
        except Exception as exc:
            logger.warning("%s: stop failed: %s", record.plan.name, _one_line(exc))
        ray.kill(record.actor, no_restart=True)
        if record.plan.cpu_core is not None:
            self._core_use[record.plan.cpu_core] -= 1
        group = self._groups.get(record.group)
        if group is not None:
            group.members.discard(record.plan.name)
            if not group.members and not self._shutting_down:
                ray.util.remove_placement_group(group.placement_group)
                del self._groups[record.group]

    # -- reconciling the proxy ------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        interval = self._topology.controller.reconcile_interval_s
        while not self._shutting_down:
            try:
                await self._reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("reconcile pass failed: %s", _one_line(exc))
            await asyncio.sleep(interval)

    async def _reconcile_once(self) -> None:
        if self._proxy is None:
            return
        restarted = await asyncio.wait_for(self._proxy.ensure_started.remote(), 120)
        if restarted:
            logger.warning("proxy was restarted; re-registering instances")
        await self._refresh_infos()
        await self._sync_proxy()

    async def _refresh_infos(self) -> None:
        async def refresh(record: InstanceRecord) -> None:
            try:
                record.info = await asyncio.wait_for(
                    record.actor.info.remote(), _ACTOR_CALL_TIMEOUT_S
                )
            except Exception as exc:
                record.info = {**record.info, "state": "unreachable", "detail": _one_line(exc)}

        await asyncio.gather(*(refresh(r) for r in list(self._records.values())))

    async def _sync_proxy(self) -> None:
        assert self._sync_lock is not None
        async with self._sync_lock:
            if self._shutting_down:
                return
            current = await self._proxy_entries()
            desired = {
                r.url: registration(r)
                for r in self._records.values()
                if r.ever_ready and r.state == "running"
            }
            # Retired or restarting instances stay as the drain left them: registered (their
            # in-flight requests count there) and drained. A restarting one that the proxy
            # lost (a proxy restart) is not registered again until it runs.
            leaving = {
                r.url for r in self._records.values() if r.state in ("draining", "restarting")
            }
            for url, payload in desired.items():
                if url not in current:
                    await self._admin("POST", "/admin/instances", json=payload, ok=(201, 409))
            for url in current:
                if url not in desired and url not in leaving:
                    await self._admin(
                        "DELETE", "/admin/instances", params={"url": url}, ok=(200, 404)
                    )
            self._write_file_sd()

    async def _proxy_entries(self) -> dict[str, dict[str, Any]]:
        body = await self._admin("GET", "/admin/instances")
        return {entry["url"]: entry for entry in body.get("instances", [])}

    async def _proxy_entry(self, url: str) -> dict[str, Any] | None:
        return (await self._proxy_entries()).get(url)

    async def _admin(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> dict[str, Any]:
        admin = self._topology.proxy.admin
        headers = {"Authorization": f"Bearer {admin.token}"} if admin.token else {}
        url = f"http://{_connect_host(admin.host)}:{admin.port}{path}"
        async with self._session().request(
            method, url, json=json, params=params, headers=headers
        ) as resp:
            if resp.status not in ok:
                text = (await resp.text())[:200]
                raise ControllerError(f"admin {method} {path} -> {resp.status}: {text}")
            if resp.content_type == "application/json":
                data = await resp.json()
                return data if isinstance(data, dict) else {}
            return {}

    def _session(self) -> Any:
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._http

    def _write_file_sd(self) -> None:
        path = self._topology.prometheus.file_sd_path
        if not path:
            return
        proxy = self._topology.proxy
        targets: dict[str, list[str]] = {
            "proxy": [] if self._shutting_down else [f"{_display_host(proxy.host)}:{proxy.port}"],
            "prefill": [],
            "decode": [],
        }
        for record in self._records.values():
            if record.ever_ready and record.state == "running" and not self._shutting_down:
                targets[record.plan.role].append(record.url)
        targets = {job: sorted(urls) for job, urls in targets.items()}
        if targets == self._last_sd:
            return
        from deploy.prometheus_sd import write_file_sd

        try:
            write_file_sd(targets, os.path.expanduser(path))
            self._last_sd = targets
        except (OSError, ValueError) as exc:
            logger.warning("cannot write Prometheus file-SD %s: %s", path, exc)


def _custom_resources(bundle: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        try:
            import ray

            return str(ray.util.get_node_ip_address())
        except Exception:
            return "127.0.0.1"
    return host


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "cause", None) or exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
