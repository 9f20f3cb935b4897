"""Fuzz the KV wire protocol against a real block server (issue 10).

Thousands of hostile sessions, generated from a fixed seed, run concurrently against one
BlockServer that holds a lease on blocks of known contents: garbage, huge and truncated
frames, well-formed frames of the wrong shape, wrong ops before the handshake, wrong and
replayed MACs, wrong fingerprints and, after a valid handshake, reads of blocks nobody may
read, renewals and releases of unknown leases, wrong types, abrupt closes; a few slow senders.
Every one is refused (an error frame or the server hanging up) and none sees a byte of KV
payload, while a real BlockClient keeps pulling the held blocks, byte-exact, on another
thread. The server logs no traceback and gives back every socket and thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import string
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import torch
from kv_helpers import (
    ENGINE_ID,
    SECRET,
    blocks_equal,
    client_hello,
    far_future,
    hold_token,
    running_server,
    vllm_like_cpu_cache,
    wait_until,
)

from kv_transfer import wire
from kv_transfer.device import KVCacheAccess

SEED = 1010
NUM_SESSIONS = 3000
CONCURRENCY = 24
SLOW_SENDERS = 3
# A server that neither answers nor hangs up within this is hung.
REPLY_TIMEOUT_S = 3.0

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE = 2, 16, 16
HELD = "req-held"
HELD_BLOCKS = [2, 3, 5, 8, 13]
UNHELD_BLOCKS = [b for b in range(NUM_BLOCKS) if b not in HELD_BLOCKS]
# How long the server waits for a hold a read's token proves was issued.
PENDING_HOLD_WAIT_S = 0.3

Reply = dict[str, Any]


class Closed(Exception):
    """The server hung up (EOF or reset)."""


class Peer:
    """A raw client connection that keeps every byte the server sends it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=REPLY_TIMEOUT_S)
        self.received = bytearray()
        self.frames: list[Reply] = []
        self.challenged = False
        self._parsed = 0

    def send(self, data: bytes) -> bool:
        """False when the server has already hung up."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _more(self) -> None:
        # A TimeoutError goes to the caller: the server neither answered nor hung up.
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed
        self.received += chunk

    def frame(self) -> Reply | None:
        """The server's next control frame; None once it has hung up."""
        try:
            while len(self.received) - self._parsed < 4:
                self._more()
            (length,) = struct.unpack_from(">I", self.received, self._parsed)
            assert length <= 64 * 1024, f"the server announced a {length}-byte frame"
            while len(self.received) - self._parsed < 4 + length:
                self._more()
        except Closed:
            return None
        body = bytes(self.received[self._parsed + 4 : self._parsed + 4 + length])
        self._parsed += 4 + length
        message = msgpack.unpackb(body, raw=False)
        assert isinstance(message, dict) and isinstance(message.get("op"), str), message
        self.frames.append(message)
        return message

    def challenge(self) -> bytes:
        challenge = self.frame()
        assert challenge is not None and challenge["op"] == "challenge", challenge
        nonce = challenge["nonce"]
        assert isinstance(nonce, bytes)
        self.challenged = True
        return nonce

    def shutdown(self) -> None:
        """Send EOF: whatever the server still waits for never comes."""
        with contextlib.suppress(OSError):  # it may have hung up already
            self.sock.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        """Close with a reset, as a crashed peer does, mid-frame or not."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Target:
    """What the hostile sessions know about the server."""

    address: tuple[str, int]
    fingerprint: wire.KVFingerprint
    handshake_timeout_s: float
    recorded_hello: bytes  # the hello frame of a real, earlier session
    recorded_stream: bytes  # everything that session's client sent
    recorded_nonce: bytes  # that session's server nonce
    payload_probes: list[bytes] = field(default_factory=list)


# -- random values ------------------------------------------------------------------------------


def frame(message: Any) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def random_text(rng: random.Random, max_len: int = 40) -> str:
    alphabet = string.printable + "éß中\x00\u202e\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(max_len + 1)))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(13 if depth < 3 else 10)
    if kind == 0:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 1:
        return rng.randint(-3, NUM_BLOCKS + 3)
    if kind == 2:
        return rng.choice([0.5, -1e308, float("inf"), float("-inf"), float("nan"), 1e-300])
    if kind == 3:
        return random_text(rng)
    if kind == 4:
        return rng.randbytes(rng.randrange(64))
    if kind == 5:
        return rng.choice([None, True, False])
    if kind == 6:
        return msgpack.ExtType(rng.randint(0, 127), rng.randbytes(rng.randrange(16)))
    if kind == 7:
        return rng.choice([HELD, ENGINE_ID, "read", "hello", "data"])
    if kind in (8, 9):
        return rng.choice([HELD_BLOCKS, UNHELD_BLOCKS, [], [-1], [2**64 - 1]])
    if kind == 10:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if kind == 11:
        return {random_text(rng, 8): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    # A map with keys msgpack refuses (ints, nil) or that hash oddly.
    keys = [rng.randint(-5, 5), None, b"op", 1.5]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(1, 4))}


def unknown_request_id(rng: random.Random) -> str:
    request_id = rng.choice(
        [
            random_text(rng),
            HELD + random_text(rng, 3),
            HELD.upper(),
            " " + HELD,
            HELD + "\x00",
            "",
            "r" * rng.randrange(1, 3000),
            f"req-{rng.randrange(10**9)}",
        ]
    )
    return request_id if request_id != HELD else request_id + "x"


def wrong_hold_token(rng: random.Random, request_id: str) -> Any:
    return rng.choice(
        [
            "",
            hold_token(HELD),  # the real request's token, for another request
            hold_token(request_id, secret=b"other-secret"),
            hold_token(request_id, engine_id="other-engine"),
            "0" * 64,
            hold_token(request_id).upper(),
            random_text(rng, 70),
            rng.randbytes(32),
            rng.randint(0, 2**64 - 1),
            None,
            [hold_token(request_id)],
        ]
    )


def served_if_sent(message: Any, mode: str) -> bool:
    """Whether an honest server would (rightly) serve or release the held request for this
    frame: the fuzz must never send one, or a served byte would prove nothing."""
    if not isinstance(message, dict):
        return False
    if message.get("op") == "release" and message.get("req") == HELD:
        return True
    reqs = message.get("reqs")
    if message.get("op") == "renew" and isinstance(reqs, list) and HELD in reqs:
        return True
    blocks = message.get("blocks")
    return (
        mode == wire.MODE_DATA
        and message.get("op") == "read"
        and message.get("req") == HELD
        and isinstance(blocks, list)
        and all(type(b) is int and b in HELD_BLOCKS for b in blocks)
    )


def hello_bytes(target: Target, nonce: bytes, mode: str = wire.MODE_DATA) -> bytes:
    fingerprint = target.fingerprint if mode == wire.MODE_DATA else None
    return frame(client_hello(nonce, fingerprint))


# -- checks -------------------------------------------------------------------------------------


def refused(peer: Peer, code: str | None = None) -> None:
    """The server hangs up, with at most one error frame first (``code`` if given)."""
    if not peer.challenged:
        challenge = peer.frame()
        if challenge is None and code is None:
            return  # a reset (we sent more than it read) can take the unread challenge with it
        assert challenge is not None and challenge["op"] == "challenge", challenge
        peer.challenged = True
    refusal(peer, peer.frame(), code)


def refusal(peer: Peer, reply: Reply | None, code: str | None = None) -> None:
    """``reply`` (None: the server hung up) is an error frame, then the server hangs up."""
    if code is not None:
        assert reply is not None and reply.get("code") == code, reply
    if reply is not None:
        assert reply["op"] == "error", reply
        assert peer.frame() is None, "the server kept the connection after refusing it"


# A post-auth request the server may answer without refusing: renewing or releasing a lease
# it does not know changes nothing the fuzz could exploit.
Harmless = Callable[[Reply], bool] | None


def exchange(peer: Peer, data: bytes, harmless: Harmless = None) -> bool:
    """Send one post-auth request; True while the connection stays open."""
    if not peer.send(data):
        return False
    reply = peer.frame()
    if reply is None:
        return False
    assert reply["op"] == "error" or (harmless is not None and harmless(reply)), reply
    return True


# -- hostile sessions before authentication ---------------------------------------------------


def garbage(rng: random.Random, peer: Peer, target: Target) -> None:
    if rng.random() < 0.7:
        peer.challenge()
    for _ in range(rng.randrange(1, 4)):
        if not peer.send(rng.randbytes(rng.randrange(1, 3000))):
            break
    if rng.random() < 0.2:
        peer.abort()
        return
    # Anything a garbage length prefix still waits for never comes.
    peer.shutdown()
    refused(peer)


def huge_header(rng: random.Random, peer: Peer, target: Target) -> None:
    peer.challenge()
    length = rng.choice(
        [wire.MAX_HANDSHAKE_FRAME_BYTES + 1, wire.MAX_FRAME_BYTES, 2**32 - 1]
        + [rng.randint(wire.MAX_HANDSHAKE_FRAME_BYTES + 1, 2**32 - 1)] * 3
    )
    started = time.monotonic()
    peer.send(struct.pack(">I", length) + rng.randbytes(rng.randrange(64)))
    # Refused unread: the server hangs up without waiting for the body (nor a timeout).
    refused(peer)
    assert time.monotonic() - started < target.handshake_timeout_s, "waited for the body"


def truncated(rng: random.Random, peer: Peer, target: Target) -> None:
    nonce = peer.challenge()
    data = rng.choice([hello_bytes(target, nonce), frame(random_value(rng))])
    peer.send(data[: rng.randrange(len(data))])
    if rng.random() < 0.3:
        peer.abort()
        return
    peer.shutdown()
    refused(peer)


def wrong_shape(rng: random.Random, peer: Peer, target: Target) -> None:
    nonce = peer.challenge()
    hello = client_hello(nonce, target.fingerprint)
    choice = rng.randrange(5)
    if choice == 0:
        message: Any = random_value(rng)
    elif choice == 1:
        message = {**hello, "op": random_value(rng)}
    elif choice == 2:
        message = {k: v for k, v in hello.items() if k == "op" or rng.random() < 0.5}
    else:
        message = dict(hello)
        for key in rng.sample(["v", "nonce", "mac", "mode", "fingerprint"], rng.randrange(1, 3)):
            message[key] = random_value(rng)
    if isinstance(message, dict):  # still a valid hello: not what this session is about
        if message == hello:
            message["v"] = 2
        if message.get("mode") in (wire.MODE_DATA, wire.MODE_CONTROL):
            message["mode"] = "admin"
    data = frame(message)
    if rng.random() < 0.3:
        data = data[:4] + rng.choice([b"\xc1", b"\x91", b"\xdc\xff\xff"]) + data[5:]
    elif rng.random() < 0.3:
        body = rng.choice(MSGPACK_ODDITIES)
        data = struct.pack(">I", len(body)) + body
    peer.send(data)
    refused(peer)


# Bodies a msgpack encoder would not write: bombs announcing more than they hold, nesting
# deeper than the decoder allows, timestamps (ext -1) of impossible sizes, invalid UTF-8.
MSGPACK_ODDITIES = [
    b"\xdd\xff\xff\xff\xff",  # an array of 2**32-1 items
    b"\xdf\xff\xff\xff\xff\xa2op",  # a map of 2**32-1 pairs
    b"\xdb\xff\xff\xff\xff",  # a str of 4 GiB
    b"\xc6\x7f\xff\xff\xff",  # a bin of 2 GiB
    b"\x91" * 3000 + b"\xc0",  # nested 3000 deep
    b"\x81\xa2op" + b"\x81\xa1k" * 1300 + b"\xc0",  # maps nested deep under "op"
    b"\xd6\xff\xff\xff\xff\xff",  # timestamp32
    b"\xd7\xff" + b"\xff" * 8,  # timestamp64 with nanoseconds > 1e9
    b"\xc7\x03\xff\x00\x00\x00",  # timestamp of 3 bytes
    b"\xc7\x0c\xff" + b"\xff" * 12,  # timestamp96 far out of range
    b"\x81\xa2op\xa2\xff\xfe",  # op: invalid UTF-8
    b"\x81\xc4\x02op\xa5hello",  # op as a bin key
    b"\x82\xa2op\xa5hello\xa2op\xa4read",  # the key twice
    b"\x81\x91\x01\xa5hello",  # an array as a key
    b"\x81\xa2op\xa5hello\xc0",  # extra data after the map
    b"\x81\xa2op",  # the map cut short
    b"",
]


def wrong_op_first(rng: random.Random, peer: Peer, target: Target) -> None:
    peer.challenge()
    op = rng.choice(["read", "renew", "release", "bye", "welcome", "challenge", "data", "error"])
    message: dict[str, Any] = {"op": op}
    if op == "read" or rng.random() < 0.3:
        message.update(req=HELD, blocks=HELD_BLOCKS, hold=hold_token(HELD), release=False)
    if op == "renew":
        message.update(reqs=[HELD], extend_s=5.0)
    peer.send(frame(message))
    refused(peer, wire.ERR_MALFORMED)


def wrong_mac(rng: random.Random, peer: Peer, target: Target) -> None:
    nonce = peer.challenge()
    hello = client_hello(nonce, target.fingerprint)
    ours = hello["nonce"]
    hello["mac"] = rng.choice(
        [
            rng.randbytes(32),
            wire.client_mac(b"wrong-secret", nonce, ours),
            wire.server_mac(SECRET, nonce, ours),  # the server's proof, reflected
            wire.client_mac(SECRET, ours, nonce),  # nonces swapped
            wire.client_mac(SECRET, target.recorded_nonce, ours),  # an earlier challenge
            hello["mac"][:16],
            hello["mac"] + b"\0",
            hello["mac"].hex(),
            None,
            b"",
        ]
    )
    peer.send(frame(hello))
    refused(peer, wire.ERR_AUTH)


def replayed(rng: random.Random, peer: Peer, target: Target) -> None:
    """A real session's hello, sent again: its MAC covers the old server nonce."""
    if rng.random() < 0.5:
        peer.challenge()
    if rng.random() < 0.6:
        peer.send(target.recorded_hello)
        refused(peer, wire.ERR_AUTH)
    else:
        # The whole recorded conversation: the server hangs up at the hello.
        peer.send(target.recorded_stream)
        refused(peer)


