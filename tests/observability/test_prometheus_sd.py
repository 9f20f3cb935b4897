from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from deploy.prometheus_sd import file_sd_groups, write_file_sd


def test_writes_one_group_per_job_with_role_labels(tmp_path: Path) -> None:
    path = tmp_path / "sd" / "pdserve.json"
    write_file_sd(
        {
            "pdserve-prefill": ["10.0.0.2:8101", "10.0.0.1:8100", "10.0.0.1:8100"],
            "pdserve-decode": ["http://10.0.0.3:8200/"],
            "pdserve-proxy": ["10.0.0.9:8000"],
        },
        path,
    )
    assert json.loads(path.read_text()) == [
        {
            "targets": ["10.0.0.3:8200"],
            "labels": {"job": "pdserve-decode", "pdserve_role": "decode"},
        },
        {
            "targets": ["10.0.0.1:8100", "10.0.0.2:8101"],
            "labels": {"job": "pdserve-prefill", "pdserve_role": "prefill"},
        },
        {"targets": ["10.0.0.9:8000"], "labels": {"job": "pdserve-proxy", "pdserve_role": "proxy"}},
    ]
    # Prometheus often runs as its own user.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_bare_roles_and_https_and_ipv6() -> None:
    groups = file_sd_groups(
        {"prefill": ["https://p0.example:8443", "[::1]:8100"], "decode": [], "proxy": ()}
    )
    assert groups == [
        {
            "targets": ["[::1]:8100"],
            "labels": {"job": "pdserve-prefill", "pdserve_role": "prefill"},
        },
        {
            "targets": ["p0.example:8443"],
            "labels": {"job": "pdserve-prefill", "pdserve_role": "prefill", "__scheme__": "https"},
        },
    ]


def test_empty_mapping_writes_an_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    write_file_sd({}, path)
    assert json.loads(path.read_text()) == []


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ({"router": ["h:1"]}, "unknown scrape job 'router'"),
        ({"prefill": ["h"]}, "must be host:port"),
        ({"prefill": ["h:99999"]}, "invalid port"),
        ({"prefill": ["http://h:8100/v1"]}, "has a path"),
        ({"prefill": ["grpc://h:8100"]}, "not http(s)"),
        ({"prefill": ["h:1"], "pdserve-prefill": ["h:2"]}, "given twice"),
    ],
)
def test_bad_targets_raise_and_leave_the_file_alone(
    tmp_path: Path, targets: dict[str, list[str]], message: str
) -> None:
    path = tmp_path / "t.json"
    write_file_sd({"decode": ["d:8200"]}, path)
    before = path.read_text()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_file_sd(targets, path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["t.json"]


def test_a_string_instead_of_a_list_is_refused() -> None:
    with pytest.raises(TypeError, match="not a str"):
        file_sd_groups({"prefill": "h:8100"})


def test_replace_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    write_file_sd({"prefill": ["a:1"]}, path)
    inode = path.stat().st_ino
    write_file_sd({"prefill": ["a:1", "b:2"]}, path)
    # A new file renamed over the old one: a reader holding the old file sees it whole.
    assert path.stat().st_ino != inode
    assert json.loads(path.read_text())[0]["targets"] == ["a:1", "b:2"]
    assert os.listdir(tmp_path) == ["t.json"]
