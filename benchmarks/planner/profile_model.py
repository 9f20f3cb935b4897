"""The measured latency profile of one engine, and the step-latency model fitted to it.

A profile (JSON, format ``pdserve-plan-profile/1``) holds what ``pdserve plan profile``
measured on one instance: engine steps that only prefill, steps that only decode, and KV
pulls, each with its wall time. :class:`StepModel` turns those samples into a cost for any
step the simulator schedules::

    step_seconds = base_s
                 + prefill_token_s     x prefill tokens in the step
                 + prefill_attention_s x prefill attention pairs in the step
                 + decode_seq_s        x running decode sequences
                 + decode_context_token_s x context tokens of those sequences
    kv_pull_seconds(bytes) = kv_pull_base_s + kv_pull_s_per_byte x bytes

Prefill attention is counted as causal query-key pairs: a chunk of ``c`` tokens whose
prompt already has ``s`` tokens computed attends to ``c x s + c x (c + 1) / 2`` pairs. That
sum is the same however a prompt is chunked (``p x (p + 1) / 2`` for a ``p``-token prompt),
so a fit on whole-prompt samples holds for the chunks chunked prefill makes; charging each
chunk ``c x (s + c)`` instead would make a chunked prompt up to twice as cheap as a whole one.

Coefficients come from least squares on *relative* error (each sample's row is divided by
its measured seconds): the samples span milliseconds to seconds, and a plain fit would
serve the longest prefills and misfit every decode step. They are constrained to be >= 0
(a negative cost per token would make a bigger batch faster) by trying every subset of the
terms and keeping the best fit whose coefficients are all non-negative, which is exact
non-negative least squares for a handful of terms.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROFILE_FORMAT = "pdserve-plan-profile/1"


class ProfileError(ValueError):
    """A profile that cannot be used: unreadable, wrong format, or a bad field (named)."""


def prefill_attention(chunk_tokens: int, context_before: int) -> int:
    """Causal query-key pairs of a prefill chunk of ``chunk_tokens`` after ``context_before``
    tokens of the same prompt were computed (see the module docstring)."""
    return chunk_tokens * context_before + chunk_tokens * (chunk_tokens + 1) // 2


# -- the profile format -----------------------------------------------------------------------


def _check_int(where: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{where}: must be an integer, got {value!r}")
    if value < minimum:
        raise ProfileError(f"{where}: must be >= {minimum}, got {value}")


def _check_float(where: str, value: float, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileError(f"{where}: must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        relation = "> 0" if positive else ">= 0"
        raise ProfileError(f"{where}: must be {relation}, got {value!r}")


@dataclass(frozen=True)
class PrefillSample:
    """An engine step that prefilled ``batch`` prompts of ``prompt_tokens`` each, no decodes
    (several chunked steps when that exceeds ``max_num_batched_tokens``)."""

    prompt_tokens: int
    batch: int
    seconds: float

    def __post_init__(self) -> None:
        _check_int("prompt_tokens", self.prompt_tokens, 1)
        _check_int("batch", self.batch, 1)
        _check_float("seconds", self.seconds, positive=True)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens * self.batch

    @property
    def attention(self) -> int:
        return self.batch * prefill_attention(self.prompt_tokens, 0)

    def steps(self, max_num_batched_tokens: int) -> int:
        """Engine steps the sample took: more than one when its tokens exceed the step budget
        (chunked prefill), and each step pays the constant. The attention pairs are the same
        however the prompts were chunked."""
        return -(-self.tokens // max_num_batched_tokens)


@dataclass(frozen=True)
class DecodeSample:
    """One decode step of ``batch`` sequences whose mean context is ``context_tokens``."""

    batch: int
    context_tokens: int
    seconds: float

    def __post_init__(self) -> None:
        _check_int("batch", self.batch, 1)
        _check_int("context_tokens", self.context_tokens, 0)
        _check_float("seconds", self.seconds, positive=True)


@dataclass(frozen=True)
class KvPullSample:
    """Time for a decode instance to pull ``bytes`` of KV cache from a prefill instance."""

    bytes: int
    seconds: float

    def __post_init__(self) -> None:
        _check_int("bytes", self.bytes, 0)
        _check_float("seconds", self.seconds, positive=True)


# field name -> (sample class, its fields in file order)
_SAMPLE_LISTS: dict[str, tuple[type[Any], tuple[str, ...]]] = {
    "prefill": (PrefillSample, ("prompt_tokens", "batch", "seconds")),
    "decode": (DecodeSample, ("batch", "context_tokens", "seconds")),
    "kv_pull": (KvPullSample, ("bytes", "seconds")),
}
_INT_FIELDS = ("block_size", "kv_bytes_per_token", "max_num_batched_tokens", "max_num_seqs")
_STR_FIELDS = ("format", "model", "hardware", "created")


@dataclass(frozen=True)
class Profile:
    """What one engine measured; see the module docstring for what the samples mean."""

    model: str
    hardware: str
    created: str  # ISO 8601
    block_size: int
    kv_bytes_per_token: int  # KV bytes one token occupies, all layers
    max_num_batched_tokens: int  # the engine's token budget per step
    max_num_seqs: int  # the engine's most running sequences
    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    kv_pull: list[KvPullSample] = field(default_factory=list)
    proxy_overhead_s: float = 0.0  # added to each leg a request makes through the proxy
    format: str = PROFILE_FORMAT

    def __post_init__(self) -> None:
        if self.format != PROFILE_FORMAT:
            raise ProfileError(f"format: expected {PROFILE_FORMAT!r}, got {self.format!r}")
        for name in ("model", "hardware", "created"):
            if not isinstance(getattr(self, name), str):
                raise ProfileError(f"{name}: must be a string")
        for name in _INT_FIELDS:
            _check_int(name, getattr(self, name), 0 if name == "kv_bytes_per_token" else 1)
        _check_float("proxy_overhead_s", self.proxy_overhead_s)
        if self.max_num_batched_tokens < self.max_num_seqs:
            # vLLM refuses this too: every running sequence needs a token of the budget.
            raise ProfileError(
                f"max_num_batched_tokens: must be >= max_num_seqs ({self.max_num_seqs}), "
                f"got {self.max_num_batched_tokens}"
            )
        for name, (cls, _) in _SAMPLE_LISTS.items():
            samples = getattr(self, name)
            if not isinstance(samples, list) or not all(isinstance(s, cls) for s in samples):
                raise ProfileError(f"{name}: must be a list of {cls.__name__}")
        for name in ("prefill", "decode"):
            if not getattr(self, name):
                raise ProfileError(f"{name}: needs at least one sample to fit the step model")

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # The format string first: a reader sees what the file is before anything else.
        return {"format": data.pop("format"), **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        """Parse a decoded JSON document; ProfileError names the first bad field."""
        if not isinstance(data, dict):
            raise ProfileError("expected a JSON object at the top level")
        version = data.get("format")
        if version != PROFILE_FORMAT:
            raise ProfileError(f"format: expected {PROFILE_FORMAT!r}, got {version!r}")
        known = {*_STR_FIELDS, *_INT_FIELDS, *_SAMPLE_LISTS, "proxy_overhead_s"}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ProfileError(f"{unknown[0]}: unknown field")
        optional = {"kv_pull", "proxy_overhead_s"}
        for name in sorted(known - optional):
            if name not in data:
                raise ProfileError(f"{name}: missing")
        for name in _STR_FIELDS:
            if not isinstance(data[name], str):
                raise ProfileError(f"{name}: must be a string, got {data[name]!r}")
        samples = {
            name: _parse_samples(name, data.get(name, []), cls, fields)
            for name, (cls, fields) in _SAMPLE_LISTS.items()
        }
        return cls(
            model=data["model"],
            hardware=data["hardware"],
            created=data["created"],
            block_size=data["block_size"],
            kv_bytes_per_token=data["kv_bytes_per_token"],
            max_num_batched_tokens=data["max_num_batched_tokens"],
            max_num_seqs=data["max_num_seqs"],
            prefill=samples["prefill"],
            decode=samples["decode"],
            kv_pull=samples["kv_pull"],
            proxy_overhead_s=data.get("proxy_overhead_s", 0.0),
        )

    @classmethod
    def from_json(cls, text: str) -> Profile:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ProfileError(f"not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Path) -> Profile:
        """Read a profile file; ProfileError (one line, naming the file) on any problem."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ProfileError(f"{path}: cannot read: {reason}") from None
        try:
            return cls.from_json(text)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from None


