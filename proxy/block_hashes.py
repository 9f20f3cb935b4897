"""A prompt's prefix-cache block hashes, computed exactly as vLLM 0.32's engine does.

vLLM hashes a request's tokens in blocks of ``hash_block_size`` tokens, each hash chained
through its parent's (``vllm/v1/core/kv_cache_utils.py``: ``hash_block_tokens``,
``get_request_block_hasher``)::

    hash[0] = H((NONE_HASH, tuple(tokens[0:B]), extra_keys_0))
    hash[i] = H((hash[i-1], tuple(tokens[i*B:(i+1)*B]), extra_keys_i))

where ``H`` is ``prefix_caching_hash_algo`` (``vllm/utils/hashing.py``): ``sha256`` and
``xxhash`` hash ``pickle.dumps(obj, HIGHEST_PROTOCOL)``, ``sha256_cbor`` and ``xxhash_cbor``
hash canonical CBOR (xxhash variants use ``xxh3_128_digest``). A partial last block has no
hash. ``NONE_HASH = H(seed)``, the seed resolved by ``resolve_none_hash_seed``: the
engine core process's ``PYTHONHASHSEED`` when set (any string, even empty), otherwise
``"vllm-none-hash"`` for the sha256 algorithms and 32 random bytes per process for the
xxhash ones (whose hashes then cannot be reproduced outside that process).

What must come from the engine, never be assumed (:class:`HashSettings`):

* ``block_size``: the engine's hash block size, ``kv_cache_config.hash_block_size``. For a
  model with one KV cache group (every full-attention model) it is
  ``cache_config.block_size`` times ``decode_context_parallel_size`` (1 unless DCP is on);
  hybrid models hash at ``cache_config.prefix_match_unit`` or the GCD of their group
  block sizes, and their events carry per-group block sizes: this module targets the
  single-group case. ``block_size`` is also a label of the engine's
  ``vllm:cache_config_info`` metric, and ``BlockStored.block_size`` in its KV events.
* ``algo``: ``cache_config.prefix_caching_hash_algo`` (``--prefix-caching-hash-algo``,
  default ``sha256``; also a ``vllm:cache_config_info`` label).
* ``none_hash_seed``: not exposed over HTTP; :func:`resolve_none_hash_seed` mirrors vLLM
  given the engine's ``PYTHONHASHSEED`` (in-process, vLLM's ``get_none_hash_seed()``).

Extra keys: vLLM adds LoRA ``("lora", name, path)``, multimodal and prompt-embeds keys to
the hashed tuple. This module hashes plain token prompts only; for a LoRA, multimodal or
prompt-embeds request its hashes will not match the engine's. ``cache_salt`` is matched
exactly: vLLM adds ``("cache_salt", salt)`` to the first block only, and only for a
non-empty salt, which is what :func:`block_hashes` does when given one.

KV events carry each hash as ``ExternalBlockHash = bytes | int``: with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`` (vLLM's default) the int
``int.from_bytes(hash, "big") & (2**64 - 1)``, i.e. the hash's last 8 bytes, otherwise the
full bytes. The full hash cannot be recovered from the int, so the key both sides agree on
is that 64-bit int: :func:`to_block_key` turns either event form, or a hash from
:func:`block_hashes`, into it, and :func:`block_keys` gives a prompt's keys directly.

Importing vLLM costs seconds (torch) and the proxy must run without it, so nothing here
imports vLLM: pickle and hashlib are the standard library's, and the few CBOR shapes vLLM
hashes are encoded here (tests prove parity with vLLM's own functions).
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CRYPTOGRAPHIC_ALGOS",
    "DEFAULT_NONE_HASH_SEED",
    "SUPPORTED_ALGOS",
    "BlockKey",
    "HashSettings",
    "block_hashes",
    "block_keys",
    "resolve_none_hash_seed",
    "to_block_key",
]

# The 64-bit key shared by the hasher and the KV event index (see the module docstring).
BlockKey = int

# vLLM's seed for NONE_HASH when PYTHONHASHSEED is unset and the algorithm is cryptographic.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"

SUPPORTED_ALGOS = frozenset({"sha256", "sha256_cbor", "xxhash", "xxhash_cbor"})
# vLLM gives the other algorithms a random per-process seed (they are not collision resistant).
CRYPTOGRAPHIC_ALGOS = frozenset({"sha256", "sha256_cbor"})

_KEY_MASK = (1 << 64) - 1


def resolve_none_hash_seed(algo: str, pythonhashseed: str | None) -> str:
    """The seed an engine derives NONE_HASH from, as vLLM's ``resolve_none_hash_seed``.

    ``pythonhashseed`` is the engine core process's ``PYTHONHASHSEED`` (None when unset).
    For an xxhash algorithm without it the engine uses a random seed nobody else can know:
    that is refused rather than guessed.
    """
    _check_algo(algo)
    if pythonhashseed is not None:
        return pythonhashseed
    if algo in CRYPTOGRAPHIC_ALGOS:
        return DEFAULT_NONE_HASH_SEED
    raise ValueError(
        f"prefix_caching_hash_algo {algo!r} without PYTHONHASHSEED uses a random per-process "
        f"NONE_HASH seed in vLLM: its block hashes cannot be reproduced outside the engine; "
        f"set PYTHONHASHSEED on the engines or use sha256/sha256_cbor"
    )


@dataclass(frozen=True, slots=True)
class HashSettings:
    """How one engine hashes blocks; all three values must be read from that engine."""

    block_size: int
    algo: str
    none_hash_seed: str
    # Derived once: the hash function and the first block's parent hash.
    _hash: Callable[[Any], bytes] = field(init=False, repr=False, compare=False)
    _none_hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be an integer, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        _check_algo(self.algo)
        if not isinstance(self.none_hash_seed, str):
            raise ValueError(
                f"none_hash_seed must be a string (vLLM hashes the seed string), "
                f"got {type(self.none_hash_seed).__name__}"
            )
        hash_fn = _hash_function(self.algo)
        object.__setattr__(self, "_hash", hash_fn)
        object.__setattr__(self, "_none_hash", hash_fn(self.none_hash_seed))

    @property
    def none_hash(self) -> bytes:
        """vLLM's NONE_HASH for these settings: the parent hash of every first block."""
        return self._none_hash


