"""Session fixtures for the connector's slow tests: real prefill, decode and aggregated
vLLM engines, started once per session and killed at its end (see kv_engines.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_engines import PDEngines, start_pd_engines, stop_pd_engines


@pytest.fixture(scope="session")
def kv_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deploy.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("kv-tiny-model"))


@pytest.fixture(scope="session")
def pd_engines(kv_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDEngines]:
    engines = start_pd_engines(kv_model, tmp_path_factory.mktemp("kv-engine-logs"))
    try:
        yield engines
    finally:
        stop_pd_engines(engines)
