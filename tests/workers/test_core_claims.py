"""Core claims: ``pdserve worker`` processes on one host pick disjoint cores (no vLLM started).

Every test uses its own claims directory (``$PDSERVE_CORE_CLAIMS_DIR`` or ``directory=``) and,
where engines are looked for, a fake ``/proc``: nothing touches the real claims of this host.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import core_claims, worker_cli
from deploy.core_claims import (
    BIND_ENV,
    CLAIMS_DIR_ENV,
    acquire_worker_cores,
    available_cores,
    claim_free_cores,
    claim_named_cores,
    default_cores_per_worker,
    format_core_groups,
    parse_core_list,
    unpinned_vllm_engines,
)
from deploy.worker_launch import WorkerSpec, build_command, start_worker, stop_worker

REPO = Path(__file__).resolve().parents[2]
_HOLD_SCRIPT = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from deploy.core_claims import claim_free_cores\n"
    "claim = claim_free_cores(1, directory=Path(sys.argv[1]), candidates=[int(sys.argv[2])])\n"
    "print(claim.cores, flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def claims_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "claims"
    monkeypatch.setenv(CLAIMS_DIR_ENV, str(directory))
    monkeypatch.delenv(BIND_ENV, raising=False)
    return directory


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def _add_process(root: Path, pid: int, argv: list[str], env: dict[str, str]) -> None:
    entry = root / str(pid)
    entry.mkdir()
    (entry / "cmdline").write_bytes(b"\0".join(arg.encode() for arg in argv) + b"\0")
    (entry / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()))


def _held(directory: Path, core: int) -> bool:
    """Whether another claim holds ``core`` (probes with, then drops, an exclusive claim)."""
    with claim_free_cores(1, directory=directory, candidates=[core]) as probe:
        return probe.cores == ()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[WorkerSpec, tuple[int, ...]]]]:
    """Replace start_worker in ``pdserve worker`` by a process that exits at once; record calls."""
    calls: list[tuple[WorkerSpec, tuple[int, ...]]] = []

    def fake_start(
        spec: WorkerSpec,
        log_path: Path | None = None,
        *,
        validate: bool = True,
        pass_fds: tuple[int, ...] = (),
    ) -> subprocess.Popen[bytes]:
        calls.append((spec, tuple(pass_fds)))
        return subprocess.Popen([sys.executable, "-c", ""], pass_fds=pass_fds)

    monkeypatch.setattr(worker_cli, "start_worker", fake_start)
    monkeypatch.setattr(worker_cli, "validate_spec", lambda spec: None)
    # The real /proc may hold other people's engines; these tests are about claims.
    monkeypatch.setattr(core_claims, "unpinned_vllm_engines", lambda *a, **k: [])
    yield calls


def _run_worker(model_dir: Path, *flags: str) -> int:
    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    return worker_cli.run(parser.parse_args(["decode", "--model", str(model_dir), *flags]))


def test_two_claimers_get_disjoint_cores(tmp_path: Path) -> None:
    first = claim_free_cores(1, directory=tmp_path, candidates=[0, 1])
    second = claim_free_cores(1, directory=tmp_path, candidates=[0, 1])
    third = claim_free_cores(1, directory=tmp_path, candidates=[0, 1])
    assert (first.cores, second.cores, third.cores) == ((0,), (1,), ())
    first.release()
    first.release()  # idempotent
    with claim_free_cores(1, directory=tmp_path, candidates=[0, 1]) as again:
        assert again.cores == (0,)
    second.release()


def test_multi_core_claims_are_disjoint_and_whole_rank_groups(tmp_path: Path) -> None:
    with (
        claim_free_cores(2, directory=tmp_path, candidates=range(4)) as first,
        claim_free_cores(2, directory=tmp_path, candidates=range(4)) as second,
    ):
        assert (first.cores, second.cores) == ((0, 1), (2, 3))
    with claim_free_cores(1, directory=tmp_path, candidates=[0]) as taken:
        # Two ranks need two cores; the one that is free is not claimed half-way.
        with claim_free_cores(2, directory=tmp_path, candidates=[0, 1], groups=2) as claim:
            assert taken.cores == (0,) and claim.cores == () and not claim.fds
        assert not _held(tmp_path, 1)


def test_claim_held_by_a_process_dies_with_it(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SCRIPT, str(tmp_path), "5"], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"(5,)"
        assert _held(tmp_path, 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert not _held(tmp_path, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_claim_passed_to_the_engine_outlives_the_claimer(tmp_path: Path) -> None:
    """An engine that outlives a killed ``pdserve worker`` keeps its cores claimed."""
    claim = claim_free_cores(1, directory=tmp_path, candidates=[3])
    engine = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=claim.fds
    )
    try:
        claim.release()
        assert _held(tmp_path, 3)
        engine.kill()
        engine.wait(timeout=10)
        assert not _held(tmp_path, 3)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()


def test_start_worker_hands_the_claim_to_the_server(tmp_path: Path) -> None:
    stand_in = tmp_path / "python"  # plays the interpreter: ignores vLLM's argv, sleeps
    stand_in.write_text("#!/bin/sh\nexec sleep 60\n")
    stand_in.chmod(0o755)
    spec = WorkerSpec(role="aggregated", model=tmp_path, api_port=1, python=str(stand_in))
    claim = claim_free_cores(1, directory=tmp_path / "claims", candidates=[2])
    proc = start_worker(spec, validate=False, pass_fds=claim.fds)
    try:
        claim.release()
        assert _held(tmp_path / "claims", 2)
    finally:
        stop_worker(proc, grace_s=5)
    assert not _held(tmp_path / "claims", 2)


def test_explicit_cores_are_kept_and_avoided(tmp_path: Path, fake_proc: Path) -> None:
    acquire = functools.partial(
        acquire_worker_cores, directory=tmp_path, candidates=[0, 1], proc_root=fake_proc
    )
    explicit = acquire("1")
    shared = acquire("1")  # explicit users may share a core on purpose; both claims hold
    auto = acquire(None)
    try:
        assert (explicit.bind, explicit.picked) == ("1", False)
        assert explicit.claim is not None and explicit.claim.cores == (1,)
        assert shared.claim is not None and shared.claim.cores == (1,)
        assert (auto.bind, auto.picked) == ("0", True)
    finally:
        for cores in (explicit, shared, auto):
            cores.release()


def test_named_claims_share_and_skip_auto_claimed_cores(tmp_path: Path) -> None:
    with (
        claim_named_cores([2, 3], directory=tmp_path) as first,
        claim_named_cores([3], directory=tmp_path) as second,
        claim_free_cores(1, directory=tmp_path, candidates=[2, 3, 4]) as auto,
        claim_named_cores([4, 5], directory=tmp_path) as late,
    ):
        assert (first.cores, second.cores, auto.cores) == ((2, 3), (3,), (4,))
        assert late.cores == (5,)  # core 4 is auto-claimed; the engine still runs on it
        assert not first.exclusive and auto.exclusive


def test_auto_claims_nothing_and_never_warns(
    tmp_path: Path, fake_proc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with claim_free_cores(2, directory=tmp_path, candidates=[0, 1]):
        cores = acquire_worker_cores(
            "auto", directory=tmp_path, candidates=[0, 1], proc_root=fake_proc
        )
    assert (cores.bind, cores.picked, cores.claim, cores.warning) == ("auto", False, None, None)
    assert not _warnings(caplog)


def test_no_flag_claims_a_core_and_passes_it_to_vllm(
    claims_dir: Path,
    model_dir: Path,
    started: list[tuple[WorkerSpec, tuple[int, ...]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = available_cores()[0]
    with caplog.at_level(logging.INFO, logger="deploy.core_claims"):
        assert _run_worker(model_dir) == 0
    ((spec, fds),) = started
    assert spec.cpu_core == str(first) and fds
    _, env = build_command(spec)
    assert env[BIND_ENV] == str(first)
    infos = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and r.name == "deploy.core_claims"
    ]
    assert len(infos) == 1 and f"{BIND_ENV}={first}" in infos[0]
    assert not _warnings(caplog)
    assert not _held(claims_dir, first)  # released when the server exited


def test_all_cores_claimed_warns_once_and_starts(
    claims_dir: Path,
    model_dir: Path,
    started: list[tuple[WorkerSpec, tuple[int, ...]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    everything = available_cores()
    with claim_free_cores(len(everything), directory=claims_dir, candidates=everything):
        assert _run_worker(model_dir) == 0
    ((spec, fds),) = started
    assert spec.cpu_core is None and fds == ()
    assert BIND_ENV not in build_command(spec)[1]
    (warning,) = _warnings(caplog)
    assert "claimed by other pdserve workers" in warning and "--cpu-core N" in warning
    assert "\n" not in warning


def test_explicit_flag_wins_and_claims(
    claims_dir: Path,
    model_dir: Path,
    started: list[tuple[WorkerSpec, tuple[int, ...]]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = available_cores()[-1]
    fake = worker_cli.start_worker
    held_while_running: list[bool] = []

    def check_claimed(
        spec: WorkerSpec, log_path: Path | None = None, **kwargs: bool | tuple[int, ...]
    ) -> subprocess.Popen[bytes]:
        held_while_running.append(_held(claims_dir, core))  # auto claims avoid the core
        return fake(spec, log_path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_cli, "start_worker", check_claimed)
    assert _run_worker(model_dir, "--cpu-core", str(core)) == 0
    ((spec, fds),) = started
    assert spec.cpu_core == str(core) and len(fds) == 1 and held_while_running == [True]
    assert not _warnings(caplog)
    assert not _held(claims_dir, core)


def test_inherited_bind_is_explicit(claims_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BIND_ENV, "0")
    spec = WorkerSpec(role="decode", model=Path("/m"))
    kept, cores = worker_cli.acquire_cores(spec)
    assert cores is not None
    try:
        assert kept.cpu_core is None and cores.bind == "0" and not cores.picked
        assert cores.claim is not None and cores.claim.cores == (0,)
    finally:
        cores.release()
    gpu = WorkerSpec(role="decode", model=Path("/m"), device="cuda")
    assert worker_cli.acquire_cores(gpu) == (gpu, None)


def test_unpinned_engine_on_the_host_is_warned_about(
    tmp_path: Path, fake_proc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m"]
    _add_process(fake_proc, 4242, server, {"HOME": "/root"})
    _add_process(fake_proc, 4243, ["VLLM::EngineCore"], {BIND_ENV: "0"})
    _add_process(fake_proc, 4244, ["/usr/bin/vllm", "serve", "m"], {BIND_ENV: "auto"})
    _add_process(fake_proc, 4245, [sys.executable, "-m", "http.server"], {})
    assert unpinned_vllm_engines(fake_proc) == [4242, 4244]

    cores = acquire_worker_cores(None, directory=tmp_path, candidates=[0, 1], proc_root=fake_proc)
    try:
        assert cores.bind == "0"  # still claims its own core
        (warning,) = _warnings(caplog)
        assert "pid 4242, 4244" in warning and "--cpu-core N" in warning
    finally:
        cores.release()


def test_pinned_engines_are_not_warned_about(
    tmp_path: Path, fake_proc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _add_process(fake_proc, 7, ["VLLM::EngineCore"], {BIND_ENV: "1"})
    cores = acquire_worker_cores(None, directory=tmp_path, candidates=[0, 1], proc_root=fake_proc)
    cores.release()
    assert cores.bind == "0" and cores.warning is None
    assert not _warnings(caplog)


def test_unusable_claims_dir_warns_and_starts_unpinned(
    tmp_path: Path, fake_proc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    cores = acquire_worker_cores(None, directory=link, candidates=[0], proc_root=fake_proc)
    assert (cores.bind, cores.claim) == (None, None)
    (warning,) = _warnings(caplog)
    assert "cannot claim cores" in warning and "--cpu-core N" in warning


def test_ranks_get_one_core_list_each(tmp_path: Path, fake_proc: Path) -> None:
    assert worker_cli.local_ranks(("--tensor-parallel-size", "2", "-pp=2", "--seed", "1")) == 4
    assert worker_cli.local_ranks(("--seed", "1")) == 1
    cores = acquire_worker_cores(
        None, ranks=2, cores_per_worker=4, directory=tmp_path, candidates=range(4),
        proc_root=fake_proc,
    )  # fmt: skip
    try:
        assert cores.bind == "0-1|2-3"
    finally:
        cores.release()


def test_core_lists_and_defaults() -> None:
    assert parse_core_list("0-2,5|7") == [0, 1, 2, 5, 7]
    assert parse_core_list(" 3 ") == [3]
    for unpinned in ("auto", "nobind", "", "x", "3-1", "-1"):
        assert parse_core_list(unpinned) is None
    assert format_core_groups([[5, 0, 1, 2], [7]]) == "0-2,5|7"
    assert [default_cores_per_worker(n) for n in (1, 2, 4, 8, 64)] == [1, 1, 1, 4, 32]


def test_claimed_cores_exist_on_the_flag() -> None:
    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    args = parser.parse_args(["decode", "--model", "/m", "--cpu-cores-per-worker", "3"])
    assert args.cpu_cores_per_worker == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["decode", "--model", "/m", "--cpu-cores-per-worker", "0"])