def block_hashes(
    token_ids: Sequence[int], settings: HashSettings, *, cache_salt: str | None = None
) -> list[bytes]:
    """The engine's hash of every full block of ``token_ids``, in order.

    ``token_ids`` are the ids the engine sees (chat template applied, BOS included). A
    partial last block gets no hash, so a prompt shorter than one block gives ``[]``.
    ``cache_salt`` is the request's ``cache_salt`` field. No LoRA, multimodal or
    prompt-embeds keys: such requests hash differently in the engine.
    """
    tokens = _checked_tokens(token_ids)
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise TypeError(f"cache_salt must be a string or None, got {type(cache_salt).__name__}")
    size = settings.block_size
    hash_fn = settings._hash
    parent = settings._none_hash
    # vLLM adds the salt to the first block only, and ignores an empty salt.
    extra: tuple[tuple[str, str], ...] | None = (
        (("cache_salt", cache_salt),) if cache_salt else None
    )
    hashes: list[bytes] = []
    for start in range(0, len(tokens) - size + 1, size):
        parent = hash_fn((parent, tuple(tokens[start : start + size]), extra))
        hashes.append(parent)
        extra = None
    return hashes


def block_keys(
    token_ids: Sequence[int], settings: HashSettings, *, cache_salt: str | None = None
) -> list[BlockKey]:
    """:func:`block_hashes` as the 64-bit keys KV events carry (what the index stores)."""
    return [
        int.from_bytes(digest[-8:], "big")
        for digest in block_hashes(token_ids, settings, cache_salt=cache_salt)
    ]


