"""Connector configuration: the ``--kv-transfer-config`` JSON and its parsed form.

Both halves of the connector, the workers' launch code and the tests build or
read the config through this module, so the key names live in one place.

The shared secret is not part of the JSON that ``pdserve`` builds: vLLM logs its
non-default arguments and the JSON sits in the server's argv (``ps``,
``/proc/*/cmdline``). The connector reads it from ``$PDSERVE_KV_SECRET`` or from the
file named by ``$PDSERVE_KV_SECRET_FILE`` (vLLM's engine and worker processes inherit
the server's environment); ``read_secret`` is the one place that does so. This module
imports neither vLLM nor torch, so the proxy can use ``read_secret`` too.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

CONNECTOR_NAME = "TcpPullConnector"
CONNECTOR_MODULE = "kv_transfer.connector"

Role = Literal["producer", "consumer", "both"]
FailurePolicy = Literal["fail", "recompute"]

DEFAULT_PORT = 15100
DEFAULT_LEASE_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_IO_TIMEOUT_S = 30.0

# Where the connector (and ``pdserve worker``/``pdserve up``) find the shared secret.
SECRET_ENV = "PDSERVE_KV_SECRET"
SECRET_FILE_ENV = "PDSERVE_KV_SECRET_FILE"
MIN_SECRET_CHARS = 16
# A secret file larger than this is not a secret file (and /dev/zero is not read forever).
MAX_SECRET_FILE_BYTES = 4096
# Values copied from examples, refused wherever a secret is configured. Compared after
# lower-casing and dropping everything but letters and digits.
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "changemetoo", "secret", "password", "example", "placeholder", "replaceme",
     "yoursecret", "mysecret", "default", "test", "token", "none", "null"}
)  # fmt: skip
_PLACEHOLDER_PARTS = ("changeme", "replaceme", "placeholder", "yoursecret", "example")


class SecretError(ValueError):
    """A configured secret cannot be used; the message names where it came from, never its
    value."""


def weak_secret_reason(secret: str) -> str | None:
    """Why ``secret`` must not be used (a placeholder, too short), or None. Never echoes it."""
    folded = re.sub(r"[^a-z0-9]", "", secret.lower())
    if folded in PLACEHOLDER_SECRETS or any(part in folded for part in _PLACEHOLDER_PARTS):
        return "is a placeholder value from an example"
    if len(secret) < MIN_SECRET_CHARS:
        return f"is shorter than {MIN_SECRET_CHARS} characters"
    if len(set(secret)) == 1:
        return "repeats one character"
    return None


def check_secret(secret: str, source: str) -> str:
    """Return ``secret`` unchanged, or raise SecretError naming ``source`` when it is weak."""
    reason = weak_secret_reason(secret)
    if reason is not None:
        raise SecretError(
            f"{source}: the secret {reason}; use a random one, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret


def read_secret_file(path: str | os.PathLike[str], source: str = "secret_file") -> str:
    """The secret stored in ``path``, without its trailing newline.

    Refused like ssh refuses a private key: a file group or others may access (``chmod 600``
    it), an empty one, or one larger than MAX_SECRET_FILE_BYTES.
    """
    where = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO must not block the open; it is refused below like any non-file.
        fd = os.open(os.path.expanduser(where), os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise SecretError(f"{source}: cannot read {where}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SecretError(f"{source}: {where} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecretError(
                f"{source}: permissions {mode:04o} for {where} are too open: the secret file "
                f"must not be accessible by group or others (chmod 600 {where})"
            )
        data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SecretError(f"{source}: {where} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        secret = data.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise SecretError(f"{source}: {where} is not UTF-8 text") from None
    if not secret:
        raise SecretError(f"{source}: {where} is empty")
    return secret


def read_secret(
    value: str | None = None,
    file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    env_var: str = SECRET_ENV,
    file_env_var: str = SECRET_FILE_ENV,
    names: tuple[str, str] = ("secret", "secret_file"),
    check: bool = True,
) -> str:
    """The configured secret, or ``""`` when none is configured.

    Sources, first one set wins: ``value``, the file ``file``, ``$env_var``, the file named by
    ``$file_env_var`` (``env`` defaults to ``os.environ``; empty values count as unset).
    Giving both forms at one level (a value and a file, or both variables) is an error, as is
    an unreadable or too-open file (``read_secret_file``) and, with ``check``, a weak secret
    (``check_secret``). ``names`` are how errors call ``value`` and ``file``. The proxy reads
    its admin token the same way with ``env_var="PDSERVE_ADMIN_TOKEN"``.
    """
    env = os.environ if env is None else env
    levels = (
        (value or None, names[0], file or None, names[1]),
        (env.get(env_var) or None, f"${env_var}", env.get(file_env_var) or None,
         f"${file_env_var}"),
    )  # fmt: skip
    for direct, direct_name, path, path_name in levels:
        if direct is not None and path is not None:
            raise SecretError(f"{direct_name}, {path_name}: give one of them, not both")
        if direct is not None:
            return check_secret(direct, direct_name) if check else direct
        if path is not None:
            secret = read_secret_file(path, path_name)
            return check_secret(secret, path_name) if check else secret
    return ""


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
    secret_file: str | None = None,
) -> dict[str, Any]:
    """Return the dict to pass (as JSON) to vLLM's ``--kv-transfer-config``.

    ``role`` is ``producer``/``consumer``/``both`` (or vLLM's ``kv_producer`` ...).
    ``host``/``port`` are where a producer's block server listens (rank r uses
    ``port + r``); a consumer ignores them. ``advertise_host`` is the address
    put in ``kv_transfer_params`` for decode instances to dial, when the bind
    address (e.g. ``0.0.0.0``) is not reachable as such. ``secret`` is the
    shared key both sides authenticate with; it must be the same on every
    prefill and decode instance of one deployment. Leave it empty: the connector
    then reads ``$PDSERVE_KV_SECRET`` or ``$PDSERVE_KV_SECRET_FILE`` (what
    ``pdserve worker`` and ``pdserve up`` set), and the secret stays out of vLLM's
    argv and logs; ``secret``/``secret_file`` here put it (or a file's path) into the
    JSON, for setups that configure vLLM by hand. ``lease_s`` bounds how long
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
        "lease_s": lease_s,
        "connect_timeout_s": connect_timeout_s,
        "io_timeout_s": io_timeout_s,
    }
    if secret:
        extra["secret"] = secret
    if secret_file:
        extra["secret_file"] = secret_file
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
    secret: bytes = field(default=b"", repr=False)
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
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
    ) -> TransferSettings:
        """Parse ``kv_connector_extra_config``; the secret comes from its ``secret`` or
        ``secret_file`` key, else from ``$PDSERVE_KV_SECRET``/``$PDSERVE_KV_SECRET_FILE`` in
        ``env`` (default ``os.environ``), see ``read_secret``."""
        extra = dict(extra or {})
        known = {
            "host",
            "port",
            "secret",
            "secret_file",
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
        for key in ("secret", "secret_file"):
            if extra.get(key) is not None and not isinstance(extra[key], str):
                raise ValueError(f"kv_connector_extra_config.{key} must be a string")
        secret = read_secret(
            extra.get("secret"),
            extra.get("secret_file"),
            env=env,
            names=("kv_connector_extra_config.secret", "kv_connector_extra_config.secret_file"),
        )
        port = int(extra.get("port", DEFAULT_PORT))
        if not 0 < port < 65536:
            raise ValueError(f"kv_connector_extra_config.port must be in 1..65535, got {port}")
        lease_s = float(extra.get("lease_s", DEFAULT_LEASE_S))
        if lease_s <= 0:
            raise ValueError(f"kv_connector_extra_config.lease_s must be positive, got {lease_s}")
        return cls(
            host=str(extra.get("host", "127.0.0.1")),
            port=port,
            secret=secret.encode(),
            lease_s=lease_s,
            connect_timeout_s=float(extra.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S)),
            io_timeout_s=float(extra.get("io_timeout_s", DEFAULT_IO_TIMEOUT_S)),
            advertise_host=extra.get("advertise_host") or None,
        )
