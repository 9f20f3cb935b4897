"""The KV secret on the deploy side: never in argv, the kv-transfer-config JSON or a log line;
handed to workers through their environment; configured as a value, a 0600 file or an
environment variable, or generated per cluster by `pdserve up`; placeholders refused."""

from __future__ import annotations

import argparse
import functools
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from deploy import cluster_state, up_cli, worker_cli
from deploy.cli import CliError
from deploy.controller import Controller
from deploy.instance_actor import InstancePlan, build_worker_spec
from deploy.topology import Topology, TopologyError, load_topology, validate_topology
from deploy.worker_launch import (
    WorkerConfigError,
    WorkerSpec,
    build_command,
    free_port,
    start_worker,
    validate_spec,
)
from kv_transfer.config import SECRET_ENV, SECRET_FILE_ENV

SECRET = "Qm9vdHN0cmFwLWt2LXNlY3JldA-deploy"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(autouse=True)
def _no_inherited_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _secret_file(path: Path, content: str = SECRET, mode: int = 0o600) -> Path:
    path.write_text(content + "\n")
    path.chmod(mode)
    return path


# -- the worker command -----------------------------------------------------------------------


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_secret_is_in_the_env_and_nowhere_in_argv(model_dir: Path, role: str) -> None:
    spec = WorkerSpec(role=role, model=model_dir, secret=SECRET)  # type: ignore[arg-type]
    argv, env = build_command(spec)
    assert not any(SECRET in arg for arg in argv), argv
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert SECRET not in json.dumps(kv)
    assert "secret" not in kv["kv_connector_extra_config"]
    assert env[SECRET_ENV] == SECRET
    # An inherited $PDSERVE_KV_SECRET_FILE can neither win over nor conflict with the spec.
    assert env[SECRET_FILE_ENV] == ""
    assert SECRET not in repr(spec)


def test_a_worker_without_a_connector_gets_no_secret_variables(model_dir: Path) -> None:
    _, env = build_command(WorkerSpec(role="aggregated", model=model_dir, secret=SECRET))
    assert SECRET_ENV not in env and SECRET_FILE_ENV not in env


FAKE_VLLM = """
import json, os, sys
from kv_transfer.config import TransferSettings
argv = sys.argv[1:]
config = json.loads(argv[argv.index("--kv-transfer-config") + 1])
settings = TransferSettings.from_extra_config(config["kv_connector_extra_config"])
cmdline = open("/proc/self/cmdline", "rb").read()
json.dump(
    {"secret": settings.secret.decode(), "cmdline": cmdline.decode(errors="replace")},
    open(os.environ["FAKE_VLLM_OUT"], "w"),
)
"""


