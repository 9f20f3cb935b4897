"""Prometheus file-based service discovery for a pdserve deployment.

The launcher calls :func:`write_file_sd` whenever instances come or go; a Prometheus
running ``deploy/prometheus/prometheus-file-sd.yml`` (or any scrape job with a
``file_sd_configs`` entry pointing at the file) picks the change up through inotify
within seconds, without a reload.

Each target group carries the ``job`` label (which beats the scrape job's own name,
so one scrape job serves the proxy and both pools) and ``pdserve_role`` = proxy,
prefill or decode, which the dashboards and alert rules select on. ``role`` itself is
not used as the target label because the proxy exports its own per-instance ``role``
label and a target label of the same name would rename it to ``exported_role``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROLE_LABEL = "pdserve_role"
PROXY_JOB = "pdserve-proxy"
PREFILL_JOB = "pdserve-prefill"
DECODE_JOB = "pdserve-decode"
# job name -> pdserve_role value
JOB_ROLES: dict[str, str] = {PROXY_JOB: "proxy", PREFILL_JOB: "prefill", DECODE_JOB: "decode"}
_ROLE_JOBS = {role: job for job, role in JOB_ROLES.items()}


def _job_and_role(key: str) -> tuple[str, str]:
    """Accept a job name (``pdserve-prefill``) or a bare role (``prefill``)."""
    if key in JOB_ROLES:
        return key, JOB_ROLES[key]
    if key in _ROLE_JOBS:
        return _ROLE_JOBS[key], key
    known = sorted([*JOB_ROLES, *_ROLE_JOBS])
    raise ValueError(f"unknown scrape job {key!r}; expected one of {known}")


def _parse_target(job: str, target: str) -> tuple[str, str]:
    """``host:port`` or ``http(s)://host:port[/]`` -> (``host:port``, scheme)."""
    raw = target.strip()
    has_scheme = "://" in raw
    parts = urlsplit(raw if has_scheme else f"http://{raw}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"job {job}: target {target!r} has scheme {parts.scheme!r}, not http(s)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"job {job}: target {target!r} has a path; Prometheus scrapes <target>/metrics"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"job {job}: target {target!r} has an invalid port") from exc
    if not parts.hostname or port is None:
        raise ValueError(f"job {job}: target {target!r} must be host:port")
    return parts.netloc, parts.scheme


def file_sd_groups(targets_by_job: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """The file_sd document for ``targets_by_job``: one group per (job, scheme), sorted."""
    if isinstance(targets_by_job, str) or not isinstance(targets_by_job, Mapping):
        raise TypeError("targets_by_job must map a job name to a list of targets")
    grouped: dict[tuple[str, str], set[str]] = {}
    roles: dict[str, str] = {}
    for key, targets in targets_by_job.items():
        if isinstance(targets, str):
            raise TypeError(f"job {key}: targets must be a list of host:port strings, not a str")
        job, role = _job_and_role(key)
        if job in roles:
            raise ValueError(f"job {job} is given twice (as a job name and as a role)")
        roles[job] = role
        for target in targets:
            address, scheme = _parse_target(job, target)
            grouped.setdefault((job, scheme), set()).add(address)
    groups: list[dict[str, Any]] = []
    for (job, scheme), addresses in sorted(grouped.items()):
        labels = {"job": job, ROLE_LABEL: roles[job]}
        if scheme != "http":
            labels["__scheme__"] = scheme
        groups.append({"targets": sorted(addresses), "labels": labels})
    return groups


def write_file_sd(
    targets_by_job: Mapping[str, Sequence[str]], path: str | os.PathLike[str]
) -> None:
    """Write ``targets_by_job`` as a Prometheus file_sd JSON file, atomically.

    Keys are job names (``pdserve-proxy``, ``pdserve-prefill``, ``pdserve-decode``) or
    the bare roles (``proxy``, ``prefill``, ``decode``); values are ``host:port``
    strings or instance base URLs such as ``http://10.0.0.5:8100``. A job with no
    targets is left out. Prometheus never sees a half-written file: the document is
    written to a temporary file in the same directory, synced, and renamed over
    ``path``. Invalid input raises ValueError/TypeError and leaves ``path`` untouched.
    """
    document = json.dumps(file_sd_groups(targets_by_job), indent=2) + "\n"
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(document)
            tmp.flush()
            os.fsync(tmp.fileno())
        # Prometheus runs as its own user in packaged installs; mkstemp's 0600 would hide it.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse O_RDONLY on a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
