"""Host-local CPU core claims, so ``pdserve worker`` processes on one machine use disjoint cores.

vLLM's CPU backend binds its OpenMP threads to every core of a NUMA node unless
``VLLM_CPU_OMP_THREADS_BIND`` names cores; two unpinned engines on one host then fight over the
same cores (on 2 cores a tiny request takes 30 s instead of milliseconds). ``pdserve worker``
without ``--cpu-core`` therefore claims free cores here and pins its engine to them.

Mechanism: one lock file per core in a per-user directory (``$PDSERVE_CORE_CLAIMS_DIR``, else
``$XDG_RUNTIME_DIR/pdserve-cores``, else ``/tmp/pdserve-cores-<uid>``), locked with
``flock``. Chosen over pid files or a shared registry because the kernel drops a flock when the
last descriptor of the lock goes away: a worker that crashes or is SIGKILLed can never leak a
core, there is nothing stale to clean up, and two workers that start at the same moment cannot
both win one core (``LOCK_NB`` makes the loser move on to the next core). The descriptors are
also handed to the vLLM server (``pass_fds``), so an engine that outlives its ``pdserve worker``
keeps its cores claimed until it exits. Lock files are never deleted (deleting one that another
process is about to lock would let two processes lock different files for one core).

An automatic claim takes exclusive locks; cores named explicitly (``--cpu-core 1`` or an
inherited ``VLLM_CPU_OMP_THREADS_BIND``) take shared locks: explicit engines may share a core
on purpose, and automatic claims still steer clear of them. ``--cpu-core auto`` claims nothing.
Only workers that can see the same directory and ``/proc`` coordinate (one user, one container).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

CLAIMS_DIR_ENV = "PDSERVE_CORE_CLAIMS_DIR"
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
# VLLM_CPU_OMP_THREADS_BIND values that name no cores: vLLM picks (auto) or binds nothing.
UNPINNED_BIND_VALUES = frozenset({"auto", "nobind", ""})
# Command-line fragments of a running vLLM engine (the API server, `vllm serve`, the engine core
# process after it renames itself).
_ENGINE_MARKERS = ("vllm.entrypoints.openai.api_server", "VLLM::EngineCore")

ADVICE = "pass --cpu-core N (VLLM_CPU_OMP_THREADS_BIND) to give each engine its own cores"


def default_claims_dir() -> Path:
    """Where claims live: ``$PDSERVE_CORE_CLAIMS_DIR``, the user's runtime dir, or /tmp."""
    configured = os.environ.get(CLAIMS_DIR_ENV)
    if configured:
        return Path(configured)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "pdserve-cores"
    return Path(tempfile.gettempdir()) / f"pdserve-cores-{os.getuid()}"


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, e.g. under ``taskset``)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def default_cores_per_worker(available: int) -> int:
    """One core on small hosts (<= 4 cores), else half of them: room for a prefill+decode pair.

    Run more workers on a big host with ``--cpu-cores-per-worker`` or explicit ``--cpu-core``.
    """
    return 1 if available <= 4 else available // 2


def parse_core_list(value: str) -> list[int] | None:
    """The cores named by a ``VLLM_CPU_OMP_THREADS_BIND`` value (``0``, ``0-3,6``, ``0-1|2-3``).

    None for ``auto``/``nobind`` and for anything unparsable (vLLM reports those itself).
    """
    value = value.strip()
    if value in UNPINNED_BIND_VALUES:
        return None
    cores: list[int] = []
    try:
        for group in value.split("|"):
            for part in group.split(","):
                first, sep, last = part.strip().partition("-")
                low = int(first)
                high = int(last) if sep else low
                if low < 0 or high < low:
                    return None
                cores.extend(range(low, high + 1))
    except ValueError:
        return None
    return sorted(set(cores))


def format_core_groups(groups: Sequence[Sequence[int]]) -> str:
    """``[[0, 1, 2, 5], [6]]`` -> ``"0-2,5|6"``: one ``|``-separated list per vLLM rank."""
    return "|".join(_format_cores(group) for group in groups)