def wrong_fingerprint(rng: random.Random, peer: Peer, target: Target) -> None:
    """A peer with the secret but another KV layout (or none it can state)."""
    nonce = peer.challenge()
    hello = client_hello(nonce, target.fingerprint)
    theirs = dict(hello["fingerprint"])
    if rng.random() < 0.5:
        key = rng.choice(list(theirs))
        changed = {
            "model": "other-model",
            "dtype": "torch.float32",
            "block_size": BLOCK_SIZE * 2,
            "layout": "NHD",
            "num_layers": NUM_LAYERS + 1,
            "block_shape": [*theirs["block_shape"][:-1], 1],
            "tp_size": 2,
            "tp_rank": 1,
        }
        theirs[key] = changed[key]
        hello["fingerprint"] = theirs
        peer.send(frame(hello))
        refused(peer, wire.ERR_HANDSHAKE)
        return
    choice = rng.randrange(4)
    if choice == 0:
        hello["fingerprint"] = random_value(rng)
    elif choice == 1:
        del theirs[rng.choice(["model", "dtype", "block_size", "layout", "num_layers"])]
        hello["fingerprint"] = theirs
    else:
        key = rng.choice(list(theirs))
        theirs[key] = rng.choice(
            [float("inf"), float("nan"), -(2**63), 2**64 - 1, "x", None, [], {}, b"\xff", [[1]]]
        )
        hello["fingerprint"] = theirs
    if rng.random() < 0.3:
        hello["mode"] = wire.MODE_DATA
    peer.send(frame(hello))
    reply = peer.frame()
    if reply is not None and reply["op"] == "welcome":
        # The only way in: a value that still means the server's own layout (tp_size=True).
        assert wire.KVFingerprint.from_wire(hello["fingerprint"]) == target.fingerprint, hello
        return
    refusal(peer, reply)


