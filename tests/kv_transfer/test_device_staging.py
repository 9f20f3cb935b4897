"""The staged (accelerator) KV path of ``KVCacheAccess``: double-buffered sends, ordered commits.

The CPU tests drive the staged code with ``force_staging=True`` on CPU tensors laid out like
vLLM's caches (one flat buffer, per-layer views, strided and K/V-first variants). The CUDA
tests, skipped without a GPU, use caches laid out like vLLM's GPU cache, two processes on one
GPU (``benchmarks.gpu_staging_check``, which runs the same check as a script) and a compute
kernel on another stream while the blocks are copied.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from kv_helpers import SECRET, vllm_like_cpu_cache

from benchmarks.gpu_staging_check import (
    CacheSpec,
    ComputeLoad,
    make_cache,
    read_blocks_on_new_stream,
    run_ordering_check,
)
from kv_transfer import wire
from kv_transfer.block_client import BlockClient, ClientSettings
from kv_transfer.block_server import BlockServer, ServerSettings
from kv_transfer.device import KVCacheAccess, stream_api
from kv_transfer.leases import LeaseTable

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_BLOCKS = 40
REMOTE = [3, 4, 5, 17, 30, 0, 39]  # runs and singles, not sorted
LOCAL = [9, 1, 2, 38, 20, 21, 11]


# -- vLLM-like CPU layouts --------------------------------------------------------------------


def _random_flat(nbytes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 127, (nbytes,), generator=gen, dtype=torch.int8)


def cross_layer_cache(
    num_layers: int = 3, num_blocks: int = NUM_BLOCKS, fill: bool = True, seed: int = 0
) -> list[torch.Tensor]:
    """Block-major shared buffer ``[num_blocks, layers, heads, block_size, 2*head]``: each
    layer's view has contiguous blocks but a block stride of ``layers`` blocks."""
    shape = (num_blocks, num_layers, 2, 16, 64)
    nbytes = int(torch.Size(shape).numel()) * 2
    flat = _random_flat(nbytes, seed) if fill else torch.zeros(nbytes, dtype=torch.int8)
    whole = flat.view(torch.bfloat16).view(shape)
    layers = [whole[:, i] for i in range(num_layers)]
    assert layers[0].stride(0) == num_layers * layers[0][0].numel()
    return layers


def kv_first_cache(
    num_layers: int = 3, num_blocks: int = NUM_BLOCKS, fill: bool = True, seed: int = 0
) -> list[torch.Tensor]:
    """Per layer ``[2, num_blocks, block_size, heads, head]`` (K/V first, block dim 1)."""
    shape = (2, num_blocks, 16, 2, 32)
    per_layer = int(torch.Size(shape).numel())
    nbytes = num_layers * per_layer * 2
    flat = _random_flat(nbytes, seed) if fill else torch.zeros(nbytes, dtype=torch.int8)
    typed = flat.view(torch.bfloat16)
    return [typed[i * per_layer : (i + 1) * per_layer].view(shape) for i in range(num_layers)]


def build(layout: str, fill: bool, seed: int = 0) -> tuple[list[torch.Tensor], int]:
    """(layers, block_dim) for ``layout``."""
    if layout == "contiguous":
        return vllm_like_cpu_cache(num_blocks=NUM_BLOCKS, fill="random" if fill else "zeros"), 0
    if layout == "cross_layer":
        return cross_layer_cache(fill=fill, seed=seed), 0
    if layout == "kv_first":
        return kv_first_cache(fill=fill, seed=seed), 1
    raise AssertionError(layout)


LAYOUTS = ["contiguous", "cross_layer", "kv_first"]


def block_bytes(layer: torch.Tensor, block_dim: int, block_id: int) -> bytes:
    block = layer.movedim(block_dim, 0)[block_id].contiguous()
    return bytes(block.view(torch.uint8).reshape(-1).numpy())


def expected_layer_bytes(layers: list[torch.Tensor], block_dim: int, ids: list[int]) -> list[bytes]:
    return [b"".join(block_bytes(layer, block_dim, b) for b in ids) for layer in layers]


