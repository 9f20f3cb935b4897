"""Session fixtures shared by the whole suite: the tiny model and the real engines.

There is one set of real vLLM engines per session, shared by every slow test (tests/kv_transfer,
tests/integration, tests/observability): a prefill worker (KV producer, core 0), a decode
worker (KV consumer, core 1) and an aggregated worker without a connector (the token-identity
baseline, core 1), each with 1 GiB of KV cache and the settings in ``engine_support``.

Engines start lazily and at most once: nothing boots until the first test that needs an
engine sets up. At that moment every engine that any selected test needs is launched, side by
side, so the session pays for one engine start instead of three in a row; an engine no selected
test needs never starts. Engines are started through ``python -m deploy.worker_cli`` (the
``pdserve worker`` command); at teardown every command gets SIGTERM at once, and the session
fails if any process of a server's group is left.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_support import (
    ENGINE_BLOCK_SIZE,
    ENGINE_DTYPE,
    ENGINE_LEASE_S,
    KV_LOAD_FAILURE_POLICY,
    KV_SECRET,
    MODEL_NAME,
    PROCESS_GRACE_S,
    FreezableDecodes,
    PDDeployment,
    PDEngines,
    RunningServer,
    ServerLauncher,
    ServerStartError,
)

from deploy.tiny_model import make_tiny_model
from deploy.worker_launch import PortPicker, free_port

_ENGINE_TIMINGS = pytest.StashKey[dict[str, float]]()

# role -> (CPU core, the fixture whose use means a test needs that engine). Aggregated shares
# core 1 with decode: the equivalence tests query the baseline and the PD pair one after the
# other, never at once.
ENGINE_CORES: dict[str, int] = {
    "prefill": 0,
    "decode": 1,
    "aggregated": 1,
    "decode_queued": 1,
    "freezable_a": 1,
    "freezable_b": 1,
}
ENGINE_FIXTURES: dict[str, str] = {
    "prefill": "real_prefill",
    "decode": "real_decode",
    "aggregated": "real_aggregated",
    "decode_queued": "real_decode_queued",
    "freezable_a": "freezable_decodes",
    "freezable_b": "freezable_decodes",
}
# Decode engines a test may freeze after a chosen token and kill -9 (the migration tests):
# they load tests/integration/freeze_logits_processor.py and are relaunched after a kill.
# Both on core 1, never with the prefill: one of them serves while the other waits, and an
# engine sharing the prefill's core (both spinning in vLLM's shared-memory queues between
# steps) took minutes for a dozen tokens here.
FREEZABLE = ("freezable_a", "freezable_b")
_FREEZE_PROCESSOR = "freeze_logits_processor:FreezeAfterTokens"
# The worker role and extra flags of each engine. ``decode_queued`` runs one sequence at a time
# and fails requests whose KV load fails: it shows kv_load_failure_policy=fail on a live engine.
ENGINE_ROLES: dict[str, tuple[str, list[str]]] = {
    "prefill": ("prefill", []),
    "decode": ("decode", []),
    "aggregated": ("aggregated", []),
    "decode_queued": (
        "decode",
        ["--kv-load-failure-policy", "fail", "--vllm-args", "--max-num-seqs 1"],
    ),
    **{
        name: ("decode", ["--vllm-args", f"--logits-processors {_FREEZE_PROCESSOR}"])
        for name in FREEZABLE
    },
}


# Environment added to an engine's. ``decode_queued`` serves vLLM's development endpoints: its
# ``/pause?mode=keep`` lets a test hold requests in the scheduler's queue as long as it wants.
ENGINE_ENV: dict[str, dict[str, str]] = {"decode_queued": {"VLLM_SERVER_DEV_MODE": "1"}}
# Engines that publish their KV events (tests/integration/test_kv_events_real.py and
# test_cache_routing_real.py read them).
KV_EVENTS_ENGINES = frozenset({"prefill", "decode", "decode_queued"})


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ENGINE_TIMINGS] = {}
    # A SIGTERM to pytest (CI cancel) must still run fixture teardown, or engines would survive
    # in their own sessions.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    timings = terminalreporter.config.stash.get(_ENGINE_TIMINGS, {})
    if timings:
        terminalreporter.section("server start times")
        for name, seconds in timings.items():
            terminalreporter.write_line(f"{name}: ready {seconds:.1f} s after launch")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated tiny Llama model directory (made once per session)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def engine_block_size() -> int:
    return ENGINE_BLOCK_SIZE


@pytest.fixture(scope="session")
def server_launcher(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerLauncher]:
    launcher = ServerLauncher(
        tmp_path_factory.mktemp("server-logs"), request.config.stash[_ENGINE_TIMINGS]
    )
    try:
        yield launcher
    finally:
        problems = launcher.stop_all()
    if problems:
        pytest.fail("server shutdown: " + "; ".join(problems))


def _worker_argv(
    name: str,
    model: Path,
    port: int,
    kv_port: int | None,
    secret_file: Path,
    events_ports: tuple[int, int],
) -> list[str]:
    role, extra = ENGINE_ROLES[name]
    argv = [
        sys.executable, "-m", "deploy.worker_cli", role,
        "--model", str(model),
        "--port", str(port),
        "--cpu-core", str(ENGINE_CORES[name]),
        "--kv-cache-gib", "1",
        "--block-size", str(ENGINE_BLOCK_SIZE),
        "--dtype", ENGINE_DTYPE,
        "--served-model-name", MODEL_NAME,
        "--kv-secret-file", str(secret_file),
        "--lease-s", str(ENGINE_LEASE_S),
        "--kv-load-failure-policy", KV_LOAD_FAILURE_POLICY,
        "--stop-grace-s", str(PROCESS_GRACE_S),
        *extra,
    ]  # fmt: skip
    if name in KV_EVENTS_ENGINES:
        # Several engines of one role run side by side: the role's default ports would collide.
        argv += ["--kv-events-port", str(events_ports[0])]
        argv += ["--kv-events-replay-port", str(events_ports[1])]
    else:
        argv.append("--no-kv-events")  # fewer ports bound late, which another pick could take
    if kv_port is not None:
        argv += ["--kv-port", str(kv_port)]
    return argv


class EnginePool:
    """Launches the session's engines on first need, all needed ones together."""

    def __init__(self, launcher: ServerLauncher, model: Path, needed: frozenset[str]) -> None:
        self._launcher = launcher
        self._model = model
        self._needed = needed
        self._launched: dict[str, RunningServer] = {}
        self._relaunches = 0
        self._ports = PortPicker()

    def ready(self, role: str) -> RunningServer:
        """The ``role`` engine, launched (with its siblings) if need be, once it answers."""
        for name in sorted(self._needed | {role}):
            if name not in self._launched:
                self._launched[name] = self._launch(name)
        try:
            return self._launcher.wait_ready(self._launched[role])
        except ServerStartError as exc:
            pytest.fail(str(exc), pytrace=False)

    def relaunch(self, role: str) -> RunningServer:
        """Start ``role`` again on its port after a test killed it; return it once it answers."""
        killed = self._launched[role]
        self._launcher.forget_killed(killed)
        self._relaunches += 1
        self._launched[role] = self._launch(
            role, port=killed.port, name=f"{role}.{self._relaunches}"
        )
        try:
            return self._launcher.wait_ready(self._launched[role])
        except ServerStartError as exc:
            pytest.fail(str(exc), pytrace=False)

    @property
    def freeze_dir(self) -> Path:
        """Where the freezable engines read their plan and mark that they froze."""
        path = self._launcher.log_dir / "freeze"
        path.mkdir(exist_ok=True)
        return path

    def _launch(self, role: str, port: int | None = None, name: str | None = None) -> RunningServer:
        port = port or self._pick_port()
        kv_port = self._pick_port() if role == "prefill" else None
        events_ports = (self._pick_port(), self._pick_port())
        env = dict(ENGINE_ENV.get(role, {}))
        if role in FREEZABLE:
            tests_dir = Path(__file__).parent
            env["PYTHONPATH"] = os.pathsep.join(
                [str(tests_dir / "integration"), str(tests_dir.parent)]
            )
            env["PDSERVE_TEST_FREEZE_DIR"] = str(self.freeze_dir)
        return self._launcher.launch(
            name or role,
            _worker_argv(role, self._model, port, kv_port, self._secret_file(), events_ports),
            f"http://127.0.0.1:{port}",
            env=env,
            kv_port=kv_port,
            port=port,
            kv_events_ports=events_ports,
        )

    def _pick_port(self) -> int:
        """A port no engine of this session was given (see PortPicker)."""
        return self._ports.pick()

    def _secret_file(self) -> Path:
        """The engines' shared KV secret, in a 0600 file (never on a command line)."""
        path = self._launcher.log_dir / "kv_secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(KV_SECRET)
        return path