# -- hostile requests after a valid handshake --------------------------------------------------


def read_frame(rng: random.Random, request_id: Any, blocks: Any, **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"op": "read", "req": request_id, "blocks": blocks}
    if rng.random() < 0.7:
        message["release"] = rng.choice([True, False, 1, "yes", None])
    if rng.random() < 0.7:
        message["hold"] = hold_token(HELD)
    message.update(extra)
    return message


def some_held(rng: random.Random) -> list[int]:
    return rng.sample(HELD_BLOCKS, rng.randrange(len(HELD_BLOCKS) + 1))


def with_one(rng: random.Random, ids: list[int], bad: Any) -> list[Any]:
    """``ids`` with ``bad`` somewhere among them."""
    mixed: list[Any] = [*ids]
    mixed.insert(rng.randrange(len(mixed) + 1), bad)
    return mixed


def req_out_of_range(rng: random.Random) -> tuple[Any, Harmless]:
    bad = rng.choice([NUM_BLOCKS, NUM_BLOCKS + rng.randrange(10**6), 2**31, 2**63, 2**64 - 1])
    return read_frame(rng, HELD, with_one(rng, some_held(rng), bad)), None


def req_negative(rng: random.Random) -> tuple[Any, Harmless]:
    bad = rng.choice([-1, -NUM_BLOCKS, -NUM_BLOCKS + HELD_BLOCKS[0], -(2**31), -(2**63)])
    return read_frame(rng, HELD, with_one(rng, some_held(rng), bad)), None


