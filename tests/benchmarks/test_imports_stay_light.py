"""`pdserve` imports every subcommand module to build its parser, and `pdserve bench NAME`
imports its benchmark before parsing: none of them may pull in the heavy libraries they use
only once running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE_LIBS = ("vllm", "torch", "transformers")


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("benchmarks.pd_vs_aggregated", ENGINE_LIBS),
        ("benchmarks.routing", ENGINE_LIBS),
        ("benchmarks.kv_pull_wait", ENGINE_LIBS),
        ("benchmarks.faults", ("vllm", "torch", "ray")),
        ("benchmarks.planner.cli", ("numpy", "pydantic", "vllm", "torch")),
    ],
)
def test_import_stays_light(module: str, heavy: tuple[str, ...]) -> None:
    code = (
        f"import sys, {module}; "
        f"heavy = [m for m in {heavy!r} if m in sys.modules]; "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
