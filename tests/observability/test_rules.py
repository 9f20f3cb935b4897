"""promtool checks of the shipped Prometheus configs and alert rules.

These run promtool (from the Debian ``prometheus`` package) but start no server, so they
are part of the fast suite."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from prom_harness import PROMETHEUS_DIR, RULES_DIR, require_binary, rule_files, write_rules_copy

from deploy.prometheus_sd import JOB_ROLES, ROLE_LABEL, write_file_sd

HERE = Path(__file__).resolve().parent


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_promtool_check_rules() -> None:
    files = [str(path) for path in rule_files()]
    assert len(files) >= 2, files
    result = promtool("check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_static_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_promtool_check_file_sd_config(tmp_path: Path) -> None:
    """The cluster config as a launcher leaves it: a targets file next to it, written by
    write_file_sd. promtool then has nothing to warn about either."""
    for name in ("prometheus-file-sd.yml", "rules"):
        source = PROMETHEUS_DIR / name
        if source.is_dir():
            write_rules_copy(tmp_path / name)
        else:
            (tmp_path / name).write_text(source.read_text())
    write_file_sd(
        {"proxy": ["127.0.0.1:8000"], "prefill": ["127.0.0.1:8100"], "decode": ["127.0.0.1:8200"]},
        tmp_path / "targets" / "pdserve.json",
    )
    result = promtool("check", "config", str(tmp_path / "prometheus-file-sd.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_static_config_labels_match_file_sd() -> None:
    """Dashboards select on pdserve_role: both configs must set it the same way."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    roles = {}
    for job in config["scrape_configs"]:
        assert job.get("honor_labels", False) is False, job["job_name"]
        for group in job["static_configs"]:
            roles[job["job_name"]] = group["labels"][ROLE_LABEL]
    assert roles == JOB_ROLES


def test_alert_rules_unit_tests() -> None:
    """Each alert fires on its condition and stays quiet otherwise (alerts_test.yml)."""
    result = promtool("test", "rules", "alerts_test.yml", cwd=HERE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_slo_undefined_alert_fires_without_the_slo_file(tmp_path: Path) -> None:
    labels = {"severity": "warning"}
    notes = {
        "summary": "pdserve:slo_ttft_p99_seconds is not defined",
        "description": "Load rules/pdserve-slo.yml next to pdserve-alerts.yml.",
    }
    test_file = tmp_path / "slo_missing_test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES_DIR / "pdserve-alerts.yml")],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [],
                        "alert_rule_test": [
                            {
                                "eval_time": "11m",
                                "alertname": "PdserveSLOUndefined",
                                "exp_alerts": [{"exp_labels": labels, "exp_annotations": notes}],
                            }
                        ],
                    }
                ],
            }
        )
    )
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_summary_and_description() -> None:
    names = set()
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                assert rule["alert"] not in names, f"duplicate alert {rule['alert']}"
                names.add(rule["alert"])
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"], rule["alert"]
                assert rule["annotations"]["description"], rule["alert"]
    assert {
        "PdserveNoHealthyPrefillInstance",
        "PdserveNoHealthyDecodeInstance",
        "PdservePrefillFallback",
        "PdserveTTFTp99OverSLO",
        "PdserveKVTransferFailures",
        "PdserveKVLeaseExpired",
        "PdserveKVBlocksHeldWithoutTraffic",
        "PdserveKVRecomputeHigh",
        "PdserveDecodeMigrations",
    } <= names


def test_rules_copy_overrides_for(tmp_path: Path) -> None:
    for path in write_rules_copy(tmp_path, for_override="2s"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["for"] == "2s"