def req_unheld(rng: random.Random) -> tuple[Any, Harmless]:
    """Blocks in range that no lease holds, alone or among the held ones."""
    bad = rng.sample(UNHELD_BLOCKS, rng.randrange(1, 4))
    return read_frame(rng, HELD, some_held(rng) + bad), None


def req_huge_list(rng: random.Random) -> tuple[Any, Harmless]:
    n = rng.randrange(20_000, 300_000)
    ids = HELD_BLOCKS * (n // len(HELD_BLOCKS))
    bad = rng.choice([*UNHELD_BLOCKS, NUM_BLOCKS, -1, 2**63])
    ids[rng.randrange(len(ids))] = bad
    return read_frame(rng, HELD, ids), None


def req_other_request(rng: random.Random) -> tuple[Any, Harmless]:
    request_id = unknown_request_id(rng)
    hold = wrong_hold_token(rng, request_id)
    blocks = rng.choice([HELD_BLOCKS, some_held(rng), [], [0]])
    return read_frame(rng, request_id, blocks, hold=hold), None


def req_issued_hold_of_unknown(rng: random.Random) -> tuple[Any, Harmless]:
    """A real token for a hold that never arrives: refused after the bounded wait."""
    request_id = f"never-held-{rng.randrange(10**6)}"
    return read_frame(rng, request_id, HELD_BLOCKS, hold=hold_token(request_id)), None


def req_renew_unknown(rng: random.Random) -> tuple[Any, Harmless]:
    reqs = [unknown_request_id(rng) for _ in range(rng.randrange(1, 30))]
    extend_s = rng.choice([0.001, 1, 5.0, 3600])

    def harmless(reply: Reply) -> bool:
        return reply["op"] == "renewed" and reply["states"] == ["pending"] * len(reqs)

    return {"op": "renew", "reqs": reqs, "extend_s": extend_s}, harmless


def req_renew_malformed(rng: random.Random) -> tuple[Any, Harmless]:
    message: dict[str, Any] = {"op": "renew", "reqs": ["a"], "extend_s": 5.0}
    choice = rng.randrange(4)
    if choice == 0:
        message["reqs"] = [f"r{i}" for i in range(wire.MAX_RENEWALS_PER_FRAME + 1)]
    elif choice == 1:
        message["extend_s"] = rng.choice(
            [0, -1.0, 3601.0, float("inf"), float("nan"), True, "5", None, 2**64 - 1, [5]]
        )
    elif choice == 2:
        message["reqs"] = rng.choice(["a", None, 7, {"a": 1}, ["a", 7], [None], [b"a"]])
    else:
        del message[rng.choice(["reqs", "extend_s"])]
    return message, None


def req_release(rng: random.Random) -> tuple[Any, Harmless]:
    if rng.random() < 0.5:

        def harmless(reply: Reply) -> bool:
            return reply["op"] == "released" and reply["known"] is False

        return {"op": "release", "req": unknown_request_id(rng)}, harmless
    return {"op": "release", "req": rng.choice([None, 7, b"req-held", [HELD], {HELD: 1}])}, None


def req_wrong_types(rng: random.Random) -> tuple[Any, Harmless]:
    choice = rng.randrange(5)
    if choice == 0:
        return read_frame(rng, rng.choice([7, None, b"req-held", [HELD], {}, 1.5]), [2]), None
    if choice == 1:
        return read_frame(rng, HELD, rng.choice(["2", 2, None, {2: 2}, b"\x02", 2.0])), None
    if choice == 2:
        odd = rng.choice([2.0, True, False, "2", None, [2], b"\x02", float("nan")])
        return read_frame(rng, HELD, with_one(rng, some_held(rng), odd)), None
    if choice == 3:
        return {"op": "read", **rng.choice([{"req": HELD}, {"blocks": HELD_BLOCKS}, {}])}, None
    return {"op": "read", "req": HELD, "blocks": UNHELD_BLOCKS[:1], "hold": 5, 7: 8}, None


def req_unknown_op(rng: random.Random) -> tuple[Any, Harmless]:
    op = rng.choice(["hello", "welcome", "challenge", "data", "error", "", "READ", "read\x00"])
    message: dict[str, Any] = {"op": rng.choice([op, random_text(rng)])}
    if rng.random() < 0.5:
        message.update(req=HELD, blocks=HELD_BLOCKS, nonce=wire.new_nonce())
    if message["op"] == "read":
        message["req"] = HELD + "?"
    return message, None


def req_garbage_frame(rng: random.Random) -> tuple[Any, Harmless]:
    return rng.choice([random_value(rng), {"no_op": 1}, [1, 2], None]), None


POST_AUTH_REQUESTS: list[tuple[Callable[[random.Random], tuple[Any, Harmless]], int]] = [
    (req_out_of_range, 10),
    (req_negative, 8),
    (req_unheld, 10),
    (req_huge_list, 1),
    (req_other_request, 10),
    (req_issued_hold_of_unknown, 1),
    (req_renew_unknown, 5),
    (req_renew_malformed, 4),
    (req_release, 4),
    (req_wrong_types, 8),
    (req_unknown_op, 4),
    (req_garbage_frame, 4),
]


def authenticate(rng: random.Random, peer: Peer, target: Target, mode: str) -> None:
    nonce = peer.challenge()
    data = hello_bytes(target, nonce, mode)
    if rng.random() < 0.2:  # in small pieces: a frame may arrive in any number of segments
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(1, 8)))
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            peer.sock.sendall(data[start:end])
            time.sleep(rng.random() * 0.002)
    else:
        peer.sock.sendall(data)
    welcome = peer.frame()
    assert welcome is not None and welcome["op"] == "welcome", welcome


