"""The proxy's live set of upstream instances, shared by the request flow, the health
checker, the admin API and embedders (the Ray deployment feeds it discovered workers).

All mutations go through this class so the per-role routable lists can be cached:
the request path reads them on every request and they change rarely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from proxy.config import normalise_url
from proxy.instances import Instance, Role


class InstanceExistsError(ValueError):
    """An instance with this URL is already registered."""


class UnknownInstanceError(LookupError):
    """No instance with this URL is registered."""


class InstanceRegistry:
    def __init__(self) -> None:
        self._by_url: dict[str, Instance] = {}
        self._routable: dict[Role, list[Instance]] = {Role.PREFILL: [], Role.DECODE: []}
        self._on_remove: list[Callable[[Instance], None]] = []

    def on_remove(self, callback: Callable[[Instance], None]) -> None:
        """Call ``callback(instance)`` after an instance leaves the registry."""
        self._on_remove.append(callback)

    def add(self, url: str, role: Role | str) -> Instance:
        url = normalise_url(url)
        if url in self._by_url:
            existing = self._by_url[url]
            raise InstanceExistsError(f"instance {url} is already registered as {existing.role}")
        instance = Instance(url=url, role=Role(role))
        self._by_url[url] = instance
        self._refresh(instance.role)
        return instance

    def remove(self, url: str) -> Instance:
        """Forget the instance at once; requests already on it finish normally."""
        instance = self._by_url.pop(self._key(url), None)
        if instance is None:
            raise UnknownInstanceError(f"no instance {url}")
        self._refresh(instance.role)
        for callback in self._on_remove:
            callback(instance)
        return instance

    def drain(self, url: str) -> Instance:
        """Stop sending new requests to the instance; in-flight ones finish."""
        instance = self.require(url)
        instance.draining = True
        self._refresh(instance.role)
        return instance

    def set_healthy(self, instance: Instance, healthy: bool) -> None:
        if instance.healthy != healthy:
            instance.healthy = healthy
            if self._by_url.get(instance.url) is instance:
                self._refresh(instance.role)

    def get(self, url: str) -> Instance | None:
        return self._by_url.get(self._key(url))

    def require(self, url: str) -> Instance:
        instance = self.get(url)
        if instance is None:
            raise UnknownInstanceError(f"no instance {url}")
        return instance

    def routable(self, role: Role) -> list[Instance]:
        """Healthy, non-draining instances of ``role``; do not mutate the returned list."""
        return self._routable[role]

    def instances(self, role: Role | None = None) -> Sequence[Instance]:
        if role is None:
            return list(self._by_url.values())
        return [i for i in self._by_url.values() if i.role is role]

    def __len__(self) -> int:
        return len(self._by_url)

    @staticmethod
    def _key(url: str) -> str:
        try:
            return normalise_url(url)
        except ValueError:
            return url

    def _refresh(self, role: Role) -> None:
        # A new list rather than an in-place edit: a request holding the old one
        # keeps a consistent view.
        self._routable[role] = [i for i in self._by_url.values() if i.role is role and i.routable]
