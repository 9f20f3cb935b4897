"""After every end-to-end test the prefill instance must hold no KV blocks."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

BLOCKS_HELD = "pdserve_kv_blocks_held"
RELEASE_TIMEOUT_S = 15.0


@pytest.fixture(autouse=True)
def prefill_releases_all_blocks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    names = set(request.fixturenames)
    if not names & {"real_pd", "real_proxy", "real_prefill"}:
        return
    prefill = request.getfixturevalue("real_prefill")
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    held = prefill.metric(BLOCKS_HELD)
    while (held is None or held > 0) and time.monotonic() < deadline:
        time.sleep(0.25)
        held = prefill.metric(BLOCKS_HELD)
    assert held is not None, f"the prefill worker's /metrics has no {BLOCKS_HELD}"
    assert held == 0, (
        f"prefill still holds {held:.0f} KV blocks {RELEASE_TIMEOUT_S:.0f} s after the test"
    )