def authenticated(rng: random.Random, peer: Peer, target: Target) -> None:
    mode = wire.MODE_DATA if rng.random() < 0.85 else wire.MODE_CONTROL
    authenticate(rng, peer, target, mode)
    functions, weights = zip(*POST_AUTH_REQUESTS, strict=True)
    for _ in range(rng.randrange(1, 5)):
        if mode == wire.MODE_CONTROL and rng.random() < 0.5:
            # A control connection may not read at all, not even the held blocks.
            message: Any = read_frame(rng, HELD, HELD_BLOCKS)
            harmless: Harmless = None
        else:
            message, harmless = rng.choices(functions, weights)[0](rng)
            assert not served_if_sent(message, mode), message
        if not exchange(peer, frame(message), harmless):
            return
    ending = rng.randrange(4)
    if ending == 0:
        peer.send(frame({"op": "bye"}))
        refused(peer)
    elif ending == 1:
        peer.abort()
    else:  # a frame cut short, then the peer goes away (quietly or not)
        message, _ = rng.choices(functions, weights)[0](rng)
        data = frame(message)
        peer.send(data[: rng.randrange(len(data))])
        if ending == 2:
            peer.abort()
        else:
            peer.shutdown()
            refused(peer)


SESSIONS: list[tuple[Callable[[random.Random, Peer, Target], None], int]] = [
    (garbage, 12),
    (huge_header, 6),
    (truncated, 8),
    (wrong_shape, 12),
    (wrong_op_first, 6),
    (wrong_mac, 8),
    (replayed, 6),
    (wrong_fingerprint, 8),
    (authenticated, 34),
]


