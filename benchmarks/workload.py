"""A mixed, seeded serving workload: prompt and output lengths shaped like a real chat trace.

Lengths are log-normal, the shape production LLM traces show (a heavy right tail of long
prompts). The medians come from the Azure LLM inference trace 2023 published with Splitwise
(Patel et al., ISCA 2024): in its *conversation* trace the median prompt is 1020 tokens and
the median output 129 tokens. On a CPU box those lengths would make one run take hours, so
the medians are divided by ``scale`` (default 4: 255 and 32 tokens); the ratio of prompt to
output, which decides how much prefill interferes with decode, is the trace's. The spread
(``sigma``, the standard deviation of the log) is ours: the paper publishes CDFs, not fitted
parameters; 0.8 for prompts and 0.6 for outputs put the trace's tails (a few prompts several
times the median) inside the model's context.

A fraction ``shared_prefix_fraction`` of the requests starts with the same
``shared_prefix_tokens``-token system prompt, so prefix caching has what a chat fleet
gives it. The rest of every prompt is distinct.

A user can give their own lengths instead: a JSONL file with ``prompt_tokens`` and
``output_tokens`` per line (:func:`read_lengths_jsonl`).

The requests are written as a vLLM ``custom`` dataset (``prompt`` text and ``output_tokens``
per line) for ``vllm bench serve --dataset-name custom --skip-chat-template``. The prompt
text is built from words the model's tokenizer encodes as one token each, so every prompt has
exactly its drawn token count (checked by :func:`render_prompts`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Splitwise, Azure LLM inference trace 2023, conversation: medians (tokens).
TRACE_SOURCE = (
    "Azure LLM inference trace 2023, conversation (Patel et al., Splitwise, ISCA 2024): "
    "median prompt 1020 tokens, median output 129 tokens"
)
TRACE_PROMPT_MEDIAN = 1020
TRACE_OUTPUT_MEDIAN = 129


class WorkloadError(ValueError):
    """A workload that cannot be built: bad spec, unreadable file, tokenizer too poor."""


@dataclass(frozen=True)
class WorkloadSpec:
    """How to draw a workload; the same spec and seed always give the same requests."""

    num_requests: int = 200
    seed: int = 0
    scale: float = 4.0  # the trace's medians are divided by this
    prompt_sigma: float = 0.8
    output_sigma: float = 0.6
    min_prompt_tokens: int = 16
    max_prompt_tokens: int = 1536
    min_output_tokens: int = 4
    max_output_tokens: int = 256
    shared_prefix_tokens: int = 128
    shared_prefix_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise WorkloadError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.scale > 0:
            raise WorkloadError(f"scale must be > 0, got {self.scale}")
        if self.prompt_sigma < 0 or self.output_sigma < 0:
            raise WorkloadError("sigmas must be >= 0")
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise WorkloadError("need 1 <= min_prompt_tokens <= max_prompt_tokens")
        if not 1 <= self.min_output_tokens <= self.max_output_tokens:
            raise WorkloadError("need 1 <= min_output_tokens <= max_output_tokens")
        if not 0.0 <= self.shared_prefix_fraction <= 1.0:
            raise WorkloadError("shared_prefix_fraction must be within [0, 1]")
        if self.shared_prefix_tokens < 0:
            raise WorkloadError("shared_prefix_tokens must be >= 0")

    @property
    def prompt_median(self) -> float:
        return TRACE_PROMPT_MEDIAN / self.scale

    @property
    def output_median(self) -> float:
        return TRACE_OUTPUT_MEDIAN / self.scale


@dataclass(frozen=True)
class WorkloadRequest:
    """One request's lengths. ``shared_prefix_tokens`` of the prompt are the shared prefix."""

    prompt_tokens: int
    output_tokens: int
    shared_prefix_tokens: int = 0


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    value = rng.lognormvariate(math.log(median), sigma) if sigma > 0 else median
    return min(high, max(low, round(value)))


