"""`pdserve status`: one row per instance of the running cluster.

Role, address and supervision state come from the controller (over Ray); health and
in-flight requests from the proxy's admin API; held KV blocks from each worker's
``/metrics`` (``pdserve_kv_blocks_held``, exported by prefill instances).

STATE is the controller's (``running``, ``draining`` while `pdserve scale` retires it,
``restarting`` during `pdserve restart`), then the supervisor's when it differs
(``running/restarting`` after a crash); HEALTH adds ``,draining`` while the proxy routes
nothing new there. RESTARTS counts crashes, with planned restarts in brackets.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from deploy.cli import CliError
from deploy.cluster_state import (
    ClusterState,
    add_state_dir_argument,
    connect,
    get_controller,
    require_running,
    state_dir,
)
from deploy.worker_metrics import kv_blocks_in

COLUMNS = ("NAME", "ROLE", "ADDRESS", "STATE", "HEALTH", "IN-FLIGHT", "KV-BLOCKS", "RESTARTS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_state_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    import ray

    directory = state_dir(args.state_dir)
    try:
        state = require_running(directory)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        connect(state, "status")
        controller = get_controller(state)
        instances: list[dict[str, Any]] = ray.get(controller.instances.remote(), timeout=30)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CliError(f"cannot reach the cluster's controller: {exc}") from None
    except ray.exceptions.RayError as exc:
        raise CliError(f"controller did not answer: {type(exc).__name__}") from None
    finally:
        if ray.is_initialized():
            ray.shutdown()
    proxy_view = _proxy_instances(state)
    rows = [_row(instance, proxy_view.get(instance.get("url", ""))) for instance in instances]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"API {state.api_url}  metrics {state.metrics_url}  admin {state.admin_url}")
    print(format_table(rows))
    return 0


def _row(instance: dict[str, Any], proxy: dict[str, Any] | None) -> dict[str, Any]:
    url = instance.get("url", "")
    if proxy is None:
        health = "not registered"
        in_flight: Any = "-"
    else:
        health = "healthy" if proxy.get("healthy") else "ejected"
        if proxy.get("draining"):
            health += ",draining"
        in_flight = proxy.get("in_flight_requests", 0)
    state = instance.get("controller_state", "")
    if instance.get("state") not in (None, "", "ready", state):
        state = f"{state}/{instance['state']}"
    return {
        "name": instance.get("name", ""),
        "role": instance.get("role", ""),
        "address": url,
        "state": state,
        "health": health,
        "in_flight": in_flight,
        "kv_blocks": kv_blocks_held(url) if url else None,
        "restarts": instance.get("restarts", 0),
        "planned_restarts": instance.get("planned_restarts", 0),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = ("name", "role", "address", "state", "health", "in_flight", "kv_blocks", "restarts")
    cells = [list(COLUMNS)] + [[_cell(r, k) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _cell(row: dict[str, Any], key: str) -> str:
    if row[key] is None:
        return "-"
    if key == "restarts" and row.get("planned_restarts"):
        # Crashes and `pdserve restart`s apart: only the first are a reason to look.
        return f"{row[key]} (+{row['planned_restarts']} planned)"
    return str(row[key])


def _proxy_instances(state: ClusterState) -> dict[str, dict[str, Any]]:
    request = urllib.request.Request(f"{state.admin_url}/admin/instances")
    if state.admin_token:
        request.add_header("Authorization", f"Bearer {state.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CliError(f"proxy admin API at {state.admin_url} did not answer: {exc}") from None
    return {entry["url"]: entry for entry in body.get("instances", [])}


def kv_blocks_held(url: str) -> int | None:
    """Sum of ``pdserve_kv_blocks_held`` on the worker, None if it does not export it."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=3) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError):
        return None
    return kv_blocks_in(text)