def assert_blocks_copied(
    src: list[torch.Tensor], dst: list[torch.Tensor], block_dim: int, remote: list[int]
) -> None:
    for i, (s, d) in enumerate(zip(src, dst, strict=True)):
        for a, b in zip(remote, LOCAL, strict=True):
            assert block_bytes(s, block_dim, a) == block_bytes(d, block_dim, b), (i, a, b)
    untouched = [b for b in range(NUM_BLOCKS) if b not in LOCAL]
    for layer in dst:
        assert int(layer.movedim(block_dim, 0)[untouched].count_nonzero()) == 0


# -- CPU: the staged code path ----------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_double_buffered_send_to_commit_is_byte_identical(layout: str) -> None:
    src, block_dim = build(layout, fill=True, seed=1)
    dst, _ = build(layout, fill=False)
    sender = KVCacheAccess(src, force_staging=True, block_dim=block_dim)
    receiver = KVCacheAccess(dst, force_staging=True, block_dim=block_dim)
    assert sender.staged and receiver.staged
    want = expected_layer_bytes(src, block_dim, REMOTE)
    batches = 0
    for layer_index, views in enumerate(sender.iter_send_buffers(REMOTE)):
        # The next layer's copy was issued before this batch was handed out: it must have
        # gone to the other staging buffer.
        data = b"".join(bytes(v) for v in views)
        assert data == want[layer_index]
        (target,) = receiver.recv_views(layer_index, LOCAL)
        target[:] = data
        receiver.commit_recv(layer_index, LOCAL)
        batches += 1
    assert batches == len(src)
    assert_blocks_copied(src, dst, block_dim, REMOTE)


@pytest.mark.parametrize("layout", ["contiguous", "cross_layer"])
def test_staged_and_direct_peers_put_the_same_bytes_on_the_wire(layout: str) -> None:
    src, _ = build(layout, fill=True, seed=2)
    direct = KVCacheAccess(src)
    staged = KVCacheAccess(src, force_staging=True)
    assert not direct.staged and staged.staged
    direct_bytes = b"".join(bytes(v) for batch in direct.iter_send_buffers(REMOTE) for v in batch)
    staged_bytes = b"".join(bytes(v) for batch in staged.iter_send_buffers(REMOTE) for v in batch)
    assert direct_bytes == staged_bytes
    assert len(direct_bytes) == direct.request_nbytes(len(REMOTE))


def test_direct_iteration_is_one_zero_copy_batch() -> None:
    src = vllm_like_cpu_cache(num_blocks=NUM_BLOCKS, seed=3)
    access = KVCacheAccess(src)
    batches = list(access.iter_send_buffers(REMOTE))
    assert len(batches) == 1
    views = batches[0]
    request_views = access.request_send_views(REMOTE)
    assert request_views is not None
    assert [bytes(v) for v in views] == [bytes(v) for v in request_views]
    # Views point into the cache itself: a later write shows through.
    src[0][REMOTE[0]].view(torch.uint8).fill_(0xAB)
    assert set(bytes(views[0])[:16]) == {0xAB}


def test_send_views_pipelines_in_order_and_recovers_from_any_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, block_dim = build("kv_first", fill=True, seed=4)
    access = KVCacheAccess(src, force_staging=True, block_dim=block_dim)
    starts: list[int] = []
    start_send = access._start_send

    def counting_start(state: Any, block_ids: Sequence[int], first_layer: int) -> Any:
        starts.append(first_layer)
        return start_send(state, block_ids, first_layer)

    monkeypatch.setattr(access, "_start_send", counting_start)
    want = expected_layer_bytes(src, block_dim, REMOTE)
    # The block server's pattern: layers 0, 1, 2 of one request, each sent before the next.
    got = [b"".join(bytes(v) for v in access.send_views(i, REMOTE)) for i in range(len(src))]
    assert got == want
    assert starts == [0], "in-order calls must run as one pipeline"
    # Any other order still returns the right bytes (a fresh pipeline per break).
    starts.clear()
    for i in [2, 0, 0, 1]:
        assert b"".join(bytes(v) for v in access.send_views(i, REMOTE)) == want[i]
    assert starts == [2, 0, 0]
    other = [1, 2]
    other_want = expected_layer_bytes(src, block_dim, other)
    assert b"".join(bytes(v) for v in access.send_views(2, other)) == other_want[2]
    assert access.send_views(0, []) == []


