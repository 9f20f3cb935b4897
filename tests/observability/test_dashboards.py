"""Structure of the provisioned Grafana dashboards (no server needed)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prom_harness import (
    DASHBOARD_DIR,
    REPO,
    dashboards,
    family_name,
    interpolate,
    metric_names,
    panel_targets,
    parse_label_values,
    rule_files,
)

GRAFANA_DIR = REPO / "deploy" / "grafana"
BUILTINS = {"__rate_interval", "__interval", "__range"}
# The contract's metric names (team contract, "Metrics").
CONTRACT_METRICS = {
    "pdserve_requests",
    "pdserve_ttft_seconds",
    "pdserve_inter_token_latency_seconds",
    "pdserve_e2e_latency_seconds",
    "pdserve_stage_latency_seconds",
    "pdserve_instance_in_flight_requests",
    "pdserve_instance_in_flight_tokens",
    "pdserve_instance_healthy",
    "pdserve_retries",
    "pdserve_migrations",
    "pdserve_ejections",
    "pdserve_timeouts",
    "pdserve_routing_decisions",
    "pdserve_kv_handoffs",
    "pdserve_kv_releases",
    "pdserve_kv_transfer_bytes",
    "pdserve_kv_transfer_seconds",
    "pdserve_kv_transfer_failures",
    "pdserve_kv_blocks_held",
    "pdserve_kv_leases_expired",
    "pdserve_kv_recomputed_requests",
    "pdserve_kv_recomputed_tokens",
    "pdserve_routing_predicted_hit_tokens",
    "pdserve_routing_observed_hit_tokens",
    "pdserve_routing_hit_checks",
    "pdserve_routing_cache_trusted",
    "pdserve_routing_cache_distrusted",
}
RECORDING_RULES = {"pdserve:slo_ttft_p99_seconds"}

ALL = dashboards()


def _vllm_metric_names() -> set[str]:
    """The vllm:* names vLLM's Prometheus logger registers, read from its source."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("vllm is not installed in this environment", pytrace=False)
    loggers = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    return set(re.findall(r'name="(vllm:[a-z_]+)"', loggers.read_text()))


def test_the_four_dashboards_exist() -> None:
    assert set(ALL) == {
        "pdserve-overview.json",
        "pdserve-prefill.json",
        "pdserve-decode.json",
        "pdserve-kv-transfer.json",
    }
    uids = [d["uid"] for d in ALL.values()]
    assert len(set(uids)) == len(uids)


def test_committed_json_matches_the_generator() -> None:
    result = subprocess.run(
        [sys.executable, str(GRAFANA_DIR / "generate_dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(ALL))
def test_panels_use_the_datasource_variable_and_unique_ids(name: str) -> None:
    dashboard = ALL[name]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{name}: panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip()
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))


@pytest.mark.parametrize("name", sorted(ALL))
def test_variables_are_defined_before_use(name: str) -> None:
    dashboard = ALL[name]
    variables = dashboard["templating"]["list"]
    names = [v["name"] for v in variables]
    assert names[0] == "datasource"
    assert {"datasource", "instance", "model"} <= set(names)
    assert variables[0]["type"] == "datasource" and variables[0]["query"] == "prometheus"
    defined: set[str] = set(BUILTINS)
    for variable in variables:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"
            selector, _ = parse_label_values(variable["query"])
            # Chained variables may only use the ones before them.
            interpolate(selector, {n: ".*" for n in defined - BUILTINS}, "1m")
            assert variable["multi"] and variable["includeAll"]
        defined.add(variable["name"])
    values = {n: ".*" for n in defined - BUILTINS}
    for panel, expr in panel_targets(dashboard):
        try:
            interpolate(expr, values, "1m")
        except KeyError as exc:
            pytest.fail(f"{name}: panel {panel['title']!r}: {exc}")


@pytest.mark.parametrize("name", sorted(ALL))
def test_panels_fit_the_grid_without_overlap(name: str) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in ALL[name]["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{name}: {panel['title']!r} overlaps"
                cells.add((x, y))


def test_queries_name_only_contract_vllm_and_recording_metrics() -> None:
    """A typo in a metric name would only show up as an empty panel; catch it here."""
    vllm_names = _vllm_metric_names()
    assert "vllm:num_requests_running" in vllm_names
    exprs: list[str] = [expr for d in ALL.values() for _, expr in panel_targets(d)]
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            exprs += [rule["expr"] for rule in group["rules"]]
    exprs += [
        parse_label_values(v["query"])[0]
        for d in ALL.values()
        for v in d["templating"]["list"]
        if v["type"] == "query"
    ]
    for expr in exprs:
        for metric in metric_names(expr):
            if metric == "up" or metric in RECORDING_RULES:
                continue
            base = family_name(metric)
            assert base in CONTRACT_METRICS or base in vllm_names, f"unknown metric {metric}"


def test_every_contract_metric_is_on_some_dashboard() -> None:
    used = {
        family_name(m)
        for d in ALL.values()
        for _, expr in panel_targets(d)
        for m in metric_names(expr)
    }
    assert CONTRACT_METRICS - used == set()


def test_contract_metrics_are_the_ones_the_code_exports() -> None:
    """The proxy's and the connector's metric names, read from their source (no vLLM import)."""
    exported = set()
    for source in ("proxy/metrics.py", "kv_transfer/stats.py"):
        exported |= set(re.findall(r'"(pdserve_[a-z0-9_]+)"', (REPO / source).read_text()))
    assert {family_name(name) for name in exported} == CONTRACT_METRICS


def _panel(dashboard: str, title: str) -> dict[str, Any]:
    (panel,) = [p for p in ALL[dashboard]["panels"] if p["title"] == title]
    return panel


def test_kv_recompute_panels() -> None:
    """Recomputation answers HTTP 200: these panels are where it shows."""
    for dashboard, title in (
        ("pdserve-kv-transfer.json", "KV recomputed (decode)"),
        ("pdserve-decode.json", "KV recomputed / s"),
    ):
        exprs = [t["expr"] for t in _panel(dashboard, title)["targets"]]
        assert [e.startswith("sum by (reason) (rate(") for e in exprs] == [True, True]
        assert [metric_names(e) for e in exprs] == [
            {"pdserve_kv_recomputed_requests_total"},
            {"pdserve_kv_recomputed_tokens_total"},
        ]
        assert all('model_name=~"$model"' in e and 'instance=~"$instance"' in e for e in exprs)
    handoffs = _panel("pdserve-kv-transfer.json", "PD handoff outcomes")
    outcomes, ratio = (t["expr"] for t in handoffs["targets"])
    assert outcomes.startswith("sum by (outcome) (rate(pdserve_kv_handoffs_total{")
    assert metric_names(ratio) == {"pdserve_kv_recomputed_requests_total", "pdserve_requests_total"}
    assert 'path="disaggregated"' in ratio


@pytest.mark.parametrize("name", sorted(ALL))
def test_right_axis_overrides_name_existing_queries(name: str) -> None:
    for panel in ALL[name]["panels"]:
        ref_ids = {t["refId"] for t in panel["targets"]}
        for override in panel["fieldConfig"]["overrides"]:
            matcher = override["matcher"]
            assert matcher["id"] == "byFrameRefID", panel["title"]
            assert matcher["options"] in ref_ids, panel["title"]


def _load_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return document


def test_provisioning_files() -> None:
    datasources = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "pdserve.yml")
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    providers = _load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "pdserve.yml")
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert DASHBOARD_DIR.is_dir()
