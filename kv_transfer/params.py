"""The ``kv_transfer_params`` protocol, defined once: keys, the typed views, build and parse.

The handoff follows vLLM's protocol (the one its NIXL connector speaks): a router sends the
prefill leg with ``{"do_remote_decode": true}``, the prefill engine answers with the params a
decode engine needs (``do_remote_prefill``, ``remote_host``/``remote_port``,
``remote_request_id``, ``remote_block_ids`` ...), and the router passes them unchanged to the
decode leg. Every key this project adds is an optional extension: a router that knows nothing
of them still drives our workers, and our proxy still fronts stock vLLM workers.

The scheduler half of the connector owns this module; the proxy imports it too, so it must stay
free of vLLM and torch imports.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The request and response body field.
FIELD = "kv_transfer_params"
# Fields a client must never set: they choose where an engine reads KV (or encoder cache) from.
ROUTER_ONLY_FIELDS = ("kv_transfer_params", "ec_transfer_params")

# vLLM's keys (NIXL's names).
DO_REMOTE_DECODE = "do_remote_decode"
DO_REMOTE_PREFILL = "do_remote_prefill"
REMOTE_ENGINE_ID = "remote_engine_id"
REMOTE_REQUEST_ID = "remote_request_id"
REMOTE_HOST = "remote_host"
REMOTE_PORT = "remote_port"
REMOTE_BLOCK_IDS = "remote_block_ids"
REMOTE_EXPIRY = "remote_blocks_expiry_time"
REMOTE_NUM_TOKENS = "remote_num_tokens"
TP_SIZE = "tp_size"
TRANSFER_MODE_KEY = "transfer_mode"

# pdserve's optional extensions.
PROMPT_DIGEST = "remote_prompt_digest"
BLOCK_SIZE = "block_size"
FINGERPRINT = "kv_fingerprint"
LEASE_S = "remote_lease_s"  # how long the hold lasts without a claim renewing it
HOLD_TOKEN = "remote_hold_token"  # proves to the block server that this hold was issued
# In a decode engine's (non-streamed) answer: what happened to the prompt's KV.
OUTCOME = "pdserve_kv_outcome"
RECOMPUTED_TOKENS = "pdserve_kv_recomputed_tokens"

TRANSFER_MODE = "pdserve-tcp-pull"
# The longest lease a claim renewal may ask for; block servers refuse longer ones.
MAX_LEASE_S = 3600.0
# The most prefill TP ranks (block servers at remote_port + rank) a decode will dial.
MAX_TP_SIZE = 64


class Outcome:
    """Values of ``OUTCOME``: how a decode engine got the prompt's KV."""

    TRANSFERRED = "transferred"  # pulled from the prefill instance
    LOCAL_CACHE = "local_cache"  # its own prefix cache held every block; nothing pulled
    RECOMPUTED = "recomputed"  # some or all of the prompt was computed again locally


class RecomputeReason:
    """Label values of the recompute counters (a fixed set: never taken from a request)."""

    PULL_FAILED = "pull_failed"  # the pull started and failed (peer died, refused, cut off)
    LEASE_LOST = "lease_lost"  # the prefill instance no longer holds the blocks
    UNUSABLE = "unusable"  # params that cannot be honoured (incompatible, malformed)

    ALL = (PULL_FAILED, LEASE_LOST, UNUSABLE)


def prefill_leg_params() -> dict[str, Any]:
    """What a router puts in a prefill leg: keep the KV for a remote decode."""
    return {DO_REMOTE_DECODE: True}


def prompt_digest(token_ids: Sequence[int]) -> str:
    """Identifies the exact prompt tokens, so a decode instance never attaches KV computed
    for a different token sequence."""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=16).hexdigest()


def hold_token(secret: bytes, engine_id: str, request_id: str) -> str:
    """A MAC over the hold, issued by the prefill scheduler and checked by its block server.

    A read naming a request the block server has not registered yet (the hold travels to the
    worker with the next engine step, the answer may be faster) is waited for only when its
    token proves the hold was issued; any other unknown request is refused at once.
    """
    message = f"{engine_id}|{request_id}".encode()
    return hmac.new(secret, b"pdserve-kv-hold/1" + message, hashlib.sha256).hexdigest()


def hold_token_valid(secret: bytes, engine_id: str, request_id: str, token: object) -> bool:
    if not isinstance(token, str):
        return False
    expected = hold_token(secret, engine_id, request_id)
    # Bytes: compare_digest refuses str with non-ASCII characters, which a peer may send.
    return hmac.compare_digest(token.encode(errors="replace"), expected.encode())


