"""Proxy config files and the `pdserve proxy` command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deploy.cli import CliError
from proxy import cli
from proxy.config import ProxyConfig, load_proxy_config


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_match_the_contract() -> None:
    config = ProxyConfig()
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.admin.port == 8001 and config.admin.token is None
    assert config.prefill_policy.name == "prefill_cost"
    assert config.decode_policy.name == "least_load"
    assert config.upstream_keepalive_s < 5.0
    assert config.max_body_bytes == 8 * 1024 * 1024
    t = config.timeouts
    assert (t.connect_s, t.prefill_s, t.first_byte_s, t.stall_s) == (2.0, 300.0, 300.0, 120.0)
    h = config.health
    assert (h.interval_s, h.timeout_s, h.failures_to_eject, h.successes_to_readmit) == (2, 2, 3, 2)
    r = config.retries
    assert (r.decode_attempts, r.backoff_s, r.backoff_max_s, r.deadline_s) == (3, 0.05, 1.0, 600.0)
    # The default deadline leaves a first attempt its full stage timeouts.
    assert r.deadline_s >= t.prefill_s + t.first_byte_s


def test_topology_file_proxy_section(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(
        "model: /models/tiny\n"
        "proxy:\n"
        "  port: 9000\n"
        "  prefill: ['127.0.0.1:8100']\n"
        "  decode: ['http://127.0.0.1:8200/']\n"
        "  decode_policy: {name: power_of_two}\n"
        "  timeouts: {stall_s: 5}\n"
        "  retries: {decode_attempts: 1, deadline_s: 30}\n"
    )
    config = load_proxy_config(path)
    assert config.port == 9000
    assert config.prefill == ["http://127.0.0.1:8100"]
    assert config.decode == ["http://127.0.0.1:8200"]
    assert config.decode_policy.name == "power_of_two"
    assert config.timeouts.stall_s == 5
    assert (config.retries.decode_attempts, config.retries.deadline_s) == (1, 30)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("proxy: {prot: 1}\n", "prot"),
        ("proxy: {timeouts: {stall_s: -1}}\n", "timeouts.stall_s"),
        ("proxy: {retries: {decode_attempts: 0}}\n", "retries.decode_attempts"),
        ("proxy: {retries: {deadline_s: 0}}\n", "retries.deadline_s"),
        ("proxy: {retries: {backoff_s: 2, backoff_max_s: 1}}\n", "retries: backoff_max_s"),
        ("proxy: {retries: {attempts: 2}}\n", "retries.attempts: unknown key"),
        ("proxy: {decode: ['ftp://x']}\n", "decode"),
        ("- a list\n", "mapping"),
        ("proxy: [\n", "not valid YAML"),
    ],
)
def test_bad_config_files_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_proxy_config(path)
    assert "\n" not in str(info.value).strip()


def test_cli_flags_extend_and_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("decode: ['http://10.0.0.1:8200']\nport: 9100\n")
    token = tmp_path / "admin-token"
    token.write_text("t-0123456789abcdef\n")
    token.chmod(0o600)
    config = cli.build_config(
        parse(
            "--config", str(path), "--decode", "http://10.0.0.2:8200",
            "--prefill", "10.0.0.3:8100", "10.0.0.4:8100", "--port", "9200",
            "--decode-policy", "round_robin", "--admin-token-file", str(token),
        )
    )  # fmt: skip
    assert config.decode == ["http://10.0.0.1:8200", "http://10.0.0.2:8200"]
    assert config.prefill == ["http://10.0.0.3:8100", "http://10.0.0.4:8100"]
    assert config.port == 9200
    assert config.decode_policy.name == "round_robin"
    assert config.admin.token == "t-0123456789abcdef"


def test_admin_token_is_never_taken_from_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse("--admin-token", "t-0123456789abcdef")
    loose = tmp_path / "admin-token"
    loose.write_text("t-0123456789abcdef\n")
    loose.chmod(0o644)
    with pytest.raises(CliError, match="chmod 600"):
        cli.build_config(parse("--admin-token-file", str(loose)))


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="cannot read"):
        cli.build_config(parse("--config", str(tmp_path / "missing.yaml")))
    with pytest.raises(CliError, match="port"):
        cli.build_config(parse("--decode", "http://x:1", "--port", "70000"))


def test_unknown_policy_is_a_cli_error() -> None:
    args = parse("--decode", "http://127.0.0.1:1", "--decode-policy", "no_such_policy")
    args.config = None
    with pytest.raises(CliError, match="no_such_policy"):
        cli.run(args)
