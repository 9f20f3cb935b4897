"""The kv_transfer_params protocol (kv_transfer/params.py): build, parse, compatibility checks."""

from __future__ import annotations

import hashlib
from array import array
from typing import Any

import pytest

from kv_transfer import params as kvp
from kv_transfer.params import (
    DecodeOutcome,
    Outcome,
    ParamsError,
    RecomputeReason,
    RemotePrefill,
    hold_token,
    hold_token_valid,
    prompt_digest,
)

SECRET = b"params-secret"
BS = 32
TOKENS = list(range(1000, 1070))  # 70 tokens: 3 blocks of 32
FINGERPRINT = {"model": "tiny", "dtype": "torch.float32", "block_size": BS, "tp_size": 1}


def remote(**overrides: Any) -> RemotePrefill:
    base: dict[str, Any] = dict(
        engine_id="prefill-0",
        request_id="p-1",
        host="10.0.0.5",
        port=15100,
        block_ids=(7, 8, 9),
        num_tokens=len(TOKENS),
        prompt_digest=prompt_digest(TOKENS),
        block_size=BS,
        tp_size=1,
        fingerprint=dict(FINGERPRINT),
        expiry_time=1_000_030.0,
        lease_s=30.0,
        hold_token=hold_token(SECRET, "prefill-0", "p-1"),
    )
    base.update(overrides)
    return RemotePrefill(**base)


def test_round_trip_to_params_and_parse() -> None:
    original = remote()
    wire_params = original.to_params()
    # What a router sees and passes on unchanged: vLLM's (NIXL's) keys plus our extensions.
    assert wire_params[kvp.DO_REMOTE_PREFILL] is True
    assert wire_params[kvp.DO_REMOTE_DECODE] is False
    assert wire_params[kvp.REMOTE_BLOCK_IDS] == [7, 8, 9]
    assert wire_params[kvp.TRANSFER_MODE_KEY] == kvp.TRANSFER_MODE
    assert kvp.is_remote_prefill(wire_params) and not kvp.is_remote_decode(wire_params)
    parsed = RemotePrefill.parse(wire_params)
    assert parsed == original
    # A parsed copy checks out against the prompt it was made for.
    parsed.check_against(TOKENS, block_size=BS, fingerprint=FINGERPRINT)


def test_router_side_helpers() -> None:
    assert kvp.prefill_leg_params() == {"do_remote_decode": True}
    assert kvp.is_remote_decode(kvp.prefill_leg_params())
    assert not kvp.is_remote_prefill(None) and not kvp.is_remote_decode({})


def _parse_with(**changes: Any) -> RemotePrefill:
    wire_params = remote().to_params()
    for key, value in changes.items():
        if value is _DELETE:
            del wire_params[key]
        else:
            wire_params[key] = value
    return RemotePrefill.parse(wire_params)


_DELETE = object()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (kvp.REMOTE_HOST, ""),
        (kvp.REMOTE_HOST, 17),
        (kvp.REMOTE_HOST, "h" * 256),
        (kvp.REMOTE_HOST, _DELETE),
        (kvp.REMOTE_PORT, 0),
        (kvp.REMOTE_PORT, 70000),
        (kvp.REMOTE_PORT, -1),
        (kvp.REMOTE_PORT, True),
        (kvp.REMOTE_PORT, "15100"),
        (kvp.REMOTE_PORT, 15100.0),
        (kvp.REMOTE_PORT, _DELETE),
        (kvp.REMOTE_REQUEST_ID, ""),
        (kvp.REMOTE_REQUEST_ID, 5),
        (kvp.REMOTE_REQUEST_ID, "r" * 513),
        (kvp.REMOTE_BLOCK_IDS, [1, -2]),
        (kvp.REMOTE_BLOCK_IDS, [1, 2**31]),
        (kvp.REMOTE_BLOCK_IDS, [1, "2"]),
        (kvp.REMOTE_BLOCK_IDS, [1, True]),
        (kvp.REMOTE_BLOCK_IDS, [1, 2.0]),
        (kvp.REMOTE_BLOCK_IDS, "1,2"),
        (kvp.REMOTE_BLOCK_IDS, [[1], [2]]),  # two NIXL groups: not ours to map
        (kvp.REMOTE_BLOCK_IDS, _DELETE),
        (kvp.TRANSFER_MODE_KEY, "nixl"),
        (kvp.FINGERPRINT, ["model", "tiny"]),
        (kvp.FINGERPRINT, "tiny"),
    ],
    ids=lambda v: "deleted" if v is _DELETE else repr(v)[:20],
)
def test_parse_rejects_bad_shapes_and_ranges(key: str, value: object) -> None:
    with pytest.raises(ParamsError) as info:
        _parse_with(**{key: value})
    assert info.value.reason == RecomputeReason.UNUSABLE