def _format_cores(cores: Sequence[int]) -> str:
    parts: list[str] = []
    ordered = sorted(cores)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            low, high = ordered[start], ordered[i - 1]
            parts.append(str(low) if low == high else f"{low}-{high}")
            start = i
    return ",".join(parts)


@dataclass
class CoreClaim:
    """Cores locked by this process; ``release`` (or process exit) frees them.

    ``fds`` are the lock descriptors: pass them to a child (``subprocess.Popen(pass_fds=...)``)
    and the claim lasts until both this process and the child have let go.
    """

    cores: tuple[int, ...]
    directory: Path
    exclusive: bool
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(self._fds)

    def release(self) -> None:
        """Close the lock descriptors (idempotent)."""
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> CoreClaim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _claims_dir(directory: Path) -> Path:
    """Create ``directory`` (mode 0700) and refuse one that is a symlink or someone else's."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{directory} is not a plain directory")
    if info.st_uid != os.getuid():
        raise OSError(f"{directory} belongs to another user")
    return directory


def _try_lock(directory: Path, core: int, operation: int) -> int | None:
    """A descriptor holding ``core``'s lock, or None if another process holds it."""
    path = directory / f"core-{core}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def claim_free_cores(
    count: int,
    *,
    directory: Path,
    candidates: Iterable[int] | None = None,
    groups: int = 1,
) -> CoreClaim:
    """Exclusively claim up to ``count`` unclaimed cores of ``candidates`` (lowest first).

    The number claimed is a multiple of ``groups`` (vLLM ranks each need their own list); it is
    0 when fewer than ``groups`` cores are free, so check ``claim.cores``. Raises OSError when
    the directory cannot be used.
    """
    if count < 1 or groups < 1:
        raise ValueError(f"count and groups must be >= 1, got {count} and {groups}")
    directory = _claims_dir(directory)
    pool = sorted(set(available_cores() if candidates is None else candidates))
    claim = CoreClaim(cores=(), directory=directory, exclusive=True)
    held: list[tuple[int, int]] = []
    try:
        for core in pool:
            if len(held) == count:
                break
            fd = _try_lock(directory, core, fcntl.LOCK_EX)
            if fd is not None:
                held.append((core, fd))
    except BaseException:
        for _, fd in held:
            os.close(fd)
        raise
    keep = len(held) - len(held) % groups
    for _, fd in held[keep:]:
        os.close(fd)
    claim.cores = tuple(core for core, _ in held[:keep])
    claim._fds = [fd for _, fd in held[:keep]]
    return claim


def claim_named_cores(cores: Iterable[int], *, directory: Path) -> CoreClaim:
    """Claim cores chosen by the user (shared: other explicit users of a core are fine).

    Best effort: a core that an automatic claim already holds is skipped (``claim.cores`` lists
    those actually claimed); the engine still gets the cores it was told to use.
    """
    directory = _claims_dir(directory)
    claim = CoreClaim(cores=(), directory=directory, exclusive=False)
    claimed: list[int] = []
    try:
        for core in sorted(set(cores)):
            fd = _try_lock(directory, core, fcntl.LOCK_SH)
            if fd is not None:
                claimed.append(core)
                claim._fds.append(fd)
    except BaseException:
        claim.release()
        raise
    claim.cores = tuple(claimed)
    return claim


