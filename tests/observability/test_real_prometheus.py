"""A real Prometheus scraping a live pdserve deployment under a short load.

Two deployments, each scraped by its own Prometheus (loopback, 1 s scrape and
evaluation, storage in tmp) configured from deploy/prometheus/prometheus-file-sd.yml
with targets written by deploy.prometheus_sd.write_file_sd, as the launcher does:

* ``fake``: the real proxy in front of benchmarks/fake_worker.py workers (seconds to
  start; only the proxy has /metrics, so only the overview dashboard is checked).
* ``vllm``: the real proxy in front of the session's real vLLM prefill and decode engines
  (tests/conftest.py ``real_prefill``/``real_decode``, with the KV connector); every
  dashboard is checked.

For each: every dashboard panel's PromQL returns data (range query over the load,
template variables substituted as Grafana does, once with "All" and once with one
value picked), every metric a query names is known to Prometheus, every rule evaluates
with health "ok", and PdserveNoHealthyPrefillInstance fires once the prefill instance
is stopped (the rules are loaded with ``for: 2s``): the fake prefill is killed, the
shared vLLM prefill is frozen with SIGSTOP and thawed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prom_harness import (
    PROMETHEUS_DIR,
    PrometheusServer,
    dashboards,
    family_name,
    format_variable,
    has_finite_sample,
    interpolate,
    metric_names,
    panel_targets,
    parse_label_values,
    write_rules_copy,
)

from deploy.prometheus_sd import write_file_sd
from deploy.worker_launch import free_port, signal_group, stop_process_group

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRAPE_S = 1
# Series the load creates and the proxy's own counters it compares with Prometheus's.
CAUGHT_UP_METRICS = ("pdserve_requests_total", "pdserve_inter_token_latency_seconds_count")


@dataclass
class Deployment:
    name: str
    proxy_url: str
    prefill_urls: list[str]
    decode_urls: list[str]
    model: str
    workers_have_metrics: bool
    stop_prefill: Callable[[], object]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _target(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _start(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> Any:
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process_group(proc, grace_s=20, kill_wait_s=10)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{url}: process exited {proc.returncode}: {log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout_s}s: {log.read_text()[-3000:]}")


def _start_proxy(workdir: Path, prefill: list[str], decode: list[str]) -> tuple[str, Any]:
    port, admin_port = free_port(), free_port()
    config = {
        "proxy": {
            "host": "127.0.0.1",
            "port": port,
            "prefill": prefill,
            "decode": decode,
            # Short prompts skip the prefill leg, so both paths show on the dashboards.
            "disagg_min_prompt_tokens": 6,
            # Fast ejection so the "no healthy prefill" alert fires within seconds.
            "health": {"interval_s": 0.5, "timeout_s": 1.0, "failures_to_eject": 2},
            "admin": {"port": admin_port},
        }
    }
    config_path = workdir / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = workdir / "proxy.log"
    proc = _start([sys.executable, "-m", "deploy.cli", "proxy", "--config", str(config_path)], log)
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/metrics", 90, proc, log)
    return url, proc


@contextlib.contextmanager
def fake_deployment(workdir: Path) -> Iterator[Deployment]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls = {}
        for role in ("prefill", "decode"):
            port = free_port()
            log = workdir / f"fake-{role}.log"
            argv = [sys.executable, "-m", "benchmarks.fake_worker", "--role", role]
            argv += ["--port", str(port), "--model", "fake-model", "--token-delay-ms", "5"]
            proc = _start(argv, log)
            procs.append(proc)
            urls[role] = f"http://127.0.0.1:{port}"
            _wait_http(f"{urls[role]}/health", 90, proc, log)
        proxy_url, proxy = _start_proxy(workdir, [urls["prefill"]], [urls["decode"]])
        procs.append(proxy)
        yield Deployment(
            name="fake",
            proxy_url=proxy_url,
            prefill_urls=[urls["prefill"]],
            decode_urls=[urls["decode"]],
            model="fake-model",
            workers_have_metrics=False,
            stop_prefill=lambda: _stop(procs[0]),
            processes=procs,
        )
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _signal_server(server: Any, signum: int) -> None:
    """Signal a tests/conftest.py RunningServer: its command and the vLLM server group."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.proc.pid, signum)
    group = server.server_group()
    if group is not None:
        signal_group(group, signum)