@pytest.mark.parametrize("port", [1, 65535])
def test_parse_accepts_the_port_range_edges(port: int) -> None:
    assert _parse_with(**{kvp.REMOTE_PORT: port}).port == port


def test_parse_accepts_nixl_nested_block_ids() -> None:
    assert _parse_with(**{kvp.REMOTE_BLOCK_IDS: [[7, 8, 9]]}).block_ids == (7, 8, 9)


def test_parse_fills_defaults_for_optional_extensions() -> None:
    """A prefill that only speaks vLLM's keys still yields usable params (checks skipped)."""
    parsed = RemotePrefill.parse(
        {
            kvp.DO_REMOTE_PREFILL: True,
            kvp.REMOTE_HOST: "h",
            kvp.REMOTE_PORT: 1,
            kvp.REMOTE_REQUEST_ID: "r",
            kvp.REMOTE_BLOCK_IDS: [1, 2, 3],
        }
    )
    assert parsed.num_tokens == -1 and parsed.prompt_digest == "" and parsed.block_size == 0
    assert parsed.tp_size == 1 and parsed.lease_s == 0.0 and parsed.hold_token == ""
    assert parsed.fingerprint == {}
    parsed.check_against(TOKENS, block_size=BS, fingerprint=FINGERPRINT)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (kvp.REMOTE_NUM_TOKENS, "70"),
        (kvp.REMOTE_NUM_TOKENS, True),
        (kvp.REMOTE_EXPIRY, float("nan")),
        (kvp.REMOTE_EXPIRY, "soon"),
        (kvp.LEASE_S, float("inf")),
        (kvp.LEASE_S, True),
    ],
)
def test_parse_ignores_ill_typed_optional_numbers(key: str, value: object) -> None:
    parsed = _parse_with(**{key: value})
    assert parsed.num_tokens in (-1, len(TOKENS))
    assert parsed.expiry_time in (0.0, 1_000_030.0)
    assert parsed.lease_s in (0.0, 30.0)


@pytest.mark.parametrize("lease_s", [-1.0, 1e9])
def test_parse_never_yields_a_lease_a_block_server_refuses_to_renew(lease_s: float) -> None:
    """The decode renews with ``extend_s = lease_s``; a block server accepts 0 < s <= 3600.
    A negative or huge lease in the params must be refused or fall back to 0 (the decode's
    own lease), never be claimed as is."""
    try:
        parsed = _parse_with(**{kvp.LEASE_S: lease_s})
    except ParamsError:
        return
    assert parsed.lease_s == 0.0 or 0.0 < parsed.lease_s <= 3600.0, parsed.lease_s


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt_digest": prompt_digest([1, 2, 3])}, "prompt tokens differ"),
        ({"num_tokens": 69}, "69 prompt tokens"),
        ({"block_size": 16}, "block_size 16"),
        ({"fingerprint": {**FINGERPRINT, "dtype": "torch.bfloat16"}}, "fingerprint mismatch"),
        ({"fingerprint": {**FINGERPRINT, "model": "other"}}, "model"),
        ({"block_ids": (7, 8)}, "2 remote blocks"),
    ],
    ids=["digest", "num-tokens", "block-size", "dtype", "model", "too-few-blocks"],
)
def test_check_against_refuses_kv_for_another_prompt_or_layout(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ParamsError, match=message) as info:
        remote(**change).check_against(TOKENS, block_size=BS, fingerprint=FINGERPRINT)
    assert info.value.reason == RecomputeReason.UNUSABLE


