"""SLO attainment and goodput, from ``vllm bench serve`` results.

A request *meets the SLOs* when its TTFT is at most the TTFT SLO and its TPOT (time per
output token after the first: ``(E2E - TTFT) / (output tokens - 1)``, 0 for one-token
answers) at most the TPOT SLO: the rule vLLM's ``--goodput`` flag applies. A failed request
meets nothing. *Attainment* at a rate is the share of the requests sent that meet both.
*Goodput* is the highest request rate measured at which attainment is at least the target
(90 % by default, DistServe's definition).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_ATTAINMENT = 0.9


@dataclass(frozen=True)
class RequestOutcome:
    ok: bool
    ttft_s: float
    tpot_s: float  # 0 for one-token answers, as vLLM counts them
    e2e_s: float
    output_tokens: int

    def meets(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        return self.ok and self.ttft_s <= ttft_slo_s and self.tpot_s <= tpot_slo_s


def outcomes_from_vllm(result: Mapping[str, Any]) -> list[RequestOutcome]:
    """Per-request outcomes from a ``vllm bench serve --save-detailed`` result."""
    try:
        ttfts, latencies = result["ttfts"], result["latencies"]
        output_lens, errors = result["output_lens"], result["errors"]
    except KeyError as exc:
        raise ValueError(
            f"vllm bench result lacks {exc.args[0]!r} (run with --save-detailed)"
        ) from None
    outcomes = []
    for ttft, latency, output_len, error in zip(ttfts, latencies, output_lens, errors, strict=True):
        ok = not error and output_len > 0
        tpot = (latency - ttft) / (output_len - 1) if ok and output_len > 1 else 0.0
        outcomes.append(RequestOutcome(ok, float(ttft), tpot, float(latency), int(output_len)))
    return outcomes


def attainment(outcomes: Sequence[RequestOutcome], ttft_slo_s: float, tpot_slo_s: float) -> float:
    """The share of ``outcomes`` that meet both SLOs (0 for no requests)."""
    if not outcomes:
        return 0.0
    return sum(o.meets(ttft_slo_s, tpot_slo_s) for o in outcomes) / len(outcomes)


def goodput(points: Iterable[tuple[float, float]], target: float = DEFAULT_ATTAINMENT) -> float:
    """The highest rate among ``(rate, attainment)`` points whose attainment reaches ``target``;
    0 when none does."""
    return max((rate for rate, share in points if share >= target), default=0.0)


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``; None when the denominator is 0 (the ratio is unbounded)."""
    return None if denominator == 0 else numerator / denominator
