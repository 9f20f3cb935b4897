"""proxy.block_hashes against vLLM's own prefix-cache hashing.

The parity tests call vLLM's functions (``hash_block_tokens`` after ``init_none_hash``,
and a real ``Request`` with ``get_request_block_hasher``) on the same token ids; they are
skipped where vLLM is not installed (a proxy-only environment).
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from proxy.block_hashes import (
    CRYPTOGRAPHIC_ALGOS,
    DEFAULT_NONE_HASH_SEED,
    SUPPORTED_ALGOS,
    HashSettings,
    block_hashes,
    block_keys,
    resolve_none_hash_seed,
    to_block_key,
)

_MISSING = object()


def _xxhash_available() -> bool:
    try:
        module = importlib.import_module("xxhash")
    except ImportError:
        return False
    return hasattr(module, "xxh3_128_digest")


ALGOS = [
    pytest.param(
        algo,
        marks=pytest.mark.skipif(
            algo not in CRYPTOGRAPHIC_ALGOS and not _xxhash_available(),
            reason="xxhash is not installed",
        ),
    )
    for algo in sorted(SUPPORTED_ALGOS)
]


def _tokens(count: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    # Ids across every pickle/CBOR integer width, not just small ones.
    widths = [0, 1, 23, 24, 255, 256, 65_535, 65_536, 151_935, 2**31 - 1, 2**32]
    return [
        rng.choice(widths) if rng.random() < 0.2 else rng.randrange(200_000) for _ in range(count)
    ]


@pytest.fixture(scope="module")
def kv_utils() -> ModuleType:
    pytest.importorskip("vllm")
    from vllm.v1.core import kv_cache_utils

    return kv_cache_utils


@pytest.fixture
def vllm_hash(
    kv_utils: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], tuple[Callable[[Any], bytes], str]]]:
    """Initialise vLLM's NONE_HASH for an algorithm as an engine does; restored afterwards."""
    from vllm.utils.hashing import get_hash_fn_by_name

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    saved = {name: getattr(kv_utils, name, _MISSING) for name in ("NONE_HASH", "_NONE_HASH_SEED")}

    def init(algo: str) -> tuple[Callable[[Any], bytes], str]:
        hash_fn = get_hash_fn_by_name(algo)
        kv_utils.init_none_hash(hash_fn)
        return hash_fn, kv_utils.get_none_hash_seed()

    yield init
    for name, value in saved.items():
        if value is _MISSING:
            if hasattr(kv_utils, name):
                delattr(kv_utils, name)
        else:
            setattr(kv_utils, name, value)


def _vllm_chain(
    kv_utils: ModuleType, hash_fn: Callable[[Any], bytes], tokens: list[int], size: int
) -> list[bytes]:
    parent = None
    hashes: list[bytes] = []
    for start in range(0, len(tokens) - size + 1, size):
        parent = kv_utils.hash_block_tokens(hash_fn, parent, tokens[start : start + size])
        hashes.append(parent)
    return hashes


def _vllm_request_hashes(
    kv_utils: ModuleType,
    hash_fn: Callable[[Any], bytes],
    tokens: list[int],
    size: int,
    cache_salt: str | None = None,
) -> list[bytes]:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    request = Request(
        request_id="r",
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        cache_salt=cache_salt,
        block_hasher=kv_utils.get_request_block_hasher(size, hash_fn),
    )
    return list(request.block_hashes)


# -- parity with vLLM -------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("size", [16, 128])
@pytest.mark.parametrize("blocks,tail", [(0, 0), (0, -1), (1, 0), (3, 0), (3, 5), (5, -1)])
def test_hashes_equal_vllm_chain(
    kv_utils: ModuleType,
    vllm_hash: Callable[[str], tuple[Callable[[Any], bytes], str]],
    algo: str,
    size: int,
    blocks: int,
    tail: int,
) -> None:
    # tail -1 means one token short of the block count: a prompt shorter than one block
    # when blocks == 0, and a partial last block otherwise.
    length = blocks * size + tail if tail >= 0 else blocks * size + size - 1
    tokens = _tokens(length, seed=length + size)
    hash_fn, seed = vllm_hash(algo)
    settings = HashSettings(size, algo, seed)

    expected = _vllm_chain(kv_utils, hash_fn, tokens, size)
    assert len(expected) == length // size
    assert block_hashes(tokens, settings) == expected
    assert settings.none_hash == kv_utils.NONE_HASH


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("cache_salt", [None, "", "tenant-42", "sel ünïcode"])
def test_hashes_equal_vllm_request_block_hasher(
    kv_utils: ModuleType,
    vllm_hash: Callable[[str], tuple[Callable[[Any], bytes], str]],
    algo: str,
    cache_salt: str | None,
) -> None:
    """The engine's own per-request path, extra keys included (cache_salt on block 0)."""
    tokens = _tokens(16 * 4 + 3)
    hash_fn, seed = vllm_hash(algo)
    expected = _vllm_request_hashes(kv_utils, hash_fn, tokens, 16, cache_salt)
    assert len(expected) == 4
    assert block_hashes(tokens, HashSettings(16, algo, seed), cache_salt=cache_salt) == expected