def to_block_key(block_hash: bytes | int) -> BlockKey:
    """The key of a hash as a KV event carries it (bytes or int) or as this module computes it.

    The same reduction vLLM's ``maybe_convert_block_hash`` applies before publishing, so
    an event's int passes through unchanged and its bytes form maps to that same int.
    """
    if isinstance(block_hash, bytes):
        return int.from_bytes(block_hash, "big") & _KEY_MASK
    if isinstance(block_hash, bool) or not isinstance(block_hash, int):
        raise TypeError(f"block hash must be bytes or int, got {type(block_hash).__name__}")
    if block_hash < 0:
        raise ValueError(f"block hash must be non-negative, got {block_hash}")
    return block_hash & _KEY_MASK


# -- hash functions -------------------------------------------------------------------------


def _check_algo(algo: str) -> None:
    if algo not in SUPPORTED_ALGOS:
        raise ValueError(
            f"unsupported prefix_caching_hash_algo {algo!r}; vLLM 0.32 offers "
            f"{', '.join(sorted(SUPPORTED_ALGOS))}"
        )


def _hash_function(algo: str) -> Callable[[Any], bytes]:
    serialize = _cbor if algo.endswith("_cbor") else _pickle
    if algo.startswith("sha256"):

        def sha256(obj: Any) -> bytes:
            return hashlib.sha256(serialize(obj)).digest()

        return sha256
    digest = _xxh3_128_digest(algo)

    def xxhash(obj: Any) -> bytes:
        return digest(serialize(obj))

    return xxhash


def _xxh3_128_digest(algo: str) -> Callable[[bytes], bytes]:
    # Imported only when asked for: vLLM treats xxhash as an optional dependency too.
    try:
        module = importlib.import_module("xxhash")
    except ImportError as exc:
        raise ValueError(f"prefix_caching_hash_algo {algo!r} needs the xxhash package") from exc
    digest = getattr(module, "xxh3_128_digest", None)
    if digest is None:
        raise ValueError(f"prefix_caching_hash_algo {algo!r} needs xxhash with xxh3_128_digest")
    return digest


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _checked_tokens(token_ids: Sequence[int]) -> Sequence[int]:
    # pickle and CBOR encode an int subclass (bool, numpy ints) differently from int, and
    # the engine only ever hashes plain ints: anything else would silently never match.
    for index, token in enumerate(token_ids):
        if type(token) is not int:
            raise TypeError(
                f"token_ids[{index}] is {type(token).__name__} {token!r}; token ids must be int"
            )
    return token_ids


# -- canonical CBOR ---------------------------------------------------------------------------
# cbor2.dumps(obj, canonical=True) for the only shapes vLLM hashes here: tuples, bytes,
# str, None and ints in the 64-bit range (RFC 8949 section 4.2.1 preferred encodings).


def _cbor(obj: Any) -> bytes:
    out = bytearray()
    _cbor_into(out, obj)
    return bytes(out)


def _cbor_head(out: bytearray, major: int, value: int) -> None:
    major <<= 5
    if value < 24:
        out.append(major | value)
    elif value < 0x100:
        out.append(major | 24)
        out.append(value)
    elif value < 0x10000:
        out.append(major | 25)
        out += value.to_bytes(2, "big")
    elif value < 0x100000000:
        out.append(major | 26)
        out += value.to_bytes(4, "big")
    else:
        out.append(major | 27)
        out += value.to_bytes(8, "big")


def _cbor_into(out: bytearray, obj: Any) -> None:
    if obj is None:
        out.append(0xF6)
    elif type(obj) is int:
        if obj >= 0:
            if obj > _KEY_MASK:
                raise ValueError(f"CBOR encoding of {obj} (over 64 bits) is not implemented")
            _cbor_head(out, 0, obj)
        else:
            if -1 - obj > _KEY_MASK:
                raise ValueError(f"CBOR encoding of {obj} (over 64 bits) is not implemented")
            _cbor_head(out, 1, -1 - obj)
    elif isinstance(obj, bytes):
        _cbor_head(out, 2, len(obj))
        out += obj
    elif isinstance(obj, str):
        encoded = obj.encode("utf-8")
        _cbor_head(out, 3, len(encoded))
        out += encoded
    elif isinstance(obj, tuple | list):
        _cbor_head(out, 4, len(obj))
        for item in obj:
            _cbor_into(out, item)
    else:
        raise TypeError(f"CBOR encoding of {type(obj).__name__} is not implemented")
