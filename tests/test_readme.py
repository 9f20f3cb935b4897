"""The README is the newcomer's manual: keep its config reference and commands true."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from deploy.cli import SUBCOMMANDS
from deploy.topology import Topology

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    fields: set[str] = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields |= _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            fields.add(prefix + name)
    return fields


def _yaml_keys(node: object, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            keys.add(prefix + key)
            keys |= _yaml_keys(value, f"{prefix}{key}.")
    return keys


def _config_reference() -> dict[str, object]:
    section = README.split("## Configuration", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "the Configuration section has no yaml block"
    document = yaml.safe_load(block.group(1))
    assert isinstance(document, dict)
    return document


def test_config_reference_lists_every_topology_field() -> None:
    documented = _yaml_keys(_config_reference())
    # The decode pool takes the same keys as the prefill pool; the README says so once.
    expected = {
        field
        for field in _leaf_fields(Topology)
        if not field.startswith("decode.") or field in {"decode.replicas", "decode.port"}
    }
    missing = expected - documented
    assert not missing, f"README config reference lacks {sorted(missing)}"
    unknown = {
        key for key in documented if not any(f == key or f.startswith(key + ".") for f in expected)
    }
    assert not unknown, f"README config reference documents unknown keys {sorted(unknown)}"


def test_config_reference_is_a_valid_topology() -> None:
    Topology.model_validate(_config_reference())


def test_readme_commands_exist() -> None:
    for command in re.findall(r"`pdserve ([a-z-]+)", README):
        assert command in SUBCOMMANDS, f"README mentions `pdserve {command}`, which does not exist"
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash tests/run.sh" in README and "bash tests/run.sh" in ci
    assert "bash deploy/install.sh && .venv/bin/pdserve up" in README
