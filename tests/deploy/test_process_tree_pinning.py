"""CPU workers started by `pdserve up` and `pdserve worker` are confined to their cores whole.

The slow check on real engines is in test_ray_cluster.py
(test_every_process_of_a_worker_stays_on_its_core); these follow the setting from the topology
and the command line to the spec that ``start_worker`` pins (test_worker_launch.py checks that
a pinned spec's processes run on its core).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from deploy import worker_cli, worker_launch
from deploy.controller import Controller
from deploy.instance_actor import build_worker_spec
from deploy.topology import validate_topology


def _controller(tmp_path: Path, resources: dict[str, object]) -> Controller:
    topology = validate_topology(
        {
            "kv_secret": "a-test-secret-of-enough-length",
            "prefill": {"port": 8100, "kv_port": 15100, "resources": resources},
        }
    )
    return Controller(topology.model_dump(mode="json"), str(tmp_path))


def test_up_pins_the_whole_tree_to_the_assigned_core_by_default(tmp_path: Path) -> None:
    plan = _controller(tmp_path, {"cpu_cores": [1]})._plan("prefill")
    spec = build_worker_spec(plan, "127.0.0.1", None)
    assert spec.pin_process_tree and spec.cpu_core == 1
    assert worker_launch._pinned_cores(spec) == {1}


def test_up_leaves_the_tree_free_when_the_topology_says_so(tmp_path: Path) -> None:
    plan = _controller(tmp_path, {"cpu_cores": [1], "pin_process_tree": False})._plan("prefill")
    spec = build_worker_spec(plan, "127.0.0.1", None)
    assert not spec.pin_process_tree and worker_launch._pinned_cores(spec) is None


def test_an_engine_put_on_a_core_already_in_use_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    controller = _controller(tmp_path, {"cpu_cores": [0]})
    with caplog.at_level(logging.WARNING, logger="deploy.controller"):
        controller._plan("prefill")
        assert not caplog.records
        controller._plan("prefill")  # the same core again (a scale-up with one core listed)
    [record] = caplog.records
    assert "shares CPU core 0 with 1 other engine" in record.getMessage()


def _worker_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("flag", "pinned"), [((), True), (("--no-pin-process-tree",), False)])
def test_worker_command_pins_unless_told_not_to(
    tmp_path: Path, flag: tuple[str, ...], pinned: bool
) -> None:
    args = _worker_args("aggregated", "--model", str(tmp_path), "--cpu-core", "0", *flag)
    spec = worker_cli.spec_from_args(args)
    assert spec.pin_process_tree is pinned
    assert worker_launch._pinned_cores(spec) == ({0} if pinned else None)