def test_abandoned_iteration_does_not_leak_into_the_next() -> None:
    src, block_dim = build("cross_layer", fill=True, seed=5)
    access = KVCacheAccess(src, force_staging=True, block_dim=block_dim)
    first = access.iter_send_buffers(REMOTE)
    next(first)  # a send failed after the first layer
    second_ids = [7, 8]
    want = expected_layer_bytes(src, block_dim, second_ids)
    got = [b"".join(bytes(v) for v in batch) for batch in access.iter_send_buffers(second_ids)]
    assert got == want
    assert list(first) == [], "starting a new iteration on the thread ends the old one"
    assert list(access.iter_send_buffers([])) == []


def test_cpu_blocks_must_be_contiguous_unless_staged() -> None:
    layers = kv_first_cache()
    with pytest.raises(ValueError, match="force_staging"):
        KVCacheAccess(layers, block_dim=1)
    access = KVCacheAccess(layers, block_dim=1, force_staging=True)
    assert access.block_shape == (2, 16, 2, 32)
    assert access.num_blocks == NUM_BLOCKS


def test_stream_api_falls_back_to_synchronous_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    assert stream_api(torch.device("cpu")) is None
    assert stream_api(torch.device("meta")) is None  # no torch.meta module
    assert stream_api(torch.device("cuda")) is torch.cuda
    monkeypatch.delattr(torch.cuda, "Event")
    assert stream_api(torch.device("cuda")) is None


@contextlib.contextmanager
def serving(access: KVCacheAccess, fingerprint: wire.KVFingerprint) -> Iterator[BlockServer]:
    leases = LeaseTable()
    leases.add("req", REMOTE, time.time() + 60.0)
    server = BlockServer(
        ServerSettings(host="127.0.0.1", port=0, secret=SECRET, handshake_timeout_s=2.0),
        fingerprint,
        access,
        leases,
        engine_id="staging-test",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("layout", "consumer_staged"),
    [("contiguous", True), ("cross_layer", True), ("cross_layer", False), ("kv_first", True)],
)
def test_block_server_pull_through_staged_layouts(layout: str, consumer_staged: bool) -> None:
    src, block_dim = build(layout, fill=True, seed=6)
    dst, _ = build(layout, fill=False)
    producer = KVCacheAccess(src, force_staging=True, block_dim=block_dim)
    consumer = KVCacheAccess(dst, force_staging=consumer_staged, block_dim=block_dim)
    fingerprint = wire.KVFingerprint(
        model="tiny",
        dtype=str(producer.dtype),
        block_size=16,
        layout=layout,
        num_layers=producer.num_layers,
        block_shape=producer.block_shape,
    )
    with serving(producer, fingerprint) as server:
        client = BlockClient(
            ClientSettings(secret=SECRET, connect_timeout_s=2.0, io_timeout_s=10.0), fingerprint
        )
        try:
            nbytes = client.pull(("127.0.0.1", server.port), "req", REMOTE, consumer, LOCAL)
        finally:
            client.close()
    assert nbytes == producer.request_nbytes(len(REMOTE))
    assert_blocks_copied(src, dst, block_dim, REMOTE)


@pytest.mark.timeout(300)  # a spawned process importing torch: minutes on a loaded 2-core box
def test_two_process_check_runs_on_cpu_tensors() -> None:
    """The GPU check's harness (spawned producer, BlockServer, BlockClient), on CPU tensors."""
    result = run_ordering_check(
        "cpu", force_staging=True, requests=2, blocks_per_request=4, num_layers=2
    )
    assert result["ok"], json.dumps(result, indent=2)
    assert [entry["layout"] for entry in result["layouts"]] == ["blocks_first", "kv_first"]
    assert all(entry["staged"] for entry in result["layouts"])