@contextlib.contextmanager
def vllm_deployment(workdir: Path, prefill: Any, decode: Any) -> Iterator[Deployment]:
    """The session's real engines (tests/conftest.py) behind a proxy of our own, whose health
    checks are fast enough for the alert to fire within seconds.

    The engines are shared with the rest of the session, so "stopping" the prefill instance
    freezes it (SIGSTOP: health checks and scrapes time out, as for a hung host) and the
    teardown thaws it and waits until it answers again."""
    proxy_url, proxy = _start_proxy(workdir, [prefill.url], [decode.url])
    frozen = False

    def freeze_prefill() -> None:
        nonlocal frozen
        frozen = True
        _signal_server(prefill, signal.SIGSTOP)

    try:
        yield Deployment(
            name="vllm",
            proxy_url=proxy_url,
            prefill_urls=[prefill.url],
            decode_urls=[decode.url],
            model=_served_model(decode.url),
            workers_have_metrics=True,
            stop_prefill=freeze_prefill,
        )
    finally:
        _stop(proxy)
        if frozen:
            _signal_server(prefill, signal.SIGCONT)
            _wait_http(f"{prefill.url}/health", 60, prefill.proc, prefill.log_path)
            # A session-wide proxy ejected the frozen instance too; let it readmit it
            # (2 passed checks at its 2 s default interval) before other tests run.
            time.sleep(6)