class ParamsError(ValueError):
    """The params cannot be used: ``reason`` is one of ``RecomputeReason``."""

    def __init__(self, message: str, reason: str = RecomputeReason.UNUSABLE) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RemotePrefill:
    """What a prefill engine returns and a decode engine consumes: where the held KV is."""

    engine_id: str
    request_id: str
    host: str
    port: int
    block_ids: tuple[int, ...]
    num_tokens: int
    prompt_digest: str
    block_size: int
    tp_size: int
    fingerprint: Mapping[str, Any]
    expiry_time: float
    lease_s: float
    hold_token: str
    transfer_mode: str = TRANSFER_MODE

    def to_params(self) -> dict[str, Any]:
        return {
            DO_REMOTE_PREFILL: True,
            DO_REMOTE_DECODE: False,
            REMOTE_ENGINE_ID: self.engine_id,
            REMOTE_REQUEST_ID: self.request_id,
            REMOTE_HOST: self.host,
            REMOTE_PORT: self.port,
            REMOTE_BLOCK_IDS: list(self.block_ids),
            REMOTE_EXPIRY: self.expiry_time,
            REMOTE_NUM_TOKENS: self.num_tokens,
            PROMPT_DIGEST: self.prompt_digest,
            TP_SIZE: self.tp_size,
            BLOCK_SIZE: self.block_size,
            FINGERPRINT: dict(self.fingerprint),
            LEASE_S: self.lease_s,
            HOLD_TOKEN: self.hold_token,
            TRANSFER_MODE_KEY: self.transfer_mode,
        }

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> RemotePrefill:
        """The typed view of a decode request's params; ParamsError if they are unusable.

        Checks shape and ranges only (no peer is ever dialled for params that fail here);
        ``check_against`` compares them with the local engine and prompt.
        """
        host = params.get(REMOTE_HOST)
        port = params.get(REMOTE_PORT)
        request_id = params.get(REMOTE_REQUEST_ID)
        if not (isinstance(host, str) and host and len(host) <= 255):
            raise ParamsError("kv_transfer_params lack a valid remote_host")
        if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
            raise ParamsError("kv_transfer_params lack a valid remote_port")
        if not (isinstance(request_id, str) and request_id and len(request_id) <= 512):
            raise ParamsError("kv_transfer_params lack a valid remote_request_id")
        mode = params.get(TRANSFER_MODE_KEY, TRANSFER_MODE)
        if mode != TRANSFER_MODE:
            raise ParamsError(f"transfer_mode {mode!r} is not {TRANSFER_MODE!r}")
        raw_blocks = params.get(REMOTE_BLOCK_IDS)
        # NIXL-style per-group lists: accept a single group.
        if (
            isinstance(raw_blocks, list)
            and len(raw_blocks) == 1
            and isinstance(raw_blocks[0], list)
        ):
            raw_blocks = raw_blocks[0]
        if not isinstance(raw_blocks, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 2**31 for b in raw_blocks
        ):
            raise ParamsError("remote_block_ids is not a list of block ids")
        tp_size = _int(params.get(TP_SIZE), 1)
        if not 1 <= tp_size <= MAX_TP_SIZE or port + tp_size - 1 > 65535:
            raise ParamsError(f"tp_size {tp_size} is out of range for remote_port {port}")
        fingerprint = params.get(FINGERPRINT) or {}
        if not isinstance(fingerprint, Mapping):
            raise ParamsError("kv_fingerprint is not a map")
        return cls(
            engine_id=str(params.get(REMOTE_ENGINE_ID) or ""),
            request_id=request_id,
            host=host,
            port=port,
            block_ids=tuple(raw_blocks),
            num_tokens=_int(params.get(REMOTE_NUM_TOKENS), -1),
            prompt_digest=str(params.get(PROMPT_DIGEST) or ""),
            block_size=_int(params.get(BLOCK_SIZE), 0),
            tp_size=tp_size,
            fingerprint=dict(fingerprint),
            expiry_time=_float(params.get(REMOTE_EXPIRY), 0.0),
            # Out of range: fall back to the decode's own lease (0 means "not given").
            lease_s=_lease(params.get(LEASE_S)),
            hold_token=str(params.get(HOLD_TOKEN) or ""),
            transfer_mode=TRANSFER_MODE,
        )

    def check_against(
        self,
        prompt_token_ids: Sequence[int],
        *,
        block_size: int,
        fingerprint: Mapping[str, Any],
    ) -> None:
        """Raise ParamsError unless this KV fits the local engine and this exact prompt."""
        if self.block_size and self.block_size != block_size:
            raise ParamsError(f"block_size {self.block_size} != local {block_size}")
        diffs = [
            f"{key}: {self.fingerprint.get(key)!r} != local {value!r}"
            for key, value in fingerprint.items()
            if key in self.fingerprint and self.fingerprint.get(key) != value
        ]
        if diffs:
            raise ParamsError("KV fingerprint mismatch: " + "; ".join(diffs))
        if self.num_tokens >= 0 and self.num_tokens != len(prompt_token_ids):
            raise ParamsError(
                f"prefill computed {self.num_tokens} prompt tokens, "
                f"this prompt has {len(prompt_token_ids)}"
            )
        if self.prompt_digest and self.prompt_digest != prompt_digest(prompt_token_ids):
            raise ParamsError("prompt tokens differ from the ones the prefill instance computed")
        needed = math.ceil(len(prompt_token_ids) / block_size)
        if len(self.block_ids) < needed:
            raise ParamsError(
                f"{len(self.block_ids)} remote blocks cannot hold "
                f"{len(prompt_token_ids)} prompt tokens"
            )


@dataclass(frozen=True)
class DecodeOutcome:
    """What a decode engine reports (in its non-streamed answer's ``kv_transfer_params``)."""

    outcome: str
    recomputed_tokens: int = 0

    def to_params(self) -> dict[str, Any]:
        return {OUTCOME: self.outcome, RECOMPUTED_TOKENS: self.recomputed_tokens}


def is_remote_prefill(params: Mapping[str, Any] | None) -> bool:
    return bool(params) and bool(params.get(DO_REMOTE_PREFILL))  # type: ignore[union-attr]


def is_remote_decode(params: Mapping[str, Any] | None) -> bool:
    return bool(params) and bool(params.get(DO_REMOTE_DECODE))  # type: ignore[union-attr]


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _lease(value: object) -> float:
    lease_s = _float(value, 0.0)
    return lease_s if 0.0 < lease_s <= MAX_LEASE_S else 0.0


def _float(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default
