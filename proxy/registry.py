"""The proxy's live set of upstream instances, shared by the request flow, the health
checker, the admin API and embedders (the Ray deployment feeds it discovered workers).

All mutations go through this class so the per-role routable lists can be cached:
the request path reads them on every request and they change rarely.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence

from proxy.instances import KV_EVENTS_FIELDS, Instance, KvEventsEndpoint, Role

# Longer than any real base URL (a DNS name is at most 253 characters).
MAX_URL_LENGTH = 512
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)


class InstanceExistsError(ValueError):
    """An instance with this URL is already registered."""


class KvEventsError(ValueError):
    """An instance's ``kv_events`` endpoints are malformed or not on its own host."""


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

    def add(
        self,
        url: str,
        role: Role | str,
        kv_events: KvEventsEndpoint | Mapping[str, object] | None = None,
    ) -> Instance:
        """Register an instance; ``kv_events`` (see :func:`parse_kv_events`) is where it
        publishes its KV cache events. ValueError (KvEventsError for ``kv_events``) says
        what is wrong."""
        url = normalise_url(url)
        events = None if kv_events is None else parse_kv_events(kv_events, url)
        if url in self._by_url:
            existing = self._by_url[url]
            raise InstanceExistsError(f"instance {url} is already registered as {existing.role}")
        instance = Instance(url=url, role=Role(role), kv_events=events)
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

    def undrain(self, url: str) -> Instance:
        """Route new requests to a drained instance again (after a planned restart).

        Health is left as it is: an instance the checks ejected while it was down comes
        back once it passes them."""
        instance = self.require(url)
        instance.draining = False
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


def normalise_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port`` (the instance's identity).

    Only a bare base URL the proxy can dial passes: scheme http or https, a host name or
    IP address (IPv6 in brackets), an optional port in 1..65535, nothing else (no user
    info, path, query or fragment). ValueError has a one-line message saying what is wrong.
    """
    url = url.strip()
    if not url:
        raise ValueError("instance URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"instance URL is longer than {MAX_URL_LENGTH} characters")
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    shown = repr(url if len(url) <= 80 else url[:77] + "...")
    if scheme not in ("http", "https"):
        raise ValueError(f"instance URL {shown} must use http:// or https://")
    authority = rest.rstrip("/")
    for char, part in (("/", "a path"), ("?", "a query"), ("#", "a fragment"), ("@", "user info")):
        if char in authority:
            raise ValueError(f"instance URL {shown} must be a bare base URL, without {part}")
    host, port = _split_authority(authority, f"instance URL {shown}")
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def _split_authority(authority: str, what: str) -> tuple[str, int | None]:
    """``host[:port]`` -> ``(host, port)``, an IPv6 host kept in brackets; ValueError starts
    with ``what`` (the field and its value) and says what is wrong."""
    if authority.startswith("["):
        host, bracket, port_text = authority[1:].partition("]")
        if not bracket:
            raise ValueError(f"{what} has an unclosed '[' in its host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv6 address") from None
        host = f"[{host}]"
        if port_text and not port_text.startswith(":"):
            raise ValueError(f"{what} has text after its host")
        has_port, port_text = bool(port_text), port_text[1:]
    else:
        host, colon, port_text = authority.partition(":")
        has_port = bool(colon)
        if ":" in port_text:
            raise ValueError(f"{what} has more than one ':' (IPv6 addresses go in brackets)")
        if not host:
            raise ValueError(f"{what} has no host")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{what}: {host!r} is not a host name or IP address")
    if not has_port:
        return host, None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{what}: port must be a number in 1..65535")
    return host, int(port_text)


def url_host(url: str) -> str:
    """The host of a normalised instance URL (IPv6 in brackets)."""
    authority = url.partition("://")[2]
    host, _ = _split_authority(authority, f"instance URL {url!r}")
    return host


def parse_kv_events(value: object, url: str) -> KvEventsEndpoint:
    """The KV-events endpoints of the instance at ``url`` from plain data (JSON, YAML) or a
    :class:`KvEventsEndpoint`; KvEventsError says which field is wrong and why.

    Each endpoint must be ``tcp://host:port`` on the host of ``url`` itself: whoever
    registers an instance chooses only its ports, never another address the proxy dials.
    """
    if isinstance(value, KvEventsEndpoint):
        value = value.to_json()
    if not isinstance(value, Mapping):
        raise KvEventsError(f"kv_events must be an object with keys {list(KV_EVENTS_FIELDS)}")
    unknown = sorted(str(key) for key in value if key not in KV_EVENTS_FIELDS)
    if unknown:
        raise KvEventsError(f"kv_events: unknown keys {unknown}; known: {list(KV_EVENTS_FIELDS)}")
    host = url_host(normalise_url(url))
    endpoint = _tcp_endpoint(value.get("endpoint"), host, "endpoint", url)
    replay = value.get("replay_endpoint")
    replay_endpoint = (
        None if replay is None else _tcp_endpoint(replay, host, "replay_endpoint", url)
    )
    if replay_endpoint == endpoint:
        raise KvEventsError("kv_events: endpoint and replay_endpoint must be different ports")
    return KvEventsEndpoint(endpoint=endpoint, replay_endpoint=replay_endpoint)


def _tcp_endpoint(value: object, host: str, field: str, url: str) -> str:
    if not isinstance(value, str) or not value:
        raise KvEventsError(f"kv_events.{field} is required and must be a string")
    if len(value) > MAX_URL_LENGTH:
        raise KvEventsError(f"kv_events.{field} is longer than {MAX_URL_LENGTH} characters")
    what = f"kv_events.{field} {value[:80]!r}"
    scheme, sep, authority = value.strip().partition("://")
    if not sep or scheme.lower() != "tcp":
        raise KvEventsError(f"{what} must be tcp://host:port")
    try:
        endpoint_host, port = _split_authority(authority.rstrip("/"), what)
    except ValueError as exc:
        raise KvEventsError(str(exc)) from None
    if port is None:
        raise KvEventsError(f"{what} has no port")
    if not _same_host(endpoint_host, host):
        raise KvEventsError(f"{what} must be on the instance's own host {host} (the URL's, {url})")
    return f"tcp://{host}:{port}"


def _same_host(a: str, b: str) -> bool:
    if a.startswith("[") and b.startswith("["):
        return ipaddress.IPv6Address(a[1:-1]) == ipaddress.IPv6Address(b[1:-1])
    return a.lower() == b.lower()