def test_the_started_server_finds_the_secret_its_argv_does_not_show(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_worker's real process: what the connector parses in it, and its /proc cmdline."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    interpreter = tmp_path / "python"
    interpreter.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {script} "$@"\n')
    interpreter.chmod(0o700)
    out = tmp_path / "out.json"
    repo = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FAKE_VLLM_OUT", str(out))
    # A stale file variable in the caller's environment must not get in the way.
    monkeypatch.setenv(SECRET_FILE_ENV, str(tmp_path / "stale"))
    spec = WorkerSpec(role="prefill", model=model_dir, secret=SECRET, python=str(interpreter))
    proc = start_worker(spec, log_path=tmp_path / "worker.log", validate=False)
    assert proc.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()
    seen = json.loads(out.read_text())
    assert seen["secret"] == SECRET
    assert "--kv-transfer-config" in seen["cmdline"] and SECRET not in seen["cmdline"]
    assert SECRET not in (tmp_path / "worker.log").read_text()


def test_validate_refuses_weak_secrets_and_reachable_prefill_without_one(model_dir: Path) -> None:
    # The KV events ports are beside the point here, and their defaults may be taken on a busy
    # host (another cluster's workers): leave them out.
    Spec = functools.partial(WorkerSpec, kv_events=False)
    port = free_port()
    with pytest.raises(WorkerConfigError, match=r"^secret: the secret is a placeholder"):
        validate_spec(Spec(role="prefill", model=model_dir, api_port=port, secret="change-me"))
    with pytest.raises(WorkerConfigError, match="shorter than 16"):
        validate_spec(Spec(role="decode", model=model_dir, api_port=port, secret="s3cret"))
    kv_port = free_port()
    reachable = r"^secret: a prefill worker listening on 0\.0\.0\.0"
    with pytest.raises(WorkerConfigError, match=reachable):
        validate_spec(
            Spec(role="prefill", model=model_dir, host="0.0.0.0", api_port=port, kv_port=kv_port)
        )
    # Loopback without a secret, or a reachable address with one, is fine.
    validate_spec(Spec(role="prefill", model=model_dir, api_port=port, kv_port=kv_port))
    validate_spec(
        Spec(
            role="prefill",
            model=model_dir,
            host="0.0.0.0",
            api_port=port,
            kv_port=kv_port,
            secret=SECRET,
        )
    )
    # A decode worker only dials out.
    validate_spec(Spec(role="decode", model=model_dir, host="0.0.0.0", api_port=port))


# -- pdserve worker ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve worker")
    worker_cli.add_arguments(parser)
    return parser


def test_kv_secret_flag_is_gone_with_a_clear_error(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["prefill", "--model", str(model_dir), "--kv-secret", SECRET])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-secret was removed" in err and "PDSERVE_KV_SECRET" in err
    assert SECRET not in err
    help_text = _parser().format_help()
    assert "--kv-secret-file" in help_text and "$PDSERVE_KV_SECRET" in help_text


def test_worker_secret_from_file_env_or_nothing(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _secret_file(tmp_path / "kv")
    base = ["prefill", "--model", str(model_dir)]
    spec = worker_cli.spec_from_args(_parser().parse_args([*base, "--kv-secret-file", str(path)]))
    assert spec.secret == SECRET
    assert worker_cli.spec_from_args(_parser().parse_args(base)).secret == ""
    monkeypatch.setenv(SECRET_FILE_ENV, str(path))
    assert worker_cli.spec_from_args(_parser().parse_args(base)).secret == SECRET
    monkeypatch.delenv(SECRET_FILE_ENV)
    monkeypatch.setenv(SECRET_ENV, "from-the-environment-42")
    assert worker_cli.spec_from_args(_parser().parse_args(base)).secret == "from-the-environment-42"
    # The flag is explicit: it wins over the environment.
    spec = worker_cli.spec_from_args(_parser().parse_args([*base, "--kv-secret-file", str(path)]))
    assert spec.secret == SECRET


def test_worker_refuses_an_open_secret_file_in_one_line(model_dir: Path, tmp_path: Path) -> None:
    path = _secret_file(tmp_path / "kv", mode=0o644)
    args = _parser().parse_args(
        ["prefill", "--model", str(model_dir), "--kv-secret-file", str(path)]
    )
    with pytest.raises(CliError) as info:
        worker_cli.run(args)
    message = str(info.value)
    assert message.startswith("--kv-secret-file: permissions 0644") and "\n" not in message
    assert SECRET not in message


# -- topology ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["change-me", "changeme", "secret", "password", "example", "", "too-short", "PASSWORD"],
)
def test_topology_refuses_placeholder_and_short_secrets(value: str) -> None:
    with pytest.raises(TopologyError) as info:
        validate_topology({"kv_secret": value})
    message = str(info.value)
    assert message.startswith("topology: kv_secret: ") and "\n" not in message
    if value:
        assert repr(value) not in message


def test_topology_secret_sources(tmp_path: Path) -> None:
    assert Topology().configured_kv_secret(env={}) == ""
    assert validate_topology({"kv_secret": SECRET}).configured_kv_secret(env={}) == SECRET
    path = _secret_file(tmp_path / "kv")
    from_file = validate_topology({"kv_secret_file": str(path)})
    assert from_file.configured_kv_secret(env={SECRET_ENV: "ignored-env-secret"}) == SECRET
    # Not configured in the file: the environment.
    assert Topology().configured_kv_secret(env={SECRET_ENV: "environment-secret-1"}) == (
        "environment-secret-1"
    )
    path.chmod(0o644)
    with pytest.raises(TopologyError, match=r"^kv_secret_file: permissions 0644"):
        from_file.configured_kv_secret(env={})
    with pytest.raises(TopologyError, match="kv_secret/kv_secret_file: give one"):
        validate_topology({"kv_secret": SECRET, "kv_secret_file": str(path)})


def test_topology_never_shows_the_secret() -> None:
    topology = validate_topology({"kv_secret": SECRET})
    assert SECRET not in repr(topology) and SECRET not in str(topology)
    stripped = topology.without_secrets()
    assert "kv_secret" not in stripped and SECRET not in json.dumps(stripped)
    assert validate_topology(stripped) == validate_topology({})


@pytest.mark.parametrize(
    "path", sorted((DEPLOY / "topologies").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_topologies_carry_no_secret(path: Path) -> None:
    topology = load_topology(path)
    assert topology.kv_secret is None
    text = path.read_text()
    # No placeholder anywhere (an admin token copied from an example is as bad).
    assert "change-me" not in text and "\nkv_secret: " not in text


# -- pdserve up: generation, the controller, the instance actors ------------------------------


def test_up_generates_a_secret_per_cluster_in_a_0600_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_umask = os.umask(0)  # a careless umask must not make the file readable
    try:
        first = up_cli._ensure_kv_secret(Topology(), "", tmp_path / "state", up_cli._Progress())
    finally:
        os.umask(old_umask)
    path = tmp_path / "state" / cluster_state.KV_SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first and len(first) >= 40
    output = capsys.readouterr().out
    assert str(path) in output and first not in output
    second = up_cli._ensure_kv_secret(Topology(), "", tmp_path / "state", up_cli._Progress())
    assert second != first and path.read_text().strip() == second
    # A worker started by hand can join with the file.
    args = _parser().parse_args(
        ["prefill", "--model", str(tmp_path), "--kv-secret-file", str(path)]
    )
    assert worker_cli.kv_secret_from(args, env={}) == second
    # The cluster's state goes, and the secret with it.
    cluster_state.clear_state(tmp_path / "state")
    assert not path.exists()


def test_up_uses_a_configured_secret_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topology = validate_topology({"kv_secret": SECRET})
    got = up_cli._ensure_kv_secret(topology, SECRET, tmp_path, up_cli._Progress())
    assert got == SECRET and not (tmp_path / cluster_state.KV_SECRET_FILE).exists()
    output = capsys.readouterr().out
    assert "from kv_secret" in output and SECRET not in output


def test_controller_hands_the_secret_to_plans_not_to_its_topology(tmp_path: Path) -> None:
    controller = Controller(Topology().without_secrets(), str(tmp_path), SECRET)
    assert SECRET not in json.dumps(controller.topology())
    plan = controller._plan("prefill")
    assert plan.kv_secret == SECRET and SECRET not in repr(plan)
    spec = build_worker_spec(plan, "10.0.0.1", None)
    assert spec.secret == SECRET
    argv, env = build_command(spec)
    assert env[SECRET_ENV] == SECRET and not any(SECRET in arg for arg in argv)
    # A topology that carries its own secret (no `up` in between) still works, stripped.
    direct = Controller(validate_topology({"kv_secret": SECRET}).model_dump(), str(tmp_path))
    assert direct._plan("decode").kv_secret == SECRET
    assert "kv_secret" not in direct.topology()


def test_proxy_actor_gets_the_cluster_secret_through_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deploy.proxy_actor import ProxyHost

    monkeypatch.setenv(SECRET_FILE_ENV, "/stale")
    # ProxyHost sets the variable in this process: recorded here, so teardown removes it
    # again (a leaked secret would make a later `pdserve up` in this session use it).
    monkeypatch.setenv(SECRET_ENV, "replaced-by-the-proxy-host")
    ProxyHost(Topology().proxy.model_dump(mode="json"), SECRET)
    assert os.environ[SECRET_ENV] == SECRET and SECRET_FILE_ENV not in os.environ


def test_instance_plan_repr_hides_the_secret(tmp_path: Path) -> None:
    plan = InstancePlan(
        name="prefill-0", role="prefill", index=0, model="/m", host="0.0.0.0", api_port=1,
        kv_port=2, cpu_core=None, kv_cache_gib=1, accelerator="cpu", run_dir=str(tmp_path),
        engine_id="e", kv_secret=SECRET,
    )  # fmt: skip
    assert SECRET not in repr(plan)