def unpinned_vllm_engines(
    proc_root: Path = Path("/proc"), *, exclude: Iterable[int] = ()
) -> list[int]:
    """Pids of vLLM engines on this host whose environment pins no cores.

    Only processes whose environment is readable (this user's) are judged; others are skipped
    rather than guessed at.
    """
    skip = set(exclude) | {os.getpid()}
    found: list[int] = []
    try:
        entries = list(proc_root.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not _is_vllm_engine([arg.decode(errors="replace") for arg in argv]):
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        bind = next(
            (v.decode(errors="replace") for k, _, v in (e.partition(b"=") for e in environ)
             if k == BIND_ENV.encode()),
            "",
        )  # fmt: skip
        if parse_core_list(bind) is None:
            found.append(int(entry.name))
    return sorted(found)


def _is_vllm_engine(argv: list[str]) -> bool:
    joined = " ".join(argv)
    if any(marker in joined for marker in _ENGINE_MARKERS):
        return True
    # `vllm serve ...` (the console script, possibly run as `python .../vllm serve`)
    return any(
        Path(arg).name == "vllm" and argv[i + 1 : i + 2] == ["serve"]
        for i, arg in enumerate(argv[:2])
    )


@dataclass
class WorkerCores:
    """The outcome of :func:`acquire_worker_cores`.

    ``bind`` is the ``VLLM_CPU_OMP_THREADS_BIND`` the engine runs with (None: vLLM's own
    choice); ``picked`` says it was chosen here, so the caller must pass it on. ``claim`` holds
    the locks: hand ``claim.fds`` to the engine process and ``release()`` when it has exited.
    """

    bind: str | None
    picked: bool
    claim: CoreClaim | None = None
    warning: str | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.claim is None else self.claim.fds

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()


def acquire_worker_cores(
    requested: str | None,
    *,
    inherited: str | None = None,
    ranks: int = 1,
    cores_per_worker: int | None = None,
    directory: Path | None = None,
    candidates: Sequence[int] | None = None,
    proc_root: Path = Path("/proc"),
) -> WorkerCores:
    """Decide and claim the cores of one CPU worker; log the binding (INFO), or one WARNING.

    ``requested`` is ``--cpu-core`` (None when absent); ``inherited`` is
    ``VLLM_CPU_OMP_THREADS_BIND`` from the environment. An explicit value is kept and its cores
    claimed (shared); ``auto``/``nobind`` is kept as it is. With neither, ``cores_per_worker``
    free cores (default :func:`default_cores_per_worker`) are claimed, split over ``ranks``
    (tensor/pipeline-parallel ranks). When none are free, or a vLLM engine without pinned cores
    runs on the host, one warning names the flag to use and the worker starts anyway.
    """
    directory = default_claims_dir() if directory is None else directory
    explicit, source = (
        (requested, "--cpu-core") if requested is not None else (inherited, f"${BIND_ENV}")
    )
    if explicit is not None and explicit.strip():
        named = parse_core_list(explicit)
        claim = None
        if named is not None:
            try:
                claim = claim_named_cores(named, directory=directory)
            except OSError as exc:
                logger.debug("cannot record the claim of cores %s: %s", explicit, exc)
        logger.info("pdserve worker: %s=%s (from %s)", BIND_ENV, explicit, source)
        return WorkerCores(bind=explicit, picked=False, claim=claim)

    pool = available_cores() if candidates is None else sorted(set(candidates))
    per_worker = cores_per_worker or default_cores_per_worker(len(pool))
    per_rank = max(1, per_worker // ranks)
    problems: list[str] = []
    result = WorkerCores(bind=None, picked=False)
    try:
        claim = claim_free_cores(
            per_rank * ranks, directory=directory, candidates=pool, groups=ranks
        )
    except OSError as exc:
        problems.append(f"cannot claim cores in {directory} ({exc})")
    else:
        if claim.cores:
            size = len(claim.cores) // ranks
            groups = [claim.cores[i * size : (i + 1) * size] for i in range(ranks)]
            result = WorkerCores(bind=format_core_groups(groups), picked=True, claim=claim)
            logger.info(
                "pdserve worker: %s=%s (claimed in %s; cores here: %s)",
                BIND_ENV, result.bind, directory, _format_cores(pool),
            )  # fmt: skip
        else:
            problems.append(
                f"every core this worker may use ({_format_cores(pool)}) is claimed by other "
                "pdserve workers, so vLLM binds its threads itself"
            )
    others = unpinned_vllm_engines(proc_root)
    if others:
        listed = ", ".join(str(pid) for pid in others[:3]) + (", ..." if len(others) > 3 else "")
        problems.append(
            f"another vLLM engine (pid {listed}) is running on this host without pinned cores"
        )
    if problems:
        result.warning = f"pdserve worker: {'; '.join(problems)}; {ADVICE}"
        logger.warning("%s", result.warning)
    return result
