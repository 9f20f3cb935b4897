"""Helpers for the observability tests: a real Prometheus on loopback, the rule files
with shortened ``for:``, and Grafana-style variable interpolation of panel queries."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.worker_launch import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
DASHBOARD_DIR = REPO / "deploy" / "grafana" / "dashboards"
MISSING_HINT = (
    "is not on PATH: install the Debian package `prometheus` "
    "(apt-get install -y prometheus; tests/run.sh and .ci/run do it via deploy/install.sh)"
)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} {MISSING_HINT}", pytrace=False)
    return path


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def write_rules_copy(directory: Path, for_override: str | None = None) -> list[Path]:
    """Copy the shipped rule files into ``directory``, every ``for:`` set to ``for_override``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for source in rule_files():
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
        if for_override is not None:
            for group in document["groups"]:
                for rule in group["rules"]:
                    if "alert" in rule:
                        rule["for"] = for_override
        target = directory / source.name
        target.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        written.append(target)
    return written


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def panel_targets(dashboard: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target["expr"]


# --- Grafana's interpolation, as its Prometheus datasource does it -----------------------

_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def _special_regex_escape(value: str) -> str:
    # Grafana's prometheusSpecialRegexEscape: the value lands inside a PromQL string
    # literal that is a regex, so each regex escape needs its backslash doubled.
    return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def format_variable(variable: Mapping[str, Any], selected: Sequence[str] | None) -> str:
    """The text Grafana puts for ``$name``: ``None`` selects "All"."""
    if selected is None:
        return str(variable.get("allValue") or ".*")
    escaped = [_special_regex_escape(value) for value in selected]
    if len(escaped) == 1:
        return escaped[0]
    return "(" + "|".join(escaped) + ")"


def interpolate(expr: str, values: Mapping[str, str], rate_interval: str) -> str:
    builtins = {
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": rate_interval,
    }
    merged = {**builtins, **values}

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        if name not in merged:
            raise KeyError(f"undefined variable ${name} in {expr!r}")
        return merged[name]

    return re.sub(r"\$\{(?P<braced>\w+)\}|\$(?P<bare>\w+)", replace, expr)


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$", re.S)


def parse_label_values(query: str) -> tuple[str, str]:
    match = _LABEL_VALUES.match(query.strip())
    if match is None:
        raise ValueError(f"unsupported variable query {query!r}")
    return match.group("selector").strip(), match.group("label")


def metric_names(expr: str) -> set[str]:
    """Metric names referenced in a PromQL expression (good enough for our dashboards)."""
    names = set()
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{|\[)", expr):
        names.add(match.group(1))
    # A bare name such as the SLO recording rule.
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)
    # Label lists of grouping and matching clauses are not metric names.
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped
    )
    for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        if ":" in token or token.startswith(("pdserve_", "vllm")):
            names.add(token)
    return {n for n in names if n.startswith(("pdserve", "vllm", "up"))}


def family_name(name: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- the server -------------------------------------------------------------------------


class PrometheusServer:
    """One real ``prometheus`` process on 127.0.0.1 with its own storage in ``workdir``."""

    def __init__(self, workdir: Path, config: Mapping[str, Any]) -> None:
        self.binary = require_binary("prometheus")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False), "utf-8")
        self.log_path = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout_s}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process_group(proc, grace_s=15, kill_wait_s=5)

    def api(self, path: str, **params: str | float | Sequence[str]) -> Any:
        query: list[tuple[str, str]] = []
        for key, value in params.items():
            if isinstance(value, (list, tuple)):
                query += [(key, str(v)) for v in value]
            else:
                query.append((key, str(value)))
        body = urllib.parse.urlencode(query).encode()
        request = urllib.request.Request(f"{self.url}/api/v1/{path}", data=body, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            payload = json.loads(exc.read() or b"{}")
            raise AssertionError(f"Prometheus {path} {params}: {payload}") from exc
        assert payload["status"] == "success", payload
        return payload["data"]

    def api_get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=30) as response:
            payload = json.loads(response.read())
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Any]:
        return list(self.api("query_range", query=expr, start=start, end=end, step=step)["result"])

    def label_values(self, label: str, selector: str, start: float, end: float) -> list[str]:
        path = f"label/{urllib.parse.quote(label)}/values?" + urllib.parse.urlencode(
            {"match[]": selector, "start": start, "end": end}
        )
        return list(self.api_get(path))

    def wait_for(self, expr: str, timeout_s: float, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: {expr}")
            time.sleep(0.5)

    def targets_up(self) -> dict[str, str]:
        data = self.api_get("targets?state=active")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}


def has_finite_sample(result: Sequence[Mapping[str, Any]]) -> bool:
    for series in result:
        for _, value in series.get("values", []):
            if math.isfinite(float(value)):
                return True
    return False