def generate(spec: WorkloadSpec) -> list[WorkloadRequest]:
    """Draw ``spec.num_requests`` requests (seeded; independent of anything else)."""
    rng = random.Random(spec.seed)
    requests = []
    for _ in range(spec.num_requests):
        prompt = _lognormal_int(
            rng, spec.prompt_median, spec.prompt_sigma, spec.min_prompt_tokens,
            spec.max_prompt_tokens,
        )  # fmt: skip
        output = _lognormal_int(
            rng, spec.output_median, spec.output_sigma, spec.min_output_tokens,
            spec.max_output_tokens,
        )  # fmt: skip
        # Drawn for every request, so the lengths do not depend on the fraction.
        shares = rng.random() < spec.shared_prefix_fraction
        # The shared prefix needs at least one distinct token after it.
        prefix = spec.shared_prefix_tokens if shares and prompt > spec.shared_prefix_tokens else 0
        requests.append(WorkloadRequest(prompt, output, prefix))
    return requests


def read_lengths_jsonl(path: Path, shared_prefix_tokens: int = 0) -> list[WorkloadRequest]:
    """Requests from a JSONL file with ``prompt_tokens`` and ``output_tokens`` per line.

    Every prompt longer than ``shared_prefix_tokens`` starts with the shared prefix.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt, output = item["prompt_tokens"], item["output_tokens"]
        except (ValueError, TypeError, KeyError):
            raise WorkloadError(
                f"{path}:{number}: expected a JSON object with integer prompt_tokens and "
                "output_tokens"
            ) from None
        if not (isinstance(prompt, int) and isinstance(output, int)) or prompt < 1 or output < 1:
            raise WorkloadError(
                f"{path}:{number}: prompt_tokens and output_tokens must be integers >= 1"
            )
        prefix = shared_prefix_tokens if prompt > shared_prefix_tokens > 0 else 0
        requests.append(WorkloadRequest(prompt, output, prefix))
    if not requests:
        raise WorkloadError(f"{path}: no requests")
    return requests


def summary(requests: Sequence[WorkloadRequest]) -> dict[str, Any]:
    """What a report says about the workload: length percentiles and the shared fraction."""

    def pct(values: list[int], q: float) -> int:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]

    prompts = [r.prompt_tokens for r in requests]
    outputs = [r.output_tokens for r in requests]
    shared = [r for r in requests if r.shared_prefix_tokens]
    total_prompt = sum(prompts)
    return {
        "requests": len(requests),
        "prompt_tokens": {f"p{q}": pct(prompts, q) for q in (50, 90, 99)}
        | {"mean": total_prompt / len(prompts)},
        "output_tokens": {f"p{q}": pct(outputs, q) for q in (50, 90, 99)}
        | {"mean": sum(outputs) / len(outputs)},
        "shared_prefix_request_fraction": len(shared) / len(requests),
        # The share of all prompt tokens that a warm prefix cache can serve.
        "shared_prefix_token_fraction": sum(r.shared_prefix_tokens for r in shared) / total_prompt,
    }


# -- prompt text ------------------------------------------------------------------------------


Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


def single_token_words(encode: Encode, decode: Decode, vocab_ids: Iterable[int]) -> list[str]:
    """Words (with their leading space) that encode to exactly one token, alone and in a row.

    A prompt made of these words has as many tokens as words, whatever the order, so lengths
    are exact without trial and error per prompt.
    """
    words = set()
    for token_id in vocab_ids:
        word = " " + decode([token_id]).strip()
        if len(word) >= 2 and word[1:].isalnum() and len(encode(word)) == 1:
            words.add(word)
    # A word must also stay one token next to another word (no merge across the space).
    return [word for word in sorted(words) if len(encode(word + word)) == 2]


def render_prompts(
    requests: Sequence[WorkloadRequest],
    words: Sequence[str],
    seed: int,
    encode: Encode,
    special_tokens: int,
    prefix_seed: int | None = None,
) -> list[str]:
    """Prompt texts of exactly each request's token count (``special_tokens`` of which, e.g.
    BOS, the server adds itself). The shared prefix's words come from ``prefix_seed`` (default
    ``seed``), so differently seeded prompt sets can share it. Raises WorkloadError when a
    prompt comes out another length.
    """
    if len(words) < 16:
        raise WorkloadError(
            f"the tokenizer has only {len(words)} one-token words; cannot build prompts of "
            "exact lengths"
        )
    longest_prefix = max((r.shared_prefix_tokens for r in requests), default=0)
    prefix_rng = random.Random(seed if prefix_seed is None else prefix_seed)
    prefix_words = [prefix_rng.choice(words) for _ in range(longest_prefix)]
    rng = random.Random(seed)
    prompts = []
    for index, request in enumerate(requests):
        body_length = request.prompt_tokens - special_tokens
        if body_length < 1:
            raise WorkloadError(
                f"request {index}: {request.prompt_tokens} prompt tokens leave no room beside "
                f"{special_tokens} special token(s)"
            )
        prefix = prefix_words[: min(request.shared_prefix_tokens, body_length - 1)]
        rest = [rng.choice(words) for _ in range(body_length - len(prefix))]
        text = "".join(prefix + rest).lstrip()
        got = len(encode(text))
        if got != body_length:
            raise WorkloadError(
                f"request {index}: prompt text encodes to {got} tokens, expected {body_length}"
            )
        prompts.append(text)
    return prompts


def write_vllm_custom_jsonl(
    path: Path, prompts: Sequence[str], requests: Sequence[WorkloadRequest]
) -> None:
    """vLLM's ``custom`` dataset: one ``{"prompt", "output_tokens"}`` object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for prompt, request in zip(prompts, requests, strict=True):
            out.write(json.dumps({"prompt": prompt, "output_tokens": request.output_tokens}))
            out.write("\n")