def slow_sender(peer: Peer, target: Target) -> None:
    """A hello one byte at a time, each well within the handshake timeout of the last: the
    handshake as a whole must still end at its timeout."""
    data = hello_bytes(target, peer.challenge())
    started = time.monotonic()
    peer.sock.settimeout(0.2)
    limit_s = target.handshake_timeout_s + 3
    for byte in data:
        waited_s = time.monotonic() - started
        assert waited_s < limit_s, f"a trickled hello still held its connection after {limit_s} s"
        if not peer.send(bytes([byte])):
            return
        try:
            if peer.sock.recv(1) == b"":
                return
        except ConnectionResetError:
            return
        except TimeoutError:
            continue
    raise AssertionError("the server took a hello sent slower than its handshake timeout")


# -- the test -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    failure: str | None = None


def run_session(target: Target, index: int) -> Outcome:
    rng = random.Random(SEED * 100_000 + index)
    function = rng.choices([s[0] for s in SESSIONS], [s[1] for s in SESSIONS])[0]
    kind = function.__name__
    peer = Peer(target.address)
    try:
        function(rng, peer, target)
    except TimeoutError:
        return Outcome(kind, f"session {index} ({kind}): the server neither answered nor hung up")
    except Exception as exc:
        return Outcome(kind, f"session {index} ({kind}): {type(exc).__name__}: {exc!s:.300}")
    finally:
        peer.close()
    return check_nothing_served(peer, target, Outcome(kind), index)


