"""After every end-to-end test the prefill instance must hold no KV blocks.

The engines are the session's (tests/conftest.py), with a short lease: a test that leaves a
prefill un-pulled on purpose must wait for that lease to expire itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

RELEASE_TIMEOUT_S = 15.0


@pytest.fixture(autouse=True)
def prefill_releases_all_blocks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not set(request.fixturenames) & {"real_pd", "real_proxy", "real_prefill"}:
        return
    request.getfixturevalue("real_prefill").wait_blocks_released(RELEASE_TIMEOUT_S)