def _engines_needed(items: list[pytest.Item]) -> frozenset[str]:
    """The engines some selected test uses (directly or through another fixture)."""
    used: set[str] = set()
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        used |= {role for role, fixture in ENGINE_FIXTURES.items() if fixture in names}
    return frozenset(used)


@pytest.fixture(scope="session")
def engine_pool(
    request: pytest.FixtureRequest, server_launcher: ServerLauncher, tiny_model: Path
) -> EnginePool:
    return EnginePool(server_launcher, tiny_model, _engines_needed(request.session.items))


@pytest.fixture(scope="session")
def real_aggregated(engine_pool: EnginePool) -> RunningServer:
    """One plain vLLM server on the tiny model (no connector): the reference outputs."""
    return engine_pool.ready("aggregated")


@pytest.fixture(scope="session")
def real_prefill(engine_pool: EnginePool) -> RunningServer:
    """A prefill worker (KV producer) on core 0."""
    return engine_pool.ready("prefill")


@pytest.fixture(scope="session")
def real_decode(engine_pool: EnginePool) -> RunningServer:
    """A decode worker (KV consumer) on core 1."""
    return engine_pool.ready("decode")


@pytest.fixture(scope="session")
def real_decode_queued(engine_pool: EnginePool) -> RunningServer:
    """A decode worker that runs one sequence at a time and fails failed KV loads (core 1)."""
    return engine_pool.ready("decode_queued")