def _parse_samples(name: str, items: Any, cls: type[Any], fields: tuple[str, ...]) -> list[Any]:
    if not isinstance(items, list):
        raise ProfileError(f"{name}: must be a list")
    parsed = []
    for index, item in enumerate(items):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise ProfileError(f"{where}: must be an object with {', '.join(fields)}")
        for key in item:
            if key not in fields:
                raise ProfileError(f"{where}.{key}: unknown field")
        for key in fields:
            if key not in item:
                raise ProfileError(f"{where}.{key}: missing")
        try:
            parsed.append(cls(**item))
        except ProfileError as exc:
            raise ProfileError(f"{where}.{exc}") from None
    return parsed


# -- the fitted model -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepModel:
    """Seconds per engine step and per KV pull, linear in the terms of the module docstring."""

    base_s: float = 0.0
    prefill_token_s: float = 0.0
    prefill_attention_s: float = 0.0
    decode_seq_s: float = 0.0
    decode_context_token_s: float = 0.0
    kv_pull_base_s: float = 0.0
    kv_pull_s_per_byte: float = 0.0

    def __post_init__(self) -> None:
        for name, value in self.coefficients().items():
            _check_float(name, value)

    def step_seconds(
        self, prefill_tokens: int, prefill_attention: float, decode_seqs: int, decode_context: int
    ) -> float:
        """One step that prefills ``prefill_tokens`` (``prefill_attention`` causal pairs, see
        :func:`prefill_attention`) and decodes ``decode_seqs`` sequences holding
        ``decode_context`` context tokens in all."""
        return (
            self.base_s
            + self.prefill_token_s * prefill_tokens
            + self.prefill_attention_s * prefill_attention
            + self.decode_seq_s * decode_seqs
            + self.decode_context_token_s * decode_context
        )

    def kv_pull_seconds(self, nbytes: int) -> float:
        return self.kv_pull_base_s + self.kv_pull_s_per_byte * nbytes

    @property
    def kv_pull_bandwidth_bytes_per_s(self) -> float:
        return 1.0 / self.kv_pull_s_per_byte if self.kv_pull_s_per_byte > 0 else math.inf

    def coefficients(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def fit(cls, profile: Profile) -> StepModel:
        """Decode terms (with the constant) from the decode samples first, then the prefill
        terms from what the constant leaves of each prefill sample, then the KV pull line."""
        decode = profile.decode
        base_s, decode_seq_s, decode_context_token_s = _nonnegative_fit(
            [[1.0, s.batch, s.batch * s.context_tokens] for s in decode],
            [s.seconds for s in decode],
            [s.seconds for s in decode],
        )
        prefill = profile.prefill
        budget = profile.max_num_batched_tokens
        prefill_token_s, prefill_attention_s = _nonnegative_fit(
            [[s.tokens, s.attention] for s in prefill],
            [s.seconds - base_s * s.steps(budget) for s in prefill],
            [s.seconds for s in prefill],
        )
        kv_pull_base_s = kv_pull_s_per_byte = 0.0
        if profile.kv_pull:
            kv_pull_base_s, kv_pull_s_per_byte = _nonnegative_fit(
                [[1.0, s.bytes] for s in profile.kv_pull],
                [s.seconds for s in profile.kv_pull],
                [s.seconds for s in profile.kv_pull],
            )
        return cls(
            base_s=base_s,
            prefill_token_s=prefill_token_s,
            prefill_attention_s=prefill_attention_s,
            decode_seq_s=decode_seq_s,
            decode_context_token_s=decode_context_token_s,
            kv_pull_base_s=kv_pull_base_s,
            kv_pull_s_per_byte=kv_pull_s_per_byte,
        )


def _nonnegative_fit(
    rows: Sequence[Sequence[float]], targets: Sequence[float], measured: Sequence[float]
) -> list[float]:
    """argmin over x >= 0 of sum(((rows @ x - targets) / measured) ** 2)."""
    weights = 1.0 / np.asarray(measured, dtype=float)
    a = np.asarray(rows, dtype=float) * weights[:, None]
    b = np.asarray(targets, dtype=float) * weights
    columns = a.shape[1]
    # Columns differ by orders of magnitude (attention pairs vs 1): unit columns keep the SVD
    # from discarding the small ones as noise.
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    a = a / norms
    best = np.zeros(columns)
    best_residual = float(b @ b)
    # Fewest terms first, and a larger subset only when it fits strictly better: with
    # collinear samples the simpler explanation is kept.
    for size in range(1, columns + 1):
        for subset in itertools.combinations(range(columns), size):
            cols = list(subset)
            solution, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (solution < 0).any():
                continue
            residual_vector = a[:, cols] @ solution - b
            residual = float(residual_vector @ residual_vector)
            if residual < best_residual * (1 - 1e-9) - 1e-30:
                best = np.zeros(columns)
                best[cols] = solution
                best_residual = residual
    return [float(x) for x in best / norms]


@dataclass(frozen=True)
class SampleFit:
    """How far the model is from one measured sample."""

    kind: str  # "prefill", "decode" or "kv_pull"
    sample: dict[str, int]  # the sample's fields (without seconds)
    measured_s: float
    predicted_s: float

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured: positive means the model is too slow."""
        return (self.predicted_s - self.measured_s) / self.measured_s


def fit_errors(profile: Profile, model: StepModel) -> list[SampleFit]:
    """The model's prediction for every sample of the profile, in the profile's order."""
    fits = []
    for p in profile.prefill:
        extra_steps = p.steps(profile.max_num_batched_tokens) - 1
        predicted = model.step_seconds(p.tokens, p.attention, 0, 0) + extra_steps * model.base_s
        sample = {"prompt_tokens": p.prompt_tokens, "batch": p.batch}
        fits.append(SampleFit("prefill", sample, p.seconds, predicted))
    for d in profile.decode:
        predicted = model.step_seconds(0, 0, d.batch, d.batch * d.context_tokens)
        sample = {"batch": d.batch, "context_tokens": d.context_tokens}
        fits.append(SampleFit("decode", sample, d.seconds, predicted))
    for k in profile.kv_pull:
        fits.append(
            SampleFit("kv_pull", {"bytes": k.bytes}, k.seconds, model.kv_pull_seconds(k.bytes))
        )
    return fits


def fit_report(profile: Profile, model: StepModel) -> dict[str, Any]:
    """Coefficients and, per kind of sample, the mean and worst relative error (for a report)."""
    by_kind: dict[str, list[SampleFit]] = {}
    for fit in fit_errors(profile, model):
        by_kind.setdefault(fit.kind, []).append(fit)
    errors: dict[str, Any] = {}
    for kind, fits in by_kind.items():
        worst = max(fits, key=lambda f: abs(f.relative_error))
        errors[kind] = {
            "samples": len(fits),
            "mean_abs_relative_error": sum(abs(f.relative_error) for f in fits) / len(fits),
            "worst": {**worst.sample, "relative_error": worst.relative_error},
        }
    return {"coefficients": model.coefficients(), "errors": errors}


def load_step_model(path: Path) -> tuple[Profile, StepModel]:
    """A profile file and the model fitted to it."""
    profile = Profile.load(path)
    return profile, StepModel.fit(profile)