def _served_model(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return str(json.loads(response.read())["data"][0]["id"])


def _prometheus_config(workdir: Path) -> dict[str, Any]:
    """prometheus-file-sd.yml with test timings and the rules copied with ``for: 2s``."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus-file-sd.yml").read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    write_rules_copy(workdir / "rules", for_override="2s")
    config["rule_files"] = [str(workdir / "rules" / "*.yml")]
    (job,) = config["scrape_configs"]
    job["scrape_timeout"] = "1s"
    job["file_sd_configs"][0]["files"] = [str(workdir / "targets" / "*.json")]
    return config


def _send_load(deployment: Deployment, requests: int) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{deployment.proxy_url}/v1", api_key="unused", max_retries=0)
    long_prompt = "Prefill and decode are two phases of serving a large language model. " * 3
    for i in range(requests):
        prompt = long_prompt if i % 3 else "Hi"  # every third one takes the aggregated path
        if i % 2:
            stream = client.chat.completions.create(
                model=deployment.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=8,
                stream=True,
                timeout=60,
            )
            for _ in stream:
                pass
        else:
            stream_c = client.completions.create(
                model=deployment.model, prompt=prompt, max_tokens=8, stream=True, timeout=60
            )
            for _ in stream_c:
                pass
            client.completions.create(
                model=deployment.model, prompt=prompt, max_tokens=4, timeout=60
            )


@dataclass
class Scraped:
    deployment: Deployment
    prometheus: PrometheusServer
    start: float
    end: float
    # $__rate_interval as substituted: spans the baseline scrape to the last one.
    rate_interval: str


def _proxy_totals(deployment: Deployment) -> dict[str, float]:
    """The proxy's own sums of CAUGHT_UP_METRICS, read from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{deployment.proxy_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    totals = dict.fromkeys(CAUGHT_UP_METRICS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


def _wait_caught_up(prom: PrometheusServer, deployment: Deployment) -> None:
    """Block until Prometheus holds a scrape of the proxy taken after every request so far.

    A starved proxy can miss scrapes (1 s timeout) for a while; waiting on the values
    rather than on the clock makes the range queries see the whole load every time.
    """
    totals = _proxy_totals(deployment)
    expr = " and ".join(
        f'sum({name}{{pdserve_role="proxy"}}) == {value:g}' for name, value in totals.items()
    )
    prom.wait_for(expr, 120, "a scrape of the proxy after the load")


@contextlib.contextmanager
def scraped(deployment: Deployment, workdir: Path, requests: int) -> Iterator[Scraped]:
    prom = PrometheusServer(workdir, _prometheus_config(workdir))
    targets: dict[str, list[str]] = {"proxy": [_target(deployment.proxy_url)]}
    if deployment.workers_have_metrics:
        targets["prefill"] = [_target(u) for u in deployment.prefill_urls]
        targets["decode"] = [_target(u) for u in deployment.decode_urls]
    write_file_sd(targets, workdir / "targets" / "pdserve.json")
    prom.start()
    try:
        expected = sum(len(v) for v in targets.values())
        prom.wait_for(f"count(up == 1) == {expected}", 90, "every target scraped")
        # rate() counts increases from a series' first sample on, so every series the load
        # makes gets a scraped baseline first; a rate window reaching back to it then holds
        # an increase whatever scrapes a busy machine drops during the load.
        _send_load(deployment, 3)
        _wait_caught_up(prom, deployment)
        baseline = time.time()
        _send_load(deployment, requests)
        _wait_caught_up(prom, deployment)
        time.sleep(2 * SCRAPE_S)  # the workers' scrapes after the load too
        end = time.time()
        window = f"{int(end - baseline) + 4 * SCRAPE_S}s"
        yield Scraped(deployment, prom, baseline, end, window)
    finally:
        prom.stop()


@pytest.fixture(scope="class")
def fake_scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    workdir = tmp_path_factory.mktemp("obs-fake")
    with fake_deployment(workdir) as deployment, scraped(deployment, workdir, 24) as s:
        yield s


@pytest.fixture(scope="class")
def vllm_scraped(
    tmp_path_factory: pytest.TempPathFactory, real_prefill: Any, real_decode: Any
) -> Iterator[Scraped]:
    workdir = tmp_path_factory.mktemp("obs-vllm")
    with (
        vllm_deployment(workdir, real_prefill, real_decode) as deployment,
        scraped(deployment, workdir, 18) as s,
    ):
        yield s


# --- the checks, shared by both deployments ---------------------------------------------


def _variable_values(s: Scraped, dashboard: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each query variable's options, resolved in order as Grafana does ("All" upstream)."""
    options: dict[str, list[str]] = {}
    chosen: dict[str, str] = {"datasource": "unused"}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = parse_label_values(variable["query"])
        selector = interpolate(selector, chosen, s.rate_interval)
        values = s.prometheus.label_values(label, selector, s.start, s.end)
        assert values, f"{dashboard['uid']}: variable ${variable['name']} has no values"
        options[variable["name"]] = values
        chosen[variable["name"]] = format_variable(variable, None)
    return options


def check_panels(s: Scraped, names: Sequence[str]) -> int:
    """Every panel query returns a finite sample, with "All" and with one value picked."""
    failures: list[str] = []
    checked = 0
    for name in names:
        dashboard = dashboards()[name]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        options = _variable_values(s, dashboard)
        selections = [
            {n: format_variable(variables[n], None) for n in options},
            {n: format_variable(variables[n], [values[0]]) for n, values in options.items()},
        ]
        for selection in selections:
            selection["datasource"] = "unused"
            for panel, expr in panel_targets(dashboard):
                query = interpolate(expr, selection, s.rate_interval)
                result = s.prometheus.query_range(query, s.start, s.end, SCRAPE_S)
                checked += 1
                if not has_finite_sample(result):
                    failures.append(f"{name} / {panel['title']}: {query}")
    assert not failures, "panels without data:\n" + "\n".join(failures)
    return checked


def check_metrics_known(s: Scraped, names: Sequence[str]) -> None:
    """Queries with an ``or vector(0)`` fallback always return data; make sure the metric
    behind them is really exported (Prometheus keeps each family's metadata even before
    its first sample)."""
    metadata = s.prometheus.api_get("metadata")
    series_names = set(s.prometheus.api_get("label/__name__/values"))
    missing = []
    for name in names:
        for _, expr in panel_targets(dashboards()[name]):
            for metric in metric_names(expr):
                # Text-format targets key metadata by the sample name, OpenMetrics ones
                # by the family name (a counter's without _total).
                if {metric, family_name(metric)} & (series_names | set(metadata)):
                    continue
                missing.append(f"{name}: {metric}")
    assert not missing, f"metrics not exported by any target: {sorted(set(missing))}"


def check_rules_healthy(s: Scraped) -> None:
    deadline = time.monotonic() + 15
    while True:
        groups = s.prometheus.api_get("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        bad = [r for r in rules if r["health"] != "ok"]
        if rules and not bad:
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"rules not healthy: {[(r['name'], r.get('lastError')) for r in bad]}"
            )
        time.sleep(1)
    shipped = set()
    for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            shipped |= {rule.get("alert") or rule.get("record") for rule in group["rules"]}
    assert {r["name"] for r in rules} == shipped
    slo = s.prometheus.query("pdserve:slo_ttft_p99_seconds")
    assert [float(x["value"][1]) for x in slo] == [2.0]


def _alert_states(s: Scraped, name: str) -> list[str]:
    alerts = s.prometheus.api_get("alerts")["alerts"]
    return [a["state"] for a in alerts if a["labels"]["alertname"] == name]


def check_prefill_alert_fires(s: Scraped) -> None:
    name = "PdserveNoHealthyPrefillInstance"
    assert _alert_states(s, name) == [], "alert active before the prefill instance stopped"
    healthy = s.prometheus.query('pdserve_instance_healthy{role="prefill"}')
    assert [float(x["value"][1]) for x in healthy] == [1.0]
    s.deployment.stop_prefill()
    stopped = time.monotonic()
    deadline = stopped + 60
    while "firing" not in _alert_states(s, name):
        assert time.monotonic() < deadline, f"{name} not firing 60 s after the prefill stopped"
        time.sleep(0.5)
    alert = next(
        a for a in s.prometheus.api_get("alerts")["alerts"] if a["labels"]["alertname"] == name
    )
    assert alert["labels"]["job"] == "pdserve-proxy"
    assert alert["labels"]["severity"] == "warning"
    # The decode pool is fine: its alert stays quiet.
    assert _alert_states(s, "PdserveNoHealthyDecodeInstance") == []


# --- fake workers -----------------------------------------------------------------------

FAKE_DASHBOARDS = ["pdserve-overview.json"]


class TestFakeWorkers:
    """Real proxy and Prometheus, fake workers: seconds."""

    def test_fake_targets_carry_role_labels(self, fake_scraped: Scraped) -> None:
        up = fake_scraped.prometheus.query("up")
        assert [(x["metric"]["job"], x["metric"]["pdserve_role"]) for x in up] == [
            ("pdserve-proxy", "proxy")
        ]
        per_instance = fake_scraped.prometheus.query("pdserve_instance_healthy")
        exported = {x["metric"]["exported_instance"] for x in per_instance}
        assert exported == {
            *fake_scraped.deployment.prefill_urls,
            *fake_scraped.deployment.decode_urls,
        }

    def test_fake_overview_panels_return_data(self, fake_scraped: Scraped) -> None:
        assert check_panels(fake_scraped, FAKE_DASHBOARDS) > 20
        check_metrics_known(fake_scraped, FAKE_DASHBOARDS)

    def test_fake_rules_evaluate(self, fake_scraped: Scraped) -> None:
        check_rules_healthy(fake_scraped)

    def test_fake_prefill_alert_fires_when_prefill_stops(self, fake_scraped: Scraped) -> None:
        check_prefill_alert_fires(fake_scraped)


# --- real vLLM engines ------------------------------------------------------------------

ALL_DASHBOARDS = sorted(dashboards())


class TestVllmEngines:
    """Real proxy, Prometheus and vLLM engines."""

    @pytest.mark.timeout(900)
    def test_vllm_targets_carry_role_labels(self, vllm_scraped: Scraped) -> None:
        up = vllm_scraped.prometheus.query("up")
        roles = sorted((x["metric"]["job"], x["metric"]["pdserve_role"]) for x in up)
        assert roles == [
            ("pdserve-decode", "decode"),
            ("pdserve-prefill", "prefill"),
            ("pdserve-proxy", "proxy"),
        ]
        assert all(float(x["value"][1]) == 1.0 for x in up)

    @pytest.mark.timeout(300)
    def test_vllm_every_dashboard_panel_returns_data(self, vllm_scraped: Scraped) -> None:
        assert check_panels(vllm_scraped, ALL_DASHBOARDS) > 100
        check_metrics_known(vllm_scraped, ALL_DASHBOARDS)

    def test_vllm_rules_evaluate(self, vllm_scraped: Scraped) -> None:
        check_rules_healthy(vllm_scraped)

    @pytest.mark.timeout(180)
    def test_vllm_prefill_alert_fires_when_prefill_stops(self, vllm_scraped: Scraped) -> None:
        check_prefill_alert_fires(vllm_scraped)
        # Prometheus's own view agrees: the prefill target is down.
        vllm_scraped.prometheus.wait_for(
            'ALERTS{alertname="PdserveTargetDown", pdserve_role="prefill", alertstate="firing"}',
            30,
            "PdserveTargetDown for the prefill target",
        )
