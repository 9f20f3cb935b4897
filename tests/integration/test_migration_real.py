"""kill -9 of the serving decode engine mid-stream: the client's stream continues on the other
decode engine, token-identical to an aggregated engine's uninterrupted answer (issue 11).

Real engines: the session's prefill worker, two freezable decode workers behind a proxy of
this module, and the session's aggregated engine as the reference. Each case freezes the
decode that serves the request right after its k-th token (k = 1, the middle, one before the
last; see freeze_logits_processor.py), so the client has exactly k tokens when the test
sends SIGKILL to the engine's whole process group. Nothing depends on timing: the engine
cannot produce token k + 1, and the test waits for token k before it kills.

The killed engine is started again on its port before the next case (the proxy re-admits it
through its health checks), so every case has a second decode to continue on.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine_support import FreezableDecodes, RunningServer, ServerLauncher, ServerStartError
from pd_support import load_tokenizer, prompt_with_tokens
from prometheus_client.parser import text_string_to_metric_families

from deploy.worker_launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_TOKENS = 12
PROMPT_TOKENS = 70  # three KV blocks of 32: the decode pulls two full ones
READMIT_TIMEOUT_S = 60.0
READ_TIMEOUT_S = 300.0  # far above a token's time on a busy machine: silence this long is a hang


@dataclass
class Stream:
    """What a client saw of one streamed answer."""

    events: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        if not line.startswith("data: "):
            return
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            self.done += 1
            return
        event = json.loads(payload)
        if "error" in event:
            self.errors.append(payload)
        else:
            self.events.append(event)

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.events for c in e["choices"] for t in c.get("token_ids") or []]

    @property
    def text(self) -> str:
        parts = []
        for event in self.events:
            for choice in event["choices"]:
                delta = choice.get("delta")
                parts.append((delta.get("content") or "") if delta is not None else choice["text"])
        return "".join(parts)

    @property
    def prompt_token_ids(self) -> list[int]:
        for event in self.events:
            ids = event.get("prompt_token_ids")
            if ids is None:
                ids = next((c.get("prompt_token_ids") for c in event["choices"]), None)
            if ids:
                return list(ids)
        raise AssertionError("no chunk carried the prompt's token ids")

    @property
    def finish_reason(self) -> str | None:
        reasons = [c.get("finish_reason") for e in self.events for c in e["choices"]]
        return next((r for r in reversed(reasons) if r), None)

    @property
    def usage(self) -> dict[str, Any]:
        usages = [e["usage"] for e in self.events if e.get("usage")]
        assert len(usages) == 1, f"expected one usage chunk, got {usages}"
        return dict(usages[0])


def stream_request(base_url: str, path: str, body: dict[str, Any], stream: Stream) -> Iterator[str]:
    """POST ``body``; yield every line read, once ``stream`` has taken it in."""
    with (
        httpx.Client(timeout=httpx.Timeout(READ_TIMEOUT_S)) as http,
        http.stream("POST", base_url + path, json=body) as response,
    ):
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            stream.add(line)
            yield line


def run_to_end(base_url: str, path: str, body: dict[str, Any]) -> Stream:
    stream = Stream()
    for _line in stream_request(base_url, path, body, stream):
        pass
    return stream


def labelled(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@dataclass
class MigrationSetup:
    proxy: RunningServer
    admin_url: str
    decodes: FreezableDecodes
    killed: list[str] = field(default_factory=list)

    def migrations(self, outcome: str) -> float:
        text = self.proxy.metrics_text()
        return labelled(text, "pdserve_migrations_total", stage="mid_stream", outcome=outcome)

    def revive(self) -> None:
        """Start the engines earlier cases killed, and wait until the proxy routes to them."""
        while self.killed:
            self.decodes.relaunch(self.killed.pop())
        wanted = {s.url for s in self.decodes.servers.values()}
        deadline = time.monotonic() + READMIT_TIMEOUT_S
        while time.monotonic() < deadline:
            listing = httpx.get(self.admin_url + "/admin/instances", timeout=60.0).json()
            healthy = {i["url"] for i in listing["instances"] if i["healthy"]}
            if wanted <= healthy:
                return
            time.sleep(0.2)
        raise AssertionError(f"the proxy did not re-admit {wanted} within {READMIT_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def migration(
    server_launcher: ServerLauncher,
    real_prefill: RunningServer,
    freezable_decodes: FreezableDecodes,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MigrationSetup]:
    config = tmp_path_factory.mktemp("migration-proxy") / "proxy.yaml"
    # Quick re-admission of a relaunched engine; ejection does not matter here: the broken
    # stream itself moves the request, never back to the instance that just failed.
    secret_file = server_launcher.log_dir / "kv_secret"  # the engines' (tests/conftest.py)
    config.write_text(
        f"kv_secret_file: {secret_file}\nhealth:\n  interval_s: 0.25\n  successes_to_readmit: 1\n"
    )
    port, admin_port = free_port(), free_port()
    argv = [
        *_pdserve(), "proxy", "--config", str(config),
        "--prefill", real_prefill.url,
        "--decode", *(s.url for s in freezable_decodes.servers.values()),
        "--port", str(port), "--admin-port", str(admin_port),
    ]  # fmt: skip
    proxy = server_launcher.launch("migration-proxy", argv, f"http://127.0.0.1:{port}")
    try:
        server_launcher.wait_ready(proxy, probe="/health")
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    setup = MigrationSetup(proxy, f"http://127.0.0.1:{admin_port}", freezable_decodes)
    yield setup
    # An engine the last case killed is not started again: only its record goes.
    for name in setup.killed:
        server_launcher.forget_killed(freezable_decodes.servers[name])


def _pdserve() -> list[str]:
    import sys

    script = Path(sys.executable).parent / "pdserve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deploy.cli"]


@pytest.fixture(scope="module")
def prompts(tiny_model: Path) -> dict[str, str]:
    tokenizer = load_tokenizer(tiny_model)
    return {
        "completions": prompt_with_tokens(tokenizer, PROMPT_TOKENS, seed=1101),
        "chat": prompt_with_tokens(tokenizer, PROMPT_TOKENS, seed=1102),
    }


def _body(kind: str, prompt: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if kind == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


def _break_after(where: str, length: int) -> int:
    return {"first": 1, "middle": length // 2, "last": length - 1}[where]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_kill_of_the_serving_decode_continues_the_stream_token_identically(
    migration: MigrationSetup,
    real_aggregated: RunningServer,
    prompts: dict[str, str],
    kind: str,
    where: str,
) -> None:
    path, body = _body(kind, prompts[kind])
    reference = run_to_end(real_aggregated.url, path, body)
    length = len(reference.token_ids)
    assert length >= 3, f"the reference answer is too short to break: {reference.token_ids}"
    k = _break_after(where, length)

    migration.revive()
    migrated_before = migration.migrations("succeeded")
    migration.decodes.plan(reference.prompt_token_ids, k)
    killed_with: list[int] = []
    stream = Stream()
    try:
        for _line in stream_request(migration.proxy.url, path, body, stream):
            if not killed_with and len(stream.token_ids) >= k:
                # The serving engine is frozen before token k + 1: it cannot send more.
                name, group = migration.decodes.frozen()
                os.killpg(group, signal.SIGKILL)
                migration.killed.append(name)
                killed_with = list(stream.token_ids)
    except httpx.ReadTimeout:
        markers = sorted(p.name for p in migration.decodes.freeze_dir.glob("frozen-*"))
        pytest.fail(
            f"no byte for {READ_TIMEOUT_S:.0f} s; the client had {stream.token_ids} (k={k}, "
            f"killed: {bool(killed_with)}, freeze markers: {markers})\n"
            f"{migration.proxy.log_tail()}"
        )
    assert len(killed_with) == k, f"the client had {killed_with} when the engine was killed"

    assert stream.errors == []
    assert stream.done == 1
    assert stream.token_ids == reference.token_ids
    assert stream.text == reference.text
    assert stream.finish_reason == reference.finish_reason
    assert stream.prompt_token_ids == reference.prompt_token_ids
    # Token counts are the answer's; the prefix-cache hit (prompt_tokens_details) is the
    # caches' state, which the kill and the continuation change.
    usage, reference_usage = stream.usage, reference.usage
    cached = (usage.pop("prompt_tokens_details", None) or {}).get("cached_tokens")
    reference_usage.pop("prompt_tokens_details", None)
    assert usage == reference_usage
    assert cached is None or 0 <= cached <= usage["prompt_tokens"]
    assert len({e["id"] for e in stream.events}) == 1, "the stream changed its id"
    assert migration.migrations("succeeded") == migrated_before + 1