def test_cache_salt_changes_every_hash_and_empty_salt_is_none() -> None:
    settings = HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED)
    tokens = _tokens(48)
    plain = block_hashes(tokens, settings)
    salted = block_hashes(tokens, settings, cache_salt="a")
    # The salt is in block 0 only, but the chain carries it into every later hash.
    assert all(p != s for p, s in zip(plain, salted, strict=True))
    assert block_hashes(tokens, settings, cache_salt="") == plain
    assert block_hashes(tokens, settings, cache_salt="b") != salted


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("env_seed", [None, "0", "1234", ""])
def test_seed_resolution_matches_vllm(
    kv_utils: ModuleType, monkeypatch: pytest.MonkeyPatch, algo: str, env_seed: str | None
) -> None:
    from vllm.utils.hashing import get_hash_fn_by_name

    if env_seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", env_seed)
    vllm_seed = kv_utils.resolve_none_hash_seed(get_hash_fn_by_name(algo))
    if env_seed is None and algo not in CRYPTOGRAPHIC_ALGOS:
        # vLLM picks a random per-process seed: nothing outside the engine can match it.
        with pytest.raises(ValueError, match="random per-process"):
            resolve_none_hash_seed(algo, env_seed)
    else:
        assert resolve_none_hash_seed(algo, env_seed) == vllm_seed


@pytest.mark.parametrize("use_int", ["1", "0"])
def test_event_hash_converts_to_the_same_key(
    kv_utils: ModuleType,
    vllm_hash: Callable[[str], tuple[Callable[[Any], bytes], str]],
    monkeypatch: pytest.MonkeyPatch,
    use_int: str,
) -> None:
    """What BlockStored carries (vLLM's maybe_convert_block_hash) maps to block_keys' key."""
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", use_int)
    hash_fn, seed = vllm_hash("sha256")
    tokens = _tokens(16 * 3)
    published = [
        kv_utils.maybe_convert_block_hash(h) for h in _vllm_chain(kv_utils, hash_fn, tokens, 16)
    ]
    assert all(isinstance(h, int if use_int == "1" else bytes) for h in published)
    keys = block_keys(tokens, HashSettings(16, "sha256", seed))
    assert [to_block_key(h) for h in published] == keys
    assert len(set(keys)) == 3


def test_cbor_encoder_matches_cbor2() -> None:
    cbor2 = pytest.importorskip("cbor2")
    from proxy import block_hashes as module

    ints = [0, 1, 23, 24, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**64 - 1]
    ints += [-1, -24, -25, -256, -257, -(2**32), -(2**64)]
    values: list[Any] = [
        None,
        *ints,
        b"",
        b"x" * 23,
        b"y" * 24,
        b"z" * 300,
        "",
        "vllm-none-hash",
        "ünïcode ✓",
        "s" * 70_000,
        (),
        (b"\x00" * 32, tuple(ints), None),
        (b"p", (1, 2), (("cache_salt", "salt"),)),
        tuple(range(30)),
    ]
    for value in values:
        assert module._cbor(value) == cbor2.dumps(value, canonical=True), value


# -- settings, keys and refusals ----------------------------------------------------------------


def test_a_different_seed_block_size_or_algo_gives_different_hashes() -> None:
    tokens = _tokens(256)
    base = block_hashes(tokens, HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED))
    assert len(base) == 16
    others = [
        HashSettings(16, "sha256", "another-seed"),
        HashSettings(16, "sha256_cbor", DEFAULT_NONE_HASH_SEED),
        HashSettings(32, "sha256", DEFAULT_NONE_HASH_SEED),
    ]
    for settings in others:
        hashes = block_hashes(tokens, settings)
        # No hash in common at all: a wrong setting shows up as zero matches, not a few.
        assert not set(hashes) & set(base), settings


def test_hashes_chain_through_the_prefix() -> None:
    settings = HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED)
    tokens = _tokens(64)
    changed = list(tokens)
    changed[20] += 1  # inside block 1
    before, after = block_hashes(tokens, settings), block_hashes(changed, settings)
    assert before[0] == after[0]
    assert all(b != a for b, a in zip(before[1:], after[1:], strict=True))
    # A longer prompt with the same prefix extends the list without changing it.
    assert block_hashes(tokens + _tokens(16, seed=1), settings)[:4] == before


def test_block_keys_are_the_low_64_bits_of_the_hashes() -> None:
    settings = HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED)
    tokens = _tokens(40)
    hashes = block_hashes(tokens, settings)
    assert block_keys(tokens, settings) == [int.from_bytes(h[-8:], "big") for h in hashes]
    assert all(len(h) == 32 for h in hashes)
    assert to_block_key(hashes[0]) == to_block_key(to_block_key(hashes[0]))


@pytest.mark.parametrize("bad", [True, 1.0, "1", None])
def test_non_int_token_ids_are_refused(bad: object) -> None:
    settings = HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED)
    tokens: list[Any] = _tokens(32)
    tokens[17] = bad
    with pytest.raises(TypeError, match=r"token_ids\[17\]"):
        block_hashes(tokens, settings)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 0, "algo": "sha256", "none_hash_seed": "s"}, "block_size"),
        ({"block_size": True, "algo": "sha256", "none_hash_seed": "s"}, "block_size"),
        ({"block_size": 16, "algo": "md5", "none_hash_seed": "s"}, "unsupported"),
        ({"block_size": 16, "algo": "sha256", "none_hash_seed": 3}, "none_hash_seed"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HashSettings(**kwargs)


def test_xxhash_without_the_package_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def without_xxhash(name: str, package: str | None = None) -> ModuleType:
        if name == "xxhash":
            raise ImportError("No module named 'xxhash'")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", without_xxhash)
    with pytest.raises(ValueError, match="xxhash package"):
        HashSettings(16, "xxhash", "1")


@pytest.mark.parametrize("bad", [-1, True, 1.5, "ab"])
def test_bad_event_hashes_are_refused(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        to_block_key(bad)


def test_settings_compare_by_value() -> None:
    a = HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED)
    assert a == HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED)
    assert a != HashSettings(16, "sha256", "x")
    assert hash(a) == hash(HashSettings(16, "sha256", DEFAULT_NONE_HASH_SEED))
