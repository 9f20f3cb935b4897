"""A vLLM logits processor for tests: it freezes the engine after a chosen request's k-th token.

Loaded into the migration test's decode engines with ``--logits-processors``. The test writes a
plan (``plan.json`` in ``$PDSERVE_TEST_FREEZE_DIR``): the prompt token ids of the request to
stop and ``k``. When that request has produced exactly ``k`` tokens, the engine is about to
sample token ``k + 1``: the processor records the engine's process group in
``frozen-<pgid>`` and blocks the engine step forever. vLLM on CPU schedules synchronously, so
the ``k`` tokens of the earlier steps have already left the engine: the client receives exactly
``k`` tokens and no more, whatever the speed of the machine. The test then kills the group.

With ``"until": PATH`` in the plan the engine is held only until that file exists, then
goes on: the request stays in flight, unfinished, for exactly as long as the test wants.

The plan matches on the whole prompt: a continuation of the same request (the prompt followed
by the tokens generated so far) never matches, so the decode that continues it is not frozen.
Matching on the prompt instead of a request field keeps the request exactly what a client
sends (a field such as ``vllm_xargs`` would itself stop the proxy from migrating).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

PLAN_DIR_ENV = "PDSERVE_TEST_FREEZE_DIR"
PLAN_FILE = "plan.json"


class FreezeAfterTokens(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._dir = Path(os.environ[PLAN_DIR_ENV])
        # batch index -> (k, the request's live list of output token ids, release file)
        self._tracked: dict[int, tuple[int, list[int], str | None]] = {}

    def is_argmax_invariant(self) -> bool:
        # False: vLLM skips argmax-invariant processors for greedy requests.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._tracked, batch_update, self._track)

    def _track(
        self, _params: Any, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> tuple[int, list[int], str | None] | None:
        try:
            plan = json.loads((self._dir / PLAN_FILE).read_text())
        except FileNotFoundError:
            return None
        if prompt_ids is None or list(prompt_ids) != plan["prompt_token_ids"]:
            return None
        return int(plan["k"]), output_ids, plan.get("until")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for k, output_ids, until in self._tracked.values():
            if len(output_ids) == k:
                self._freeze(until)
        return logits

    def _freeze(self, until: str | None) -> None:
        group = os.getpgid(0)
        marker = self._dir / f"frozen-{group}"
        marker.write_text(str(group))
        while until is None or not Path(until).exists():
            time.sleep(0.05 if until else 3600)