# -- CUDA -------------------------------------------------------------------------------------


@needs_cuda
def test_gpu_two_process_pull_is_ordered_and_byte_identical() -> None:
    """Producer process serves a vLLM-like GPU cache; every pull here is read at once by a
    kernel on another stream while a matmul loop runs on a third."""
    result = run_ordering_check("cuda", requests=3)
    assert result["ok"], json.dumps(result, indent=2)
    for entry in result["layouts"]:
        assert entry["staged"]
        assert entry["matmuls_during_pulls"] > 0, "the compute load did not run"


@needs_cuda
@pytest.mark.parametrize("layout", ["blocks_first", "kv_first"])
def test_gpu_iterator_to_commit_under_compute_load(layout: str) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    spec = CacheSpec(layout, num_layers=4, num_blocks=NUM_BLOCKS, seed=21)
    src = make_cache(spec, device, fill=True)
    dst = make_cache(spec, device, fill=False)
    sender = KVCacheAccess(src, block_dim=spec.block_dim)
    receiver = KVCacheAccess(dst, block_dim=spec.block_dim)
    assert sender.staged and receiver.staged
    torch.cuda.synchronize(device)
    with ComputeLoad(device) as load:
        for layer_index, views in enumerate(sender.iter_send_buffers(REMOTE)):
            (target,) = receiver.recv_views(layer_index, LOCAL)
            target[:] = b"".join(bytes(v) for v in views)
            receiver.commit_recv(layer_index, LOCAL)
        got = read_blocks_on_new_stream(dst, spec.block_dim, torch.as_tensor(LOCAL, device=device))
    assert load.matmuls > 0
    remote = torch.as_tensor(REMOTE, device=device)
    for g, layer in zip(got, src, strict=True):
        want = layer.movedim(spec.block_dim, 0).index_select(0, remote).view(torch.uint8)
        assert torch.equal(g, want)


@needs_cuda
def test_gpu_copies_wait_for_work_queued_on_the_engine_stream() -> None:
    """Work queued on the engine's stream (current when the cache was registered) that
    touches the blocks lands before the gather (producer) and before the scatter (consumer)."""
    device = torch.device("cuda", torch.cuda.current_device())
    spec = CacheSpec("blocks_first", num_layers=2, num_blocks=NUM_BLOCKS, seed=22)
    engine = torch.cuda.Stream(device)
    src = make_cache(spec, device, fill=True)
    dst = make_cache(spec, device, fill=False)
    with torch.cuda.stream(engine):
        sender = KVCacheAccess(src)
        receiver = KVCacheAccess(dst)
    torch.cuda.synchronize(device)
    ids = torch.as_tensor(REMOTE, device=device)
    local = torch.as_tensor(LOCAL, device=device)

    # Producer: the engine is still "writing" the blocks (a delayed fill) when a read starts.
    with torch.cuda.stream(engine):
        torch.cuda._sleep(200_000_000)
        for layer in src:
            layer.index_fill_(0, ids, 1.5)
    sent = [b"".join(bytes(v) for v in views) for views in sender.iter_send_buffers(REMOTE)]
    torch.cuda.synchronize(device)
    want = [bytes(layer.index_select(0, ids).view(torch.uint8).cpu().numpy()) for layer in src]
    assert sent == want

    # Consumer: a delayed engine write to the newly allocated blocks must not land after ours.
    with torch.cuda.stream(engine):
        torch.cuda._sleep(200_000_000)
        for layer in dst:
            layer.index_fill_(0, local, -3.0)
    for layer_index, data in enumerate(sent):
        (target,) = receiver.recv_views(layer_index, LOCAL)
        target[:] = data
        receiver.commit_recv(layer_index, LOCAL)
    got = read_blocks_on_new_stream(dst, 0, local)
    assert [bytes(g.cpu().numpy()) for g in got] == want