def test_check_against_compares_only_fingerprint_keys_both_sides_know() -> None:
    remote(fingerprint={"model": "tiny"}).check_against(
        TOKENS, block_size=BS, fingerprint={**FINGERPRINT, "new_key": 1}
    )
    # More remote blocks than the prompt needs is fine (the prefill's last block may be spare).
    remote(block_ids=(7, 8, 9, 10)).check_against(TOKENS, block_size=BS, fingerprint=FINGERPRINT)


def test_hold_token_is_valid_only_for_its_secret_engine_and_request() -> None:
    token = hold_token(SECRET, "prefill-0", "p-1")
    assert hold_token_valid(SECRET, "prefill-0", "p-1", token)
    assert not hold_token_valid(b"other-secret", "prefill-0", "p-1", token)
    assert not hold_token_valid(SECRET, "prefill-1", "p-1", token)
    assert not hold_token_valid(SECRET, "prefill-0", "p-2", token)
    assert not hold_token_valid(SECRET, "prefill-0", "p-1", token[:-1])
    assert not hold_token_valid(SECRET, "prefill-0", "p-1", "")
    assert not hold_token_valid(SECRET, "prefill-0", "p-1", None)
    assert not hold_token_valid(SECRET, "prefill-0", "p-1", token.encode())
    assert hold_token(SECRET, "prefill-0", "p-1") == token  # deterministic: no state to share


@pytest.mark.parametrize(
    "token", ["é" * 64, "\udcff", "\x00"], ids=["non-ascii", "surrogate", "nul"]
)
def test_hold_token_valid_is_false_not_an_error_for_any_string(token: str) -> None:
    """The token travels from a request's kv_transfer_params to the block server, which calls
    this on every read: a non-ASCII string must read as invalid, not raise TypeError (that
    drops the decode's connection as an unexpected server error)."""
    assert hold_token_valid(SECRET, "prefill-0", "p-1", token) is False


def test_prompt_digest_is_stable_and_exact() -> None:
    assert prompt_digest(TOKENS) == prompt_digest(list(TOKENS))
    assert prompt_digest(TOKENS) == prompt_digest(tuple(TOKENS))
    assert len(prompt_digest([])) == 32
    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 4])
    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 3, 0])
    assert prompt_digest([1, 2]) != prompt_digest([2, 1])
    assert prompt_digest([2**40]) != prompt_digest([0])


def test_prompt_digest_is_a_fixed_function_of_the_tokens() -> None:
    """The prefill and decode instances may run different builds: the digest is pinned."""
    expected = hashlib.blake2b(array("q", [5, 6, 7]).tobytes(), digest_size=16).hexdigest()
    assert prompt_digest([5, 6, 7]) == expected


def test_decode_outcome_params() -> None:
    assert DecodeOutcome(Outcome.TRANSFERRED).to_params() == {
        kvp.OUTCOME: "transferred",
        kvp.RECOMPUTED_TOKENS: 0,
    }
    assert DecodeOutcome(Outcome.RECOMPUTED, 70).to_params() == {
        "pdserve_kv_outcome": "recomputed",
        "pdserve_kv_recomputed_tokens": 70,
    }
    assert set(RecomputeReason.ALL) == {"pull_failed", "lease_lost", "unusable"}


@pytest.mark.parametrize(
    ("tp_size", "port"), [(0, 15100), (65, 15100), (2, 65535)], ids=["zero", "huge", "past-port"]
)
def test_parse_refuses_a_tp_size_that_would_dial_too_many_or_no_ports(
    tp_size: int, port: int
) -> None:
    with pytest.raises(kvp.ParamsError, match="tp_size"):
        _parse_with(**{kvp.TP_SIZE: tp_size, kvp.REMOTE_PORT: port})
