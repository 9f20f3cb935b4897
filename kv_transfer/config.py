"""Connector configuration: the ``--kv-transfer-config`` JSON and its parsed form.

Both halves of the connector, the workers' launch code and the tests build or
read the config through this module, so the key names live in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

CONNECTOR_NAME = "TcpPullConnector"
CONNECTOR_MODULE = "kv_transfer.connector"

Role = Literal["producer", "consumer", "both"]
FailurePolicy = Literal["fail", "recompute"]

DEFAULT_PORT = 15100
DEFAULT_LEASE_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_IO_TIMEOUT_S = 30.0

_ROLE_TO_VLLM = {"producer": "kv_producer", "consumer": "kv_consumer", "both": "kv_both"}


def _vllm_role(role: str) -> str:
    if role in _ROLE_TO_VLLM:
        return _ROLE_TO_VLLM[role]
    if role in _ROLE_TO_VLLM.values():
        return role
    known = sorted([*_ROLE_TO_VLLM, *_ROLE_TO_VLLM.values()])
    raise ValueError(f"unknown KV role {role!r}; expected one of {known}")


def connector_config(
    role: str,
    engine_id: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    secret: str = "",
    lease_s: float = DEFAULT_LEASE_S,
    *,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
    kv_load_failure_policy: FailurePolicy = "recompute",
    advertise_host: str | None = None,
) -> dict[str, Any]:
    """Return the dict to pass (as JSON) to vLLM's ``--kv-transfer-config``.

    ``role`` is ``producer``/``consumer``/``both`` (or vLLM's ``kv_producer`` ...).
    ``host``/``port`` are where a producer's block server listens (rank r uses
    ``port + r``); a consumer ignores them. ``advertise_host`` is the address
    put in ``kv_transfer_params`` for decode instances to dial, when the bind
    address (e.g. ``0.0.0.0``) is not reachable as such. ``secret`` is the
    shared key both sides authenticate with; it must be the same on every
    prefill and decode instance of one deployment. ``lease_s`` bounds how long
    a prefill instance holds a finished request's blocks when no decode instance
    claims them; a decode instance renews its claim every ``lease_s / 3`` from the
    moment its engine accepts the request until its pull is done.
    """
    if not engine_id:
        raise ValueError("engine_id must be a non-empty string")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if lease_s <= 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    if kv_load_failure_policy not in ("fail", "recompute"):
        raise ValueError(
            f"kv_load_failure_policy must be 'fail' or 'recompute', got {kv_load_failure_policy!r}"
        )
    extra: dict[str, Any] = {
        "host": host,
        "port": port,
        "secret": secret,
        "lease_s": lease_s,
        "connect_timeout_s": connect_timeout_s,
        "io_timeout_s": io_timeout_s,
    }
    if advertise_host:
        extra["advertise_host"] = advertise_host
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": _vllm_role(role),
        "engine_id": engine_id,
        "kv_load_failure_policy": kv_load_failure_policy,
        "kv_connector_extra_config": extra,
    }


def connector_config_json(*args: Any, **kwargs: Any) -> str:
    """``connector_config(...)`` serialised for the command line."""
    return json.dumps(connector_config(*args, **kwargs))


@dataclass(frozen=True)
class TransferSettings:
    """The connector's own settings, parsed from ``kv_connector_extra_config``."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    secret: bytes = b""
    lease_s: float = DEFAULT_LEASE_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    io_timeout_s: float = DEFAULT_IO_TIMEOUT_S
    advertise_host: str | None = None

    @property
    def public_host(self) -> str:
        """The address decode instances should dial."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", ""):
            return "127.0.0.1"
        return self.host

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> TransferSettings:
        extra = dict(extra or {})
        known = {
            "host",
            "port",
            "secret",
            "lease_s",
            "connect_timeout_s",
            "io_timeout_s",
            "advertise_host",
        }
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"unknown kv_connector_extra_config keys {unknown} for {CONNECTOR_NAME}; "
                f"known: {sorted(known)}"
            )
        secret = extra.get("secret", "")
        port = int(extra.get("port", DEFAULT_PORT))
        if not 0 < port < 65536:
            raise ValueError(f"kv_connector_extra_config.port must be in 1..65535, got {port}")
        lease_s = float(extra.get("lease_s", DEFAULT_LEASE_S))
        if lease_s <= 0:
            raise ValueError(f"kv_connector_extra_config.lease_s must be positive, got {lease_s}")
        return cls(
            host=str(extra.get("host", "127.0.0.1")),
            port=port,
            secret=secret.encode() if isinstance(secret, str) else bytes(secret),
            lease_s=lease_s,
            connect_timeout_s=float(extra.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S)),
            io_timeout_s=float(extra.get("io_timeout_s", DEFAULT_IO_TIMEOUT_S)),
            advertise_host=extra.get("advertise_host") or None,
        )