@pytest.fixture(scope="session")
def freezable_decodes(engine_pool: EnginePool) -> FreezableDecodes:
    """Two decode workers (cores 0 and 1) that a test may freeze after a request's k-th token
    and kill -9; ``relaunch`` brings one back on its port."""
    servers = {name: engine_pool.ready(name) for name in FREEZABLE}
    return FreezableDecodes(servers, engine_pool.freeze_dir, engine_pool.relaunch)


@pytest.fixture(scope="session")
def real_engines(
    real_prefill: RunningServer, real_decode: RunningServer, real_aggregated: RunningServer
) -> PDEngines:
    """The three engines, for tests that drive the KV handoff directly (no proxy)."""
    return PDEngines(prefill=real_prefill, decode=real_decode, aggregated=real_aggregated)


def _pdserve_command() -> list[str]:
    """The installed ``pdserve`` script of this interpreter's environment."""
    script = Path(sys.executable).parent / "pdserve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deploy.cli"]


@pytest.fixture(scope="session")
def real_proxy(
    server_launcher: ServerLauncher, real_prefill: RunningServer, real_decode: RunningServer
) -> RunningServer:
    """``pdserve proxy`` in front of ``real_prefill`` and ``real_decode`` (1P1D)."""
    port, admin_port = free_port(), free_port()
    argv = [
        *_pdserve_command(), "proxy",
        "--prefill", real_prefill.url,
        "--decode", real_decode.url,
        "--port", str(port),
        "--admin-port", str(admin_port),
    ]  # fmt: skip
    proxy = server_launcher.launch(
        "proxy", argv, f"http://127.0.0.1:{port}", prefill=real_prefill, decode=real_decode
    )
    try:
        return server_launcher.wait_ready(proxy, probe="/health")
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def real_pd(tiny_model: Path, real_engines: PDEngines, real_proxy: RunningServer) -> PDDeployment:
    """All three engines (booted side by side) and the proxy."""
    return PDDeployment(
        proxy=real_proxy,
        prefill=real_engines.prefill,
        decode=real_engines.decode,
        aggregated=real_engines.aggregated,
        model_dir=tiny_model,
        block_size=ENGINE_BLOCK_SIZE,
    )


@pytest.fixture(autouse=True)
def _no_secret_leaks_into_the_session() -> Iterator[None]:
    """A test that leaves a KV secret in this process's environment would change what every
    later `pdserve up`, worker and proxy started from here does: fail that test instead."""
    before = {name: os.environ.get(name) for name in _SECRET_VARIABLES}
    yield
    after = {name: os.environ.get(name) for name in _SECRET_VARIABLES}
    assert after == before, "the test left KV/admin secrets in os.environ (use monkeypatch)"


_SECRET_VARIABLES = (
    "PDSERVE_KV_SECRET",
    "PDSERVE_KV_SECRET_FILE",
    "PDSERVE_ADMIN_TOKEN",
    "PDSERVE_ADMIN_TOKEN_FILE",
)
