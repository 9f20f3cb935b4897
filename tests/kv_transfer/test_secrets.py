"""Where the connector finds its secret, and what the block server does before a peer has
proved it: no secret on a reachable address, no big frames before the handshake."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
import torch
from kv_helpers import (
    SECRET,
    blocks_equal,
    fingerprint_for,
    running_server,
    vllm_like_cpu_cache,
    wait_until,
)

from kv_transfer import wire
from kv_transfer.block_server import (
    BlockServer,
    InsecureServerError,
    ServerSettings,
    is_loopback,
)
from kv_transfer.config import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    SecretError,
    TransferSettings,
    check_secret,
    read_secret,
    read_secret_file,
    weak_secret_reason,
)
from kv_transfer.device import KVCacheAccess
from kv_transfer.leases import LeaseTable

GOOD = "Zx81-kv-secret-for-tests"


def _secret_file(tmp_path: Path, content: str, mode: int = 0o600, name: str = "kv") -> Path:
    path = tmp_path / name
    path.write_text(content)
    path.chmod(mode)
    return path


# -- reading the secret ----------------------------------------------------------------------


def test_connector_reads_the_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = TransferSettings.from_extra_config({"port": 15100}, env={SECRET_ENV: GOOD})
    assert settings.secret == GOOD.encode()
    # The real process environment is the default (vLLM's engine processes inherit it).
    monkeypatch.setenv(SECRET_ENV, GOOD)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)
    assert TransferSettings.from_extra_config({}).secret == GOOD.encode()


def test_connector_reads_the_secret_from_a_file(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, GOOD + "\n")  # `echo ... > file` leaves a newline
    settings = TransferSettings.from_extra_config({}, env={SECRET_FILE_ENV: str(path)})
    assert settings.secret == GOOD.encode()
    # ... or from a file named in the extra config (vLLM configured by hand).
    other = _secret_file(tmp_path, "another-secret-of-20c", name="other")
    from_extra = TransferSettings.from_extra_config(
        {"secret_file": str(other)}, env={SECRET_FILE_ENV: str(path)}
    )
    assert from_extra.secret == b"another-secret-of-20c"


def test_no_secret_anywhere_is_empty() -> None:
    assert TransferSettings.from_extra_config({}, env={}).secret == b""
    # Empty values count as unset (what worker_launch sets for the variable it does not use).
    assert read_secret(env={SECRET_ENV: "", SECRET_FILE_ENV: ""}) == ""


def test_extra_config_secret_still_works_and_wins_over_the_environment() -> None:
    settings = TransferSettings.from_extra_config(
        {"secret": "extra-config-secret-1"}, env={SECRET_ENV: GOOD}
    )
    assert settings.secret == b"extra-config-secret-1"


def test_secret_file_open_to_others_is_refused_like_ssh_does(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, GOOD, mode=0o644)
    with pytest.raises(SecretError) as info:
        TransferSettings.from_extra_config({}, env={SECRET_FILE_ENV: str(path)})
    message = str(info.value)
    assert "$PDSERVE_KV_SECRET_FILE" in message and "0644" in message
    assert f"chmod 600 {path}" in message and GOOD not in message
    for mode in (0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(SecretError, match="too open"):
            read_secret_file(path)
    path.chmod(0o400)
    assert read_secret_file(path) == GOOD


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "is empty"), ("\n", "is empty"), ("x" * 5000, "larger than")],
    ids=["empty", "newline-only", "huge"],
)
def test_unusable_secret_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(SecretError, match=message):
        read_secret_file(_secret_file(tmp_path, content))


def test_missing_secret_file_names_its_source(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=r"kv_connector_extra_config\.secret_file: cannot read"):
        TransferSettings.from_extra_config({"secret_file": str(tmp_path / "nope")}, env={})
    with pytest.raises(SecretError, match="not a regular file"):
        read_secret_file(tmp_path)


def test_both_forms_at_one_level_are_refused(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, GOOD)
    with pytest.raises(SecretError, match=r"\$PDSERVE_KV_SECRET, \$PDSERVE_KV_SECRET_FILE"):
        read_secret(env={SECRET_ENV: GOOD, SECRET_FILE_ENV: str(path)})
    with pytest.raises(SecretError, match="secret, secret_file: give one"):
        read_secret(GOOD, path, env={})


@pytest.mark.parametrize(
    "weak",
    ["change-me", "CHANGEME", "change_me", "secret", "password", "example", "short-secret",
     "please-change-me-in-production", "xxxxxxxxxxxxxxxxxxxx", "replace-me-with-a-real-one"],
)  # fmt: skip
def test_placeholders_and_short_secrets_are_refused(weak: str) -> None:
    assert weak_secret_reason(weak) is not None
    with pytest.raises(SecretError) as info:
        TransferSettings.from_extra_config({}, env={SECRET_ENV: weak})
    assert "$PDSERVE_KV_SECRET" in str(info.value)
    assert repr(weak) not in str(info.value)  # never echoed
    if len(weak) > len("password"):  # not a word the message itself uses
        assert weak not in str(info.value)
    assert read_secret(weak, env={}, check=False) == weak


def test_random_secrets_pass() -> None:
    import secrets

    for _ in range(50):
        token = secrets.token_urlsafe(32)
        assert check_secret(token, "x") == token
    assert weak_secret_reason("pdserve-test-secret") is None


def test_the_config_module_stays_light() -> None:
    """The proxy imports read_secret: kv_transfer.config must not pull in vLLM or torch."""
    import subprocess
    import sys

    code = (
        "import sys, kv_transfer.config\n"
        "heavy = [m for m in ('vllm', 'torch', 'msgpack') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the block server before authentication -------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False),
     ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _server(host: str, secret: bytes) -> BlockServer:
    src = vllm_like_cpu_cache(num_layers=1, num_blocks=4)
    return BlockServer(
        ServerSettings(host=host, port=0, secret=secret),
        fingerprint_for(src),
        KVCacheAccess(src),
        LeaseTable(),
    )


def test_server_on_a_reachable_address_refuses_to_start_without_a_secret() -> None:
    server = _server("0.0.0.0", b"")
    with pytest.raises(InsecureServerError, match=r"refusing to listen on '0\.0\.0\.0'"):
        server.start()
    assert server._listener is None  # nothing was bound
    # With a secret it listens; on loopback it may run without one (a warning elsewhere).
    for host, secret in (("0.0.0.0", SECRET), ("127.0.0.1", b"")):
        server = _server(host, secret)
        server.start()
        try:
            assert server.port > 0
        finally:
            server.stop()


def test_oversized_hello_is_refused_unread_while_a_pull_completes() -> None:
    src = vllm_like_cpu_cache(seed=3)
    dst = vllm_like_cpu_cache(fill="zeros")
    # running_server gives the handshake 2 s: a server that waited for the announced body
    # would hold the connection that long.
    with running_server(src) as ends, socket.create_connection(ends.address, timeout=5) as sock:
        assert wire.recv_frame(sock)["op"] == "challenge"
        started = time.monotonic()
        sock.sendall(struct.pack(">I", 16 * 1024 * 1024))  # only the length, no body
        sock.settimeout(1.5)
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
        assert closed, "the server kept the connection open"
        assert time.monotonic() - started < 1.0
        # Another connection, authenticated, is served as usual.
        ends.leases.add("req-x", [1, 2, 3], time.time() + 60)
        client = ends.client()
        client.pull(ends.address, "req-x", [1, 2, 3], KVCacheAccess(dst), [5, 6, 7])
        client.close()
        assert wait_until(lambda: len(ends.transfers) == 1, 5)
    assert blocks_equal(src, [1, 2, 3], dst, [5, 6, 7])
    assert torch.count_nonzero(dst[0][0].view(torch.uint8)) == 0


def test_hello_within_the_cap_still_authenticates() -> None:
    """A real hello (nonce, MAC, a fingerprint with a long model name) fits the cap."""
    src = vllm_like_cpu_cache()
    long_name = "/models/" + "m" * 1000
    with running_server(src) as ends:
        fingerprint = fingerprint_for(src, model=long_name)
        hello = {
            "op": "hello",
            "v": wire.PROTOCOL_VERSION,
            "nonce": wire.new_nonce(),
            "mac": b"\0" * 32,
            "fingerprint": fingerprint.to_wire(),
        }
        assert len(wire.encode_frame(hello)) < wire.MAX_HANDSHAKE_FRAME_BYTES
        client = ends.client()
        ends.leases.add("req-y", [0], time.time() + 60)
        dst = KVCacheAccess(vllm_like_cpu_cache(fill="zeros"))
        assert client.pull(ends.address, "req-y", [0], dst, [0]) > 0
        client.close()