def check_nothing_served(peer: Peer, target: Target, outcome: Outcome, index: int) -> Outcome:
    ops = [f["op"] for f in peer.frames]
    if "data" in ops or any(probe in peer.received for probe in target.payload_probes):
        outcome.failure = f"session {index} ({outcome.kind}) was served KV data: {ops}"
    return outcome


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def record_real_session(target_address: tuple[str, int], fingerprint: wire.KVFingerprint) -> Any:
    """A legitimate conversation by hand (hello, read, bye): what a replay replays."""
    with socket.create_connection(target_address, timeout=REPLY_TIMEOUT_S) as sock:
        challenge = wire.recv_frame(sock)
        hello = frame(client_hello(challenge["nonce"], fingerprint))
        read = frame(read_frame(random.Random(0), HELD, HELD_BLOCKS, release=False))
        bye = frame({"op": "bye"})
        sock.sendall(hello)
        assert wire.recv_frame(sock)["op"] == "welcome"
        sock.sendall(read)
        header = wire.recv_frame(sock)
        assert header["op"] == "data"
        payload = wire.recv_exact(sock, header["nbytes"])
        sock.sendall(bye)
        assert sock.recv(1) == b""
    return hello, hello + read + bye, challenge["nonce"], bytes(payload)


@pytest.mark.timeout(90)
def test_hostile_sessions_are_refused_while_a_real_pull_keeps_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kv_transfer")
    src = vllm_like_cpu_cache(
        num_layers=NUM_LAYERS, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, head_size=16, seed=7
    )
    # 32 bytes from the start of every block of every layer: no reply may contain one.
    probes = [
        layer[b].view(torch.uint8).numpy().tobytes()[:32]
        for layer in src
        for b in range(NUM_BLOCKS)
    ]
    fds_before = open_fds()
    threads_before = threading.active_count()
    with running_server(
        src,
        block_size=BLOCK_SIZE,
        unknown_request_wait_s=0.0,
        pending_hold_wait_s=PENDING_HOLD_WAIT_S,
    ) as ends:
        server = ends.server
        ends.leases.add(HELD, HELD_BLOCKS, far_future() + 600)
        hello, stream, nonce, payload = record_real_session(ends.address, ends.fingerprint)
        assert payload.startswith(probes[HELD_BLOCKS[0]])
        target = Target(
            ends.address,
            ends.fingerprint,
            server._settings.handshake_timeout_s,
            hello,
            stream,
            nonce,
            probes,
        )
        assert wait_until(lambda: not server._connections, 5)
        fds_serving = open_fds()
        threads_serving = threading.active_count()

        # The legitimate decode side, pulling over and over while the fuzz runs.
        fuzz_done = threading.Event()
        pulls: list[float] = []
        pull_errors: list[BaseException] = []

        def pull_repeatedly() -> None:
            dst = vllm_like_cpu_cache(
                num_layers=NUM_LAYERS,
                num_blocks=NUM_BLOCKS,
                block_size=BLOCK_SIZE,
                head_size=16,
                fill="zeros",
            )
            access = KVCacheAccess(dst)
            client = ends.client()
            try:
                while not fuzz_done.is_set():
                    local = random.Random(len(pulls)).sample(range(NUM_BLOCKS), len(HELD_BLOCKS))
                    for layer in dst:
                        layer.zero_()
                    client.pull(
                        ends.address, HELD, HELD_BLOCKS, access, local,
                        release=False, hold_token=hold_token(HELD),
                    )  # fmt: skip
                    assert blocks_equal(src, HELD_BLOCKS, dst, local), f"pull {len(pulls)}"
                    pulls.append(time.monotonic())
                    if len(pulls) % 10 == 0:  # and a fresh handshake now and then
                        client.close()
                        client = ends.client()
                    time.sleep(0.01)
            except BaseException as exc:
                pull_errors.append(exc)
            finally:
                client.close()

        puller = threading.Thread(target=pull_repeatedly, name="legit-puller")
        started = time.monotonic()
        puller.start()
        slow_failures: list[str] = []

        def slow(index: int) -> None:
            peer = Peer(target.address)
            try:
                slow_sender(peer, target)
                check = check_nothing_served(peer, target, Outcome("slow_sender"), -index)
                if check.failure:
                    slow_failures.append(check.failure)
            except Exception as exc:
                slow_failures.append(f"slow sender {index}: {type(exc).__name__}: {exc}")
            finally:
                peer.close()

        slow_threads = [threading.Thread(target=slow, args=(i,)) for i in range(SLOW_SENDERS)]
        for thread in slow_threads:
            thread.start()
        with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="fuzz") as pool:
            outcomes = list(pool.map(lambda i: run_session(target, i), range(NUM_SESSIONS)))
        for thread in slow_threads:
            thread.join(timeout=30)
        fuzz_s = time.monotonic() - started
        fuzz_done.set()
        puller.join(timeout=30)
        assert not puller.is_alive()

        failures = [o.failure for o in outcomes if o.failure] + slow_failures
        kinds = Counter(o.kind for o in outcomes)
        print(f"\n{NUM_SESSIONS} hostile sessions in {fuzz_s:.1f} s: {dict(kinds)}; "
              f"{len(pulls)} real pulls meanwhile")  # fmt: skip
        assert not failures, f"{len(failures)} sessions misbehaved:\n" + "\n".join(failures[:15])
        assert set(kinds) == {s[0].__name__ for s in SESSIONS}
        # The server lives and served exactly the legitimate reads (the recorded one too).
        assert server._accept_thread is not None and server._accept_thread.is_alive()
        assert not pull_errors, pull_errors
        assert len(pulls) >= 10, f"only {len(pulls)} real pulls in {fuzz_s:.1f} s"
        assert wait_until(lambda: len(ends.transfers) == 1 + len(pulls), 5), (
            len(ends.transfers),
            len(pulls),
        )
        assert ends.leases.holds(HELD) and ends.leases.blocks_held() == len(HELD_BLOCKS)
        assert ends.refusals
        # Every connection is closed and every connection thread gone: back to baseline.
        assert wait_until(lambda: not server._connections, 10), len(server._connections)
        assert wait_until(lambda: threading.active_count() <= threads_serving, 10), [
            t.name for t in threading.enumerate()
        ]
        assert wait_until(lambda: open_fds() <= fds_serving + 2, 10), (
            f"{open_fds()} fds open after the fuzz, {fds_serving} before"
        )
    assert wait_until(lambda: open_fds() <= fds_before + 2, 10), (
        f"{open_fds()} fds open after the server stopped, {fds_before} before it started"
    )
    assert wait_until(lambda: threading.active_count() <= threads_before, 10)
    server_records = [r for r in caplog.records if r.name.startswith("kv_transfer")]
    assert server_records, "the server's log was not captured"
    unexpected = [
        r
        for r in server_records
        if r.exc_info or "Traceback" in r.getMessage() or "unexpectedly" in r.getMessage()
    ]
    assert not unexpected, "\n".join(
        f"{r.getMessage()}\n{logging.Formatter().formatException(r.exc_info)}"
        if r.exc_info
        else r.getMessage()
        for r in unexpected[:5]
    )
    assert "Traceback" not in caplog.text
