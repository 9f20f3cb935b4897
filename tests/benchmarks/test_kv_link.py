"""Tests of ``benchmarks.kv_link`` (``pdserve bench kv-link``).

Fast: the options, the row, table, JSON and figure shaping on fixed numbers, and the one-line
exit 2 where namespaces cannot be made. Slow (root: two network namespaces): a ``--quick`` run
end to end, and a Ctrl-C mid-run; both leave no namespace behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import kv_link
from benchmarks.cli import BENCHMARKS
from benchmarks.kv_transfer import MIB
from deploy.cli import CliError
from deploy.multinode import netns_lab

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    kv_link.add_arguments(parser)
    return parser.parse_args(list(argv))


def _run(size_mib: float, loopback_s: float, link_s: float, veth_rx: int) -> kv_link.SizeRun:
    nbytes = int(size_mib * MIB)
    return kv_link.SizeRun(
        size_mib=size_mib,
        nbytes=nbytes,
        blocks_per_layer=int(size_mib),
        seconds={"loopback": [loopback_s, 2 * loopback_s, loopback_s], "link": [link_s] * 3},
        verified={"loopback": True, "link": True},
        veth_rx_bytes=veth_rx,
        link_pulled_bytes=3 * nbytes,
    )


def _plan() -> kv_link.Plan:
    return kv_link.Plan(kv_link.GEOMETRY, (1.0, 4.0), 3, 4096 * 1024, "pdx", "10.203.0")


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


# -- fast -------------------------------------------------------------------------------------


def test_registered_and_import_stays_light() -> None:
    assert BENCHMARKS["kv-link"][0] == "benchmarks.kv_link"
    code = (
        "import sys, benchmarks.kv_link; "
        "heavy = [m for m in ('torch', 'vllm', 'matplotlib') if m in sys.modules]; "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_defaults_quick_and_overrides() -> None:
    assert kv_link.resolve(_args()) == ((1.0, 4.0, 16.0, 64.0), 7)
    assert kv_link.resolve(_args("--quick")) == ((1.0, 4.0), 3)
    assert kv_link.resolve(_args("--quick", "--repeat", "5", "--sizes-mib", "2")) == ((2.0,), 5)
    assert _args().output == Path("benchmarks/results/kv_link.json")
    assert _args().png == Path("benchmarks/figures/kv_link.png")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeat", "0"], "--repeat"),
        (["--sizes-mib", "1,x"], "--sizes-mib"),
        (["--sizes-mib", "0"], "positive"),
        (["--netns-prefix", "Bad-Name"], "--netns-prefix"),
        (["--netns-prefix", "a" * 13], "--netns-prefix"),
        (["--socket-buffer-kib", "-1"], "--socket-buffer-kib"),
    ],
)
def test_bad_options_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message):
        kv_link.resolve(_args(*argv))


def test_row_ratio_and_checks() -> None:
    row = kv_link.shape_row(_run(4, loopback_s=0.004, link_s=0.008, veth_rx=3 * 4 * MIB + 900))
    assert row.size_mib == 4.0 and row.nbytes == 4 * MIB
    assert row.loopback.gbps == round(4 * MIB / 0.004 / 1e9, 3)
    assert row.loopback.best_gbps == row.loopback.gbps  # median and fastest are both 4 ms
    assert row.link.gbps == round(4 * MIB / 0.008 / 1e9, 3)
    assert row.ratio == 0.5  # link / loopback
    assert row.veth_ok and row.verified
    short = kv_link.shape_row(_run(4, 0.004, 0.008, veth_rx=3 * 4 * MIB - 1))
    assert not short.veth_ok
    assert kv_link.checks([row]) == {"bytes_verified": True, "veth_carried_link_bytes": True}
    assert kv_link.checks([row, short])["veth_carried_link_bytes"] is False
    assert kv_link.checks([]) == {"bytes_verified": False, "veth_carried_link_bytes": False}


def test_report_and_table() -> None:
    rows = [
        kv_link.shape_row(_run(size, 0.001 * size, 0.002 * size, 4 * MIB * size)) for size in (1, 4)
    ]
    result = kv_link.report(rows, _plan(), {"veth_mtu": 1500, "lo_mtu": 65536})
    json.dumps(result)  # must serialise as it is
    assert set(result["modes"]) == {"loopback", "link"}
    assert result["checks"] == {"bytes_verified": True, "veth_carried_link_bytes": True}
    first = result["rows"][0]
    assert set(first["loopback"]) == {"gbps", "best_gbps", "ms", "verified", "seconds"}
    assert first["link"]["verified"] is True and first["veth_ok"] is True
    assert result["repeat"] == 3 and result["socket_buffer_kib"] == 4096
    table = kv_link.format_table(rows).splitlines()
    assert "loopback GB/s" in table[0] and "link GB/s" in table[0] and "veth rx MiB" in table[0]
    assert table[1].split()[0] == "1.0" and table[2].split()[0] == "4.0"
    assert table[2].split()[-1] == "yes"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [
        kv_link.shape_row(_run(size, 0.001 * size, 0.002 * size, 4 * MIB * size)) for size in (1, 4)
    ]
    png = tmp_path / "figures" / "kv_link.png"
    assert kv_link.plot(rows, png, {"veth_mtu": 1500, "lo_mtu": 65536})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_namespaces_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(netns_lab, "unsupported_reason", lambda: "no namespaces in this test")
    out = tmp_path / "out.json"
    assert kv_link.main(["--quick", "--output", str(out), "--png", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kv_link: cannot build the two-node lab: no namespaces in this test"
    assert not out.exists()


# -- slow: real namespaces --------------------------------------------------------------------


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh namespace prefix; whatever a failed test leaves under it is removed after."""
    reason = netns_lab.unsupported_reason()
    if reason is not None:
        pytest.skip(reason)
    name = f"kvl{uuid.uuid4().hex[:6]}"
    yield name
    lab = netns_lab.TwoNodeLab(name)
    for node in lab.nodes:
        lab.kill_all(node)
        subprocess.run(["ip", "netns", "delete", node.netns], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_end_to_end(tmp_path: Path, prefix: str) -> None:
    out, png = tmp_path / "kv_link.json", tmp_path / "kv_link.png"
    argv = [sys.executable, "-m", "deploy.cli", "bench", "kv-link", "--quick"]
    argv += ["--output", str(out), "--png", str(png), "--netns-prefix", prefix]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {f"{prefix}a", f"{prefix}b"}.isdisjoint(_namespaces())

    result = json.loads(out.read_text())
    assert result["lab"]["head"]["address"] == "10.203.0.1"
    assert result["lab"]["worker"]["netns"] == f"{prefix}b"
    assert result["checks"] == {"bytes_verified": True, "veth_carried_link_bytes": True}
    assert [row["size_mib"] for row in result["rows"]] == [1.0, 4.0]
    for row in result["rows"]:
        for mode in ("loopback", "link"):
            assert row[mode]["verified"] is True
            assert len(row[mode]["seconds"]) == 3 and row[mode]["gbps"] > 0
        assert row["link_pulled_bytes"] == 3 * row["nbytes"]
        assert row["veth_rx_bytes"] >= row["link_pulled_bytes"]
    assert png.stat().st_size > 0
    assert "link GB/s" in done.stdout


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_removes_the_namespaces(tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "kv_link.json"
    argv = [sys.executable, "-m", "benchmarks.kv_link", "--output", str(out)]
    argv += ["--png", str(tmp_path / "kv_link.png"), "--netns-prefix", prefix]
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # As in a terminal, even where the suite was started with SIGINT ignored.
        preexec_fn=_default_sigint,
    )
    try:
        # Interrupt once processes run in both namespaces: the measuring one in B, a block
        # server in A.
        lab = netns_lab.TwoNodeLab(prefix)
        deadline = time.monotonic() + 120
        while not lab.pids(lab.head):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no block server started in namespace A"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    assert {f"{prefix}a", f"{prefix}b"}.isdisjoint(_namespaces())
    assert not out.exists()