def write_lengths_jsonl(path: Path, requests: Sequence[WorkloadRequest]) -> None:
    """The lengths alone (the format :func:`read_lengths_jsonl` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for request in requests:
            out.write(json.dumps(asdict(request)) + "\n")


# -- command line -----------------------------------------------------------------------------


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload flags ``pdserve bench pd`` and ``pdserve plan simulate`` share."""
    defaults = WorkloadSpec()
    group = parser.add_argument_group(
        "workload", f"log-normal lengths with the medians of the {TRACE_SOURCE}, divided by --scale"
    )
    group.add_argument(
        "--num-prompts", type=int, default=defaults.num_requests, help="requests per rate"
    )
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--scale", type=float, default=defaults.scale, help="trace medians / this")
    group.add_argument("--prompt-sigma", type=float, default=defaults.prompt_sigma)
    group.add_argument("--output-sigma", type=float, default=defaults.output_sigma)
    group.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    group.add_argument("--max-output-tokens", type=int, default=defaults.max_output_tokens)
    group.add_argument("--shared-prefix-tokens", type=int, default=defaults.shared_prefix_tokens)
    group.add_argument(
        "--shared-prefix-fraction", type=float, default=defaults.shared_prefix_fraction,
        help="share of requests that start with the shared prefix",
    )  # fmt: skip
    group.add_argument(
        "--workload-jsonl", type=Path, default=None, metavar="FILE",
        help="lengths from FILE (prompt_tokens, output_tokens per line) instead of drawing them",
    )  # fmt: skip


def workload_from_args(args: argparse.Namespace) -> tuple[WorkloadSpec, list[WorkloadRequest]]:
    """The spec and the requests the flags describe; WorkloadError on bad values."""
    spec = WorkloadSpec(
        num_requests=args.num_prompts,
        seed=args.seed,
        scale=args.scale,
        prompt_sigma=args.prompt_sigma,
        output_sigma=args.output_sigma,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        min_prompt_tokens=min(WorkloadSpec.min_prompt_tokens, args.max_prompt_tokens),
        min_output_tokens=min(WorkloadSpec.min_output_tokens, args.max_output_tokens),
        shared_prefix_tokens=args.shared_prefix_tokens,
        shared_prefix_fraction=args.shared_prefix_fraction,
    )
    if args.workload_jsonl is not None:
        requests = read_lengths_jsonl(args.workload_jsonl, spec.shared_prefix_tokens)
        return spec, requests[: spec.num_requests]
    return spec, generate(spec)
