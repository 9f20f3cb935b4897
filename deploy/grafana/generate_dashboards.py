"""Generate pdserve's Grafana dashboards (deploy/grafana/dashboards/*.json).

The JSON files are committed and provisioned as they are; this script is their source.
Edit the panels here and run

    python deploy/grafana/generate_dashboards.py

tests/observability checks that the committed files match this output, that every panel
names the ``$datasource`` variable, and (against a real Prometheus scraping a live
deployment) that every panel's query returns data.

Label conventions (set by deploy/prometheus/*.yml and deploy/prometheus_sd.py):
``pdserve_role`` = proxy | prefill | decode on every target; the proxy's per-instance
series keep the worker's URL in ``exported_instance`` (Prometheus renames the proxy's own
``instance`` label, which would clash with the target's).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
PANEL_HEIGHT = 8
RATE = "$__rate_interval"
# A worker URL in the proxy's series (exported_instance) for the host:port in $instance.
WORKER_URL = 'exported_instance=~"https?://$instance/?"'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    right: bool = False  # on the right axis, in the panel's right_unit


@dataclass(frozen=True)
class Panel:
    title: str
    targets: Sequence[Target]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    description: str = ""
    max_value: float | None = None
    right_unit: str = "short"  # unit of the targets with right=True


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: list[dict[str, Any]]
    panels: list[Panel] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        rendered: list[dict[str, Any]] = []
        x = y = row_height = 0
        for panel_id, panel in enumerate(self.panels, start=1):
            if x + panel.width > GRID_WIDTH:
                x, y = 0, y + row_height
            height = 4 if panel.kind == "stat" else PANEL_HEIGHT
            row_height = height if x == 0 else max(row_height, height)
            rendered.append(_panel_json(panel, panel_id, x, y, height))
            x += panel.width
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["pdserve"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "",
            "annotations": {"list": []},
            "links": [
                {
                    "title": "pdserve",
                    "type": "dashboards",
                    "tags": ["pdserve"],
                    "asDropdown": True,
                    "includeVars": False,
                    "keepTime": True,
                }
            ],
            "templating": {"list": self.variables},
            "panels": rendered,
        }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int, height: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.max_value is not None:
        defaults["max"] = panel.max_value
        defaults["min"] = 0
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10}
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    else:
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    overrides = [
        {
            "matcher": {"id": "byFrameRefID", "options": _ref_id(index)},
            "properties": [
                {"id": "custom.axisPlacement", "value": "right"},
                {"id": "unit", "value": panel.right_unit},
            ],
        }
        for index, target in enumerate(panel.targets)
        if target.right
    ]
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": height},
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": options,
        "targets": [
            {
                "refId": _ref_id(index),
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend or "__auto",
                "range": True,
            }
            for index, target in enumerate(panel.targets)
        ],
    }


def _ref_id(index: int) -> str:
    return chr(ord("A") + index)


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
    }


def query_variable(name: str, label: str, selector: str, label_name: str) -> dict[str, Any]:
    """A multi-value variable over ``label_name`` of ``selector``, "All" = any value."""
    query = f"label_values({selector}, {label_name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": query,
        "refresh": 2,  # on time range change: instances come and go
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "regex": "",
        "options": [],
    }


def quantiles(
    metric: str, selector: str, by: str = "", qs: Sequence[float] = (0.5, 0.9, 0.99)
) -> list[Target]:
    """histogram_quantile targets for ``metric`` (a *_seconds histogram) at ``qs``."""
    group = f"le, {by}" if by else "le"
    targets = []
    for q in qs:
        legend = f"p{round(q * 100):d}" + (f" {{{{{by}}}}}" if by else "")
        expr = (
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))"
        )
        targets.append(Target(expr, legend))
    return targets


def kv_recomputed(selector: str, title: str) -> Panel:
    """Decode requests (left axis) and prompt tokens (right) computed again instead of
    using the prefill instance's KV, by reason. Prefill workers export the counters too,
    always at 0."""
    return Panel(
        title,
        [
            Target(
                "sum by (reason) "
                f"(rate(pdserve_kv_recomputed_requests_total{{{selector}}}[{RATE}]))",
                "requests {{reason}}",
            ),
            Target(
                f"sum by (reason) (rate(pdserve_kv_recomputed_tokens_total{{{selector}}}[{RATE}]))",
                "tokens {{reason}}",
                right=True,
            ),
        ],
        "reqps",
        description="Decode requests (left) and prompt tokens (right) computed again on a "
        "decode instance instead of using the transferred KV; clients still get HTTP 200. "
        "pull_failed: a started pull failed (peer died, refused, cut off); lease_lost: the "
        "prefill instance no longer held the blocks; unusable: incompatible or malformed "
        "kv_transfer_params (model, block size, prompt).",
    )


def overview() -> Dashboard:
    proxy = 'pdserve_role="proxy", instance=~"$instance"'
    req = f'{proxy}, model=~"$model"'
    total = f"sum(rate(pdserve_requests_total{{{req}}}[{RATE}]))"
    errors = f'sum(rate(pdserve_requests_total{{{req}, status=~"5.."}}[{RATE}]))'
    variables = [
        datasource_variable(),
        query_variable(
            "instance", "Proxy", 'pdserve_requests_total{pdserve_role="proxy"}', "instance"
        ),
        query_variable(
            "model",
            "Model",
            'pdserve_requests_total{pdserve_role="proxy", instance=~"$instance"}',
            "model",
        ),
    ]
    dash = Dashboard(
        uid="pdserve-overview",
        title="pdserve / Overview",
        description="What clients see at the proxy: traffic, errors, TTFT/ITL/E2E, PD share.",
        variables=variables,
    )
    dash.panels += [
        Panel("Requests / s", [Target(total, "requests")], "reqps", "stat", 6),
        Panel(
            "5xx ratio",
            # No 5xx series at all means no errors: 0, not "no data".
            [Target(f"({errors} or vector(0)) / {total}", "5xx")],
            "percentunit",
            "stat",
            6,
        ),
        Panel(
            "Disaggregated share",
            [
                Target(
                    f'(sum(rate(pdserve_requests_total{{{req}, path="disaggregated"}}[{RATE}]))'
                    f" or vector(0)) / {total}",
                    "disaggregated",
                )
            ],
            "percentunit",
            "stat",
            6,
        ),
        Panel(
            "Healthy instances",
            [
                Target(
                    f"sum by (role) (pdserve_instance_healthy{{{proxy}}})",
                    "{{role}}",
                )
            ],
            "short",
            "stat",
            6,
            description="Instances passing the proxy's health checks, by role.",
        ),
        Panel(
            "Requests / s by status",
            [
                Target(
                    f"sum by (status) (rate(pdserve_requests_total{{{req}}}[{RATE}]))",
                    "{{status}}",
                )
            ],
            "reqps",
        ),
        Panel(
            "Path share (PD vs aggregated vs fallback)",
            [
                Target(
                    f"sum by (path) (rate(pdserve_requests_total{{{req}}}[{RATE}]))"
                    f" / ignoring (path) group_left () {total}",
                    "{{path}}",
                )
            ],
            "percentunit",
            description="fallback: no healthy prefill instance, decode did the prefill itself.",
            max_value=1,
        ),
        Panel(
            "TTFT (client-visible)",
            [
                *quantiles("pdserve_ttft_seconds", req),
                Target("pdserve:slo_ttft_p99_seconds", "p99 SLO"),
            ],
            "s",
            description="Proxy receive to first content byte sent to the client.",
        ),
        Panel(
            "TTFT p99 by path",
            quantiles("pdserve_ttft_seconds", req, by="path", qs=(0.99,)),
            "s",
        ),
        Panel(
            "Inter-token latency (client-visible)",
            quantiles("pdserve_inter_token_latency_seconds", req),
            "s",
        ),
        Panel("End-to-end latency", quantiles("pdserve_e2e_latency_seconds", req), "s"),
        Panel(
            "PD stage latency p99",
            quantiles("pdserve_stage_latency_seconds", proxy, by="stage", qs=(0.99,)),
            "s",
            description="prefill leg round trip; handoff (prefill answer to decode sent); "
            "decode leg sent to first byte.",
        ),
        Panel(
            "In-flight requests by role",
            [
                Target(
                    f"sum by (role) (pdserve_instance_in_flight_requests{{{proxy}}})",
                    "{{role}}",
                )
            ],
        ),
        Panel(
            "Retries / s",
            [
                Target(
                    f"sum by (stage) (rate(pdserve_retries_total{{{proxy}}}[{RATE}])) or vector(0)",
                    "{{stage}}",
                )
            ],
            "ops",
        ),
        Panel(
            "Timeouts / s",
            [
                Target(
                    f"sum by (stage) (rate(pdserve_timeouts_total{{{proxy}}}[{RATE}]))"
                    " or vector(0)",
                    "{{stage}}",
                )
            ],
            "ops",
        ),
        Panel(
            "Decode migrations / s",
            [
                Target(
                    "sum by (stage, outcome) "
                    f"(rate(pdserve_migrations_total{{{proxy}}}[{RATE}])) or vector(0)",
                    "{{stage}} {{outcome}}",
                )
            ],
            "ops",
            description="Requests moved to another decode instance (with a fresh prefill "
            "leg) after their decode leg failed, one per move, by stage (before_first_byte: "
            "the client had no byte yet; mid_stream: its stream had started and continued "
            "from the tokens it had) and outcome (succeeded: the request then ended with "
            "HTTP 200; failed: it did not).",
        ),
    ]
    return dash


def pool(role: str) -> Dashboard:
    target = f'pdserve_role="{role}", instance=~"$instance"'
    engine = f'{target}, model_name=~"$model"'
    at_proxy = f'pdserve_role="proxy", role="{role}", {WORKER_URL}'
    variables = [
        datasource_variable(),
        query_variable(
            "model", "Model", f'vllm:num_requests_running{{pdserve_role="{role}"}}', "model_name"
        ),
        query_variable(
            "instance",
            "Instance",
            f'vllm:num_requests_running{{pdserve_role="{role}", model_name=~"$model"}}',
            "instance",
        ),
    ]
    stage = "prefill" if role == "prefill" else "decode_first_token"
    dash = Dashboard(
        uid=f"pdserve-{role}",
        title=f"pdserve / {role.capitalize()} pool",
        description=f"The {role} instances: the proxy's view of them and their vLLM engines.",
        variables=variables,
    )
    dash.panels += [
        Panel(
            "Healthy (proxy view)",
            [Target(f"sum(pdserve_instance_healthy{{{at_proxy}}})", "healthy")],
            "short",
            "stat",
            6,
        ),
        Panel(
            "Scraped up",
            [Target(f"sum(up{{{target}}})", "up")],
            "short",
            "stat",
            6,
        ),
        Panel(
            "Requests running",
            [Target(f"sum(vllm:num_requests_running{{{engine}}})", "running")],
            "short",
            "stat",
            6,
        ),
        Panel(
            "Requests waiting",
            [Target(f"sum(vllm:num_requests_waiting{{{engine}}})", "waiting")],
            "short",
            "stat",
            6,
        ),
        Panel(
            "Routing decisions / s",
            [
                Target(
                    "sum by (exported_instance) "
                    f"(rate(pdserve_routing_decisions_total{{{at_proxy}}}[{RATE}]))",
                    "{{exported_instance}}",
                )
            ],
            "ops",
            description="Requests the proxy's policy sent to each instance.",
        ),
        Panel(
            "Prefix-cache hit tokens / s: predicted vs engine",
            [
                Target(
                    "sum by (exported_instance) "
                    f"(rate(pdserve_routing_predicted_hit_tokens_total{{{at_proxy}}}[{RATE}]))"
                    " or vector(0)",
                    "predicted {{exported_instance}}",
                ),
                Target(
                    "sum by (exported_instance) "
                    f"(rate(pdserve_routing_observed_hit_tokens_total{{{at_proxy}}}[{RATE}]))"
                    " or vector(0)",
                    "engine {{exported_instance}}",
                ),
                Target(
                    f"count(pdserve_routing_cache_trusted{{{at_proxy}}} == 0) or vector(0)",
                    "instances distrusted",
                    right=True,
                ),
            ],
            "short",
            description=(
                "Cache-aware routing (kv_cache): the prompt tokens the proxy predicted the "
                "instances cache and what the engines reported, on the requests it could compare "
                "(non-streamed answers with usage.prompt_tokens_details), and how many instances "
                "it routes on load alone because the two disagree (alert "
                "PdserveCacheRoutingMispredicts). All 0 without cache-aware routing."
            ),
        ),
        Panel(
            "Prefix-cache predictions checked / s",
            [
                Target(
                    "sum by (exported_instance) "
                    f"(rate(pdserve_routing_hit_checks_total{{{at_proxy}}}[{RATE}])) or vector(0)",
                    "checked {{exported_instance}}",
                ),
                Target(
                    "sum by (exported_instance) "
                    f"(increase(pdserve_routing_cache_distrusted_total{{{at_proxy}}}[{RATE}]))"
                    " or vector(0)",
                    "distrusted {{exported_instance}}",
                    right=True,
                ),
            ],
            "ops",
            description=(
                "Requests whose predicted hit was compared with the engine's, and each time an "
                "instance's predictions stopped agreeing."
            ),
        ),
        Panel(
            "In-flight at the proxy",
            [
                Target(
                    "sum by (exported_instance) "
                    f"(pdserve_instance_in_flight_requests{{{at_proxy}}})",
                    "requests {{exported_instance}}",
                ),
                Target(
                    f"sum by (exported_instance) (pdserve_instance_in_flight_tokens{{{at_proxy}}})",
                    "tokens {{exported_instance}}",
                ),
            ],
        ),
        Panel(
            "Stage latency at the proxy"
            + (" (prefill round trip)" if role == "prefill" else " (decode sent to first byte)"),
            quantiles(
                "pdserve_stage_latency_seconds",
                f'pdserve_role="proxy", stage="{stage}"',
                qs=(0.5, 0.99),
            ),
            "s",
        ),
        Panel(
            "Ejections",
            [
                Target(
                    "sum by (exported_instance) "
                    f"(increase(pdserve_ejections_total{{{at_proxy}}}[{RATE}])) or vector(0)",
                    "{{exported_instance}}",
                )
            ],
            "short",
            description="Instances taken out of rotation after failed health checks.",
        ),
        Panel(
            "Engine requests running / waiting",
            [
                Target(
                    f"sum by (instance) (vllm:num_requests_running{{{engine}}})",
                    "running {{instance}}",
                ),
                Target(
                    f"sum by (instance) (vllm:num_requests_waiting{{{engine}}})",
                    "waiting {{instance}}",
                ),
            ],
        ),
        Panel(
            "KV cache usage",
            [
                Target(
                    f"max by (instance) (vllm:kv_cache_usage_perc{{{engine}}})",
                    "{{instance}}",
                )
            ],
            "percentunit",
            max_value=1,
        ),
    ]
    if role == "prefill":
        dash.panels += [
            Panel(
                "Prompt tokens / s",
                [
                    Target(
                        f"sum by (instance) (rate(vllm:prompt_tokens_total{{{engine}}}[{RATE}]))",
                        "{{instance}}",
                    )
                ],
                "short",
            ),
            Panel(
                "Prefix cache hit ratio",
                [
                    Target(
                        "sum by (instance) "
                        f"(rate(vllm:prefix_cache_hits_total{{{engine}}}[{RATE}]))"
                        " / sum by (instance) "
                        f"(rate(vllm:prefix_cache_queries_total{{{engine}}}[{RATE}]))",
                        "{{instance}}",
                    )
                ],
                "percentunit",
                max_value=1,
            ),
            Panel(
                "Engine prefill time",
                quantiles("vllm:request_prefill_time_seconds", engine, qs=(0.5, 0.99)),
                "s",
            ),
            Panel(
                "Engine queue time",
                quantiles("vllm:request_queue_time_seconds", engine, qs=(0.5, 0.99)),
                "s",
            ),
            Panel(
                "KV blocks held for decode pulls",
                [
                    Target(
                        f"sum by (instance) (pdserve_kv_blocks_held{{{engine}}})",
                        "{{instance}}",
                    )
                ],
                "short",
                description="Finished prompts' blocks waiting for a decode instance to pull.",
            ),
        ]
    else:
        dash.panels += [
            Panel(
                "Generation tokens / s",
                [
                    Target(
                        "sum by (instance) "
                        f"(rate(vllm:generation_tokens_total{{{engine}}}[{RATE}]))",
                        "{{instance}}",
                    )
                ],
                "short",
            ),
            Panel(
                "Engine inter-token latency",
                quantiles("vllm:inter_token_latency_seconds", engine, qs=(0.5, 0.99)),
                "s",
            ),
            Panel(
                "Engine decode time",
                quantiles("vllm:request_decode_time_seconds", engine, qs=(0.5, 0.99)),
                "s",
            ),
            Panel(
                "Engine TTFT (excludes remote prefill and handoff)",
                quantiles("vllm:time_to_first_token_seconds", engine, qs=(0.5, 0.99)),
                "s",
                description="The decode engine's own TTFT; the client's TTFT is on the overview.",
            ),
            Panel(
                "Finished requests / s by reason",
                [
                    Target(
                        "sum by (finished_reason) "
                        f"(rate(vllm:request_success_total{{{engine}}}[{RATE}]))",
                        "{{finished_reason}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Preemptions / s",
                [
                    Target(
                        f"sum by (instance) (rate(vllm:num_preemptions_total{{{engine}}}[{RATE}]))",
                        "{{instance}}",
                    )
                ],
                "ops",
            ),
            kv_recomputed(engine, "KV recomputed / s"),
        ]
    return dash


def kv_transfer() -> Dashboard:
    target = 'pdserve_role=~"prefill|decode", instance=~"$instance", model_name=~"$model"'
    by = "instance, pdserve_role"
    legend = "{{pdserve_role}} {{instance}}"
    variables = [
        datasource_variable(),
        query_variable(
            "model",
            "Model",
            'vllm:num_requests_running{pdserve_role=~"prefill|decode"}',
            "model_name",
        ),
        query_variable(
            "instance",
            "Instance",
            'vllm:num_requests_running{pdserve_role=~"prefill|decode", model_name=~"$model"}',
            "instance",
        ),
    ]
    dash = Dashboard(
        uid="pdserve-kv-transfer",
        title="pdserve / KV transfer",
        description="KV blocks moving from prefill to decode instances (pdserve_kv_*).",
        variables=variables,
    )
    bytes_rate = f"sum by ({by}) (rate(pdserve_kv_transfer_bytes_total{{{target}}}[{RATE}]))"
    dash.panels += [
        Panel(
            "Transfer bytes / s",
            [Target(f"sum(rate(pdserve_kv_transfer_bytes_total{{{target}}}[{RATE}]))", "bytes")],
            "Bps",
            "stat",
            8,
        ),
        Panel(
            "Transfers / s",
            [Target(f"sum(rate(pdserve_kv_transfer_seconds_count{{{target}}}[{RATE}]))", "xfers")],
            "ops",
            "stat",
            8,
        ),
        Panel(
            "Blocks held (prefill)",
            [Target(f"sum(pdserve_kv_blocks_held{{{target}}})", "blocks")],
            "short",
            "stat",
            8,
        ),
        Panel("Transfer bytes / s by instance", [Target(bytes_rate, legend)], "Bps"),
        Panel(
            "Transfer time",
            quantiles("pdserve_kv_transfer_seconds", target, qs=(0.5, 0.9, 0.99)),
            "s",
        ),
        Panel(
            "Transfer throughput (bytes per transfer-second)",
            [
                Target(
                    f"{bytes_rate} / sum by ({by}) "
                    f"(rate(pdserve_kv_transfer_seconds_sum{{{target}}}[{RATE}]))",
                    legend,
                )
            ],
            "Bps",
        ),
        Panel(
            "Transfer failures / s",
            [
                Target(
                    f"sum by ({by}) (rate(pdserve_kv_transfer_failures_total{{{target}}}[{RATE}]))",
                    legend,
                )
            ],
            "ops",
        ),
        Panel(
            "Leases expired / s",
            [
                Target(
                    f"sum by ({by}) (rate(pdserve_kv_leases_expired_total{{{target}}}[{RATE}]))",
                    legend,
                )
            ],
            "ops",
            description="Blocks held for the whole lease and never pulled.",
        ),
        kv_recomputed(target, "KV recomputed (decode)"),
        Panel(
            "PD handoff outcomes",
            [
                Target(
                    "sum by (outcome) "
                    f'(rate(pdserve_kv_handoffs_total{{pdserve_role="proxy"}}[{RATE}]))',
                    "{{outcome}}",
                ),
                Target(
                    "sum(rate(pdserve_kv_recomputed_requests_total"
                    f'{{pdserve_role="decode", model_name=~"$model"}}[{RATE}]))'
                    " / sum(rate(pdserve_requests_total"
                    f'{{pdserve_role="proxy", path="disaggregated", model=~"$model"}}[{RATE}]))',
                    "recompute ratio",
                    right=True,
                ),
            ],
            "reqps",
            description="Left: disaggregated requests answered by a decode instance, by what "
            "happened to the prompt's KV, as the proxy saw it (all proxies and models; "
            "streamed answers carry no outcome and count as unreported). Right: recomputed "
            "decode requests (decode counters, streamed included) per disaggregated proxy "
            "request; PdserveKVRecomputeHigh fires above 1% over 10 minutes.",
            right_unit="percentunit",
        ),
        Panel(
            "KV released by the proxy",
            [
                Target(
                    "sum by (outcome) "
                    f'(rate(pdserve_kv_releases_total{{pdserve_role="proxy"}}[{RATE}]))',
                    "{{outcome}}",
                )
            ],
            "ops",
            description="Prefill blocks the proxy freed because their decode leg did not "
            "complete (connect refused, error answer, timeout, client gone): released, "
            "not_held (already freed, or freed when the hold arrives), failed.",
        ),
        Panel(
            "Blocks held by instance",
            [Target(f"sum by ({by}) (pdserve_kv_blocks_held{{{target}}})", legend)],
        ),
        Panel(
            "Handoff latency at the proxy",
            quantiles(
                "pdserve_stage_latency_seconds",
                'pdserve_role="proxy", stage="handoff"',
                qs=(0.5, 0.99),
            ),
            "s",
            description="Prefill answer received to decode leg sent.",
        ),
    ]
    return dash


def dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON."""
    built = [overview(), pool("prefill"), pool("decode"), kv_transfer()]
    return {f"{d.uid}.json": d.to_json() for d in built}


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR, help="output directory")
    parser.add_argument("--check", action="store_true", help="fail if the files are not current")
    args = parser.parse_args(argv)
    stale = []
    for name, dashboard in dashboards().items():
        path = args.out / name
        text = render(dashboard)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if stale:
        print("stale dashboards (run this script): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
