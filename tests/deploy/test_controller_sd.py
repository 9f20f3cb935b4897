"""The controller rewrites the Prometheus file-SD targets when its instance set changes."""

from __future__ import annotations

import json
from pathlib import Path

from deploy.controller import Controller, InstanceRecord
from deploy.instance_actor import InstancePlan
from deploy.topology import Topology


def _record(name: str, role: str, url: str, state: str = "running") -> InstanceRecord:
    plan = InstancePlan(
        name=name,
        role=role,
        index=0,
        model="/m",
        host="127.0.0.1",
        api_port=int(url.rsplit(":", 1)[1]),
        kv_port=None,
        cpu_core=None,
        kv_cache_gib=1,
        accelerator="cpu",
        run_dir="/tmp",
        engine_id=name,
    )
    return InstanceRecord(plan=plan, actor=None, group="g", state=state, ever_ready=True, url=url)


def test_file_sd_follows_ready_instances(tmp_path: Path) -> None:
    sd_path = tmp_path / "sd" / "pdserve.json"
    topology = Topology.model_validate({"prometheus": {"file_sd_path": str(sd_path)}})
    controller = Controller(topology.model_dump(mode="json"), str(tmp_path))
    controller._records["prefill-0"] = _record("prefill-0", "prefill", "http://127.0.0.1:8100")
    controller._records["decode-0"] = _record("decode-0", "decode", "http://127.0.0.1:8200")
    controller._records["prefill-1"] = _record(
        "prefill-1", "prefill", "http://127.0.0.1:8101", state="draining"
    )
    controller._write_file_sd()
    groups = {g["labels"]["pdserve_role"]: g["targets"] for g in json.loads(sd_path.read_text())}
    # A draining instance is no longer a scrape target of its pool.
    assert groups == {
        "proxy": ["127.0.0.1:8000"],
        "prefill": ["127.0.0.1:8100"],
        "decode": ["127.0.0.1:8200"],
    }
    del controller._records["decode-0"]
    controller._write_file_sd()
    groups = {g["labels"]["pdserve_role"]: g["targets"] for g in json.loads(sd_path.read_text())}
    assert "decode" not in groups and groups["prefill"] == ["127.0.0.1:8100"]
