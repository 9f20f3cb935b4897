"""The one device-specific piece: turning KV cache blocks into byte buffers and back.

``KVCacheAccess`` hands the transport flat ``memoryview``s over block runs.
For CPU caches they point straight into the cache tensors, so sockets read
from and write into the cache itself. For accelerator caches (CUDA, NPU) they
point into per-thread host staging buffers (pinned when the platform supports
it) filled from / copied back to the device on a per-thread copy stream. An
RDMA, NIXL or HCCL transport would replace this class and the TCP transport
around it.

Ordering with the engine (accelerator caches):

* Producer (prefill): each read first makes the copy stream wait for the engine's stream, so
  the blocks written by the last prefill forward are complete before they are gathered. The
  device-to-host copy of layer i+1 runs on the copy stream while the transport sends layer i
  from the other of two staging buffers (double buffering); a buffer is handed out only
  after its copy's event completed.
* Consumer (decode): ``commit_recv`` copies one layer host-to-device on the copy stream and
  waits for the copy's event before it returns, so the pull thread, not the engine thread,
  blocks. See ``commit_recv`` for why that is enough for the engine to read the blocks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Generator, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Split ``block_ids`` (in order) into ``(first_id, count)`` runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for block_id in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs


def stream_api(device: torch.device) -> Any | None:
    """The torch module with ``device``'s stream API (``torch.cuda``, ``torch.npu``, ...).

    None for CPU tensors, and for a device whose module lacks streams or events: its
    copies then run synchronously.
    """
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    if module is None or not all(
        hasattr(module, name) for name in ("Stream", "Event", "stream", "current_stream")
    ):
        return None
    return module


class _Layer:
    """Byte-level geometry of one layer's cache tensor, indexed by block id on dim 0."""

    def __init__(self, tensor: torch.Tensor, *, strided_blocks_ok: bool) -> None:
        if tensor.dim() < 2:
            raise ValueError(
                f"KV cache tensor must be [num_blocks, ...], got {tuple(tensor.shape)}"
            )
        self.tensor = tensor
        self.num_blocks = int(tensor.shape[0])
        elem = tensor.element_size()
        self.block_nbytes = int(tensor[0].numel()) * elem
        self.block_stride = int(tensor.stride(0)) * elem
        block_contiguous = bool(tensor[0].is_contiguous())
        if not block_contiguous and not strided_blocks_ok:
            raise ValueError(
                "each KV block of a CPU cache must be contiguous in memory for zero-copy "
                f"access (or pass force_staging=True); got shape {tuple(tensor.shape)} "
                f"strides {tensor.stride()}"
            )
        self.host_rows: np.ndarray | None = None
        if tensor.device.type == "cpu" and block_contiguous:
            # A [num_blocks, block_nbytes] uint8 view of the cache memory itself.
            flat = tensor.view(torch.uint8).numpy()
            self.host_rows = np.lib.stride_tricks.as_strided(
                flat, shape=(self.num_blocks, self.block_nbytes), strides=(self.block_stride, 1)
            )

    @property
    def runs_are_contiguous(self) -> bool:
        return self.block_stride == self.block_nbytes


class _HostBuffer:
    """A growable host staging buffer: the tensor (pinned if possible) and its numpy view."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.array: np.ndarray | None = None

    def ensure(self, nbytes: int, pin: bool) -> torch.Tensor:
        if self.tensor is None or self.tensor.numel() < nbytes:
            size = max(nbytes, 1)
            try:
                # Pinned memory lets device<->host copies run asynchronously at full DMA speed.
                tensor = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            except RuntimeError:
                tensor = torch.empty(size, dtype=torch.uint8)
            self.tensor = tensor
            self.array = tensor.numpy()
        return self.tensor

    def view(self, nbytes: int) -> memoryview:
        assert self.array is not None
        return memoryview(cast(Any, self.array[:nbytes])).cast("B")


class _ThreadState:
    """Per-thread staging buffers, copy stream and the send pipeline in progress."""

    def __init__(self) -> None:
        self.send = (_HostBuffer(), _HostBuffer())  # double buffer: one filling, one sending
        self.recv = _HostBuffer()
        self.stream: Any = None
        # The pipelined send this thread runs: its generator, block ids and next layer.
        self.send_gen: Generator[list[memoryview], None, None] | None = None
        self.send_key: tuple[int, ...] = ()
        self.send_next = 0
        # Device copy of the block ids of the pull being committed, reused across its layers.
        self.recv_key: tuple[int, ...] | None = None
        self.recv_index: torch.Tensor | None = None

    def close_send(self) -> None:
        gen, self.send_gen = self.send_gen, None
        if gen is not None:
            gen.close()  # runs its ``finally``: waits for its copies still in flight


class KVCacheAccess:
    """Block-granular byte access to a list of per-layer KV cache tensors.

    Every layer tensor is indexed by block id on dim ``block_dim`` (0 by default; 1 for a
    ``[2, num_blocks, ...]`` K/V-first layout). Layers that are the same tensor (cross-layer
    KV sharing) must be passed once. On the wire a layer's blocks follow each other in
    request order, each block's elements in the order of ``tensor.movedim(block_dim, 0)[b]``
    (its memory order when a block is contiguous). Methods are thread-safe: staging buffers
    and copy streams are per thread.
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        *,
        force_staging: bool = False,
        block_dim: int = 0,
    ) -> None:
        if not layers:
            raise ValueError("no KV cache layers to transfer")
        tensors = [t.movedim(block_dim, 0) if block_dim else t for t in layers]
        self._layers = [
            _Layer(t, strided_blocks_ok=force_staging or t.device.type != "cpu") for t in tensors
        ]
        num_blocks = {layer.num_blocks for layer in self._layers}
        if len(num_blocks) != 1:
            raise ValueError(f"layers disagree on num_blocks: {sorted(num_blocks)}")
        self.num_blocks = num_blocks.pop()
        self.staged = force_staging or any(layer.host_rows is None for layer in self._layers)
        self._local = threading.local()
        first = tensors[0]
        self.dtype = first.dtype
        self.device = first.device
        self.block_shape = tuple(int(x) for x in first.shape[1:])
        self._api = stream_api(self.device)
        # The stream current at registration is the engine's: vLLM registers the KV caches
        # from the thread that runs the model. A pull or server thread's own current stream
        # would be the default stream whatever the engine uses.
        self._engine_stream: Any = (
            self._api.current_stream(self.device) if self._api is not None else None
        )

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def request_nbytes(self, num_blocks: int) -> int:
        """Bytes on the wire for ``num_blocks`` blocks across all layers."""
        return num_blocks * sum(layer.block_nbytes for layer in self._layers)

    def check_block_ids(self, block_ids: Sequence[int]) -> list[int]:
        """Return the ids outside ``0..num_blocks-1``."""
        return [b for b in block_ids if not 0 <= b < self.num_blocks]

    # -- producer side ------------------------------------------------------------------------

    def iter_send_buffers(self, block_ids: Sequence[int]) -> Iterator[list[memoryview]]:
        """Every byte of ``block_ids`` in wire order, as batches to send one after another.

        A CPU cache gives one batch: views straight into the cache, every layer. A staged
        cache gives one batch per layer from a staging buffer; asking for the next batch
        says the previous one has been sent (its buffer is then refilled), and the copy of
        the next layer runs while the caller sends the current one. One iteration per
        thread at a time: starting another (or calling ``send_views``) on the same thread
        ends the previous one.
        """
        if not self.staged:
            return iter(
                [[v for layer in self._layers for v in self._direct_views(layer, block_ids)]]
            )
        state = self._state()
        return self._start_send(state, block_ids, first_layer=0)

    def send_views(self, layer_index: int, block_ids: Sequence[int]) -> list[memoryview]:
        """Byte views of ``block_ids`` of one layer, in order, valid until the next call.

        Staged caches pipeline calls for layers 0, 1, 2, ... of the same blocks on one
        thread like ``iter_send_buffers`` (the next layer is copied while the caller sends
        this one); any other call order still works, without the overlap.
        """
        layer = self._layers[layer_index]
        if not self.staged:
            return self._direct_views(layer, block_ids)
        if not block_ids:
            return []
        state = self._state()
        key = tuple(block_ids)
        if not (
            state.send_gen is not None and state.send_key == key and state.send_next == layer_index
        ):
            self._start_send(state, block_ids, first_layer=layer_index)
        assert state.send_gen is not None
        views = next(state.send_gen)
        state.send_next = layer_index + 1
        if state.send_next == self.num_layers:
            state.close_send()  # nothing in flight after the last layer; the views stay valid
        return views

    def request_send_views(self, block_ids: Sequence[int]) -> list[memoryview] | None:
        """Every layer's views for ``block_ids`` in wire order, or None when staged.

        One list lets the transport hand all layers to the kernel in a few
        vectored writes instead of one call per layer.
        """
        if self.staged:
            return None
        return [v for layer in self._layers for v in self._direct_views(layer, block_ids)]

    def request_recv_views(self, block_ids: Sequence[int]) -> list[memoryview] | None:
        """Like ``request_send_views``, for receiving straight into the cache."""
        return self.request_send_views(block_ids)

    # -- consumer side ------------------------------------------------------------------------

    def recv_views(self, layer_index: int, block_ids: Sequence[int]) -> list[memoryview]:
        """Writable byte views that, once filled, hold ``block_ids`` of one layer."""
        layer = self._layers[layer_index]
        if self.staged:
            nbytes = len(block_ids) * layer.block_nbytes
            state = self._state()
            state.recv.ensure(nbytes, pin=self.device.type != "cpu")
            return [state.recv.view(nbytes)]
        return self._direct_views(layer, block_ids)

    def commit_recv(self, layer_index: int, block_ids: Sequence[int]) -> None:
        """Make the bytes received into ``recv_views`` visible in the cache.

        For an accelerator cache this returns only once the blocks are in device memory.
        That is what makes reporting the pull finished safe: the worker reports it to vLLM
        after the pull returns, so every engine kernel that reads these blocks is launched
        after the copy's event completed on the host, and device memory writes that are
        complete before the host observes an event are visible to all later work on any
        stream. No cross-stream wait on the engine's side is needed. Waiting here also keeps
        the staging buffer from being refilled (next layer, next pull) while the DMA still
        reads it.
        """
        if not self.staged:
            return  # received straight into the cache
        layer = self._layers[layer_index]
        count = len(block_ids)
        if count == 0:
            return
        state = self._state()
        assert state.recv.tensor is not None, "commit_recv without recv_views"
        nbytes = count * layer.block_nbytes
        host = state.recv.tensor[:nbytes]
        block_shape = (count, *layer.tensor.shape[1:])
        api = self._api
        if api is None:
            index = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
            blocks = host.to(self.device).view(layer.tensor.dtype).view(block_shape)
            layer.tensor.index_copy_(0, index, blocks)
            self._synchronize_device()
            return
        key = tuple(block_ids)
        new_pull = layer_index == 0 or key != state.recv_key
        with self._on_copy_stream(state) as stream:
            if new_pull or state.recv_index is None:
                state.recv_key = key
                state.recv_index = torch.as_tensor(list(block_ids), dtype=torch.long).to(
                    self.device
                )
            if new_pull:
                # The scheduler may hand us blocks freed while engine work touching them was
                # still queued (asynchronous scheduling): write them only after that work.
                stream.wait_stream(self._engine_stream)
            staged = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            staged.copy_(host, non_blocking=True)
            blocks = staged.view(layer.tensor.dtype).view(block_shape)
            layer.tensor.index_copy_(0, state.recv_index, blocks)
            done = api.Event()
            done.record(stream)
        done.synchronize()

    # -- internals ----------------------------------------------------------------------------

    def _state(self) -> _ThreadState:
        state: _ThreadState | None = getattr(self._local, "state", None)
        if state is None:
            state = _ThreadState()
            self._local.state = state
        return state

    @contextlib.contextmanager
    def _on_copy_stream(self, state: _ThreadState) -> Iterator[Any]:
        """Make this thread's copy stream current (nothing to do without a stream API)."""
        api = self._api
        if api is None:
            yield None
            return
        if state.stream is None:
            state.stream = api.Stream(device=self.device)
        with api.stream(state.stream):
            yield state.stream

    def _synchronize_device(self) -> None:
        if self.device.type == "cpu":
            return
        sync = getattr(getattr(torch, self.device.type, None), "synchronize", None)
        if sync is not None:
            sync(self.device)

    def _start_send(
        self, state: _ThreadState, block_ids: Sequence[int], first_layer: int
    ) -> Generator[list[memoryview], None, None]:
        state.close_send()
        gen = self._staged_send(state, list(block_ids), first_layer)
        state.send_gen = gen
        state.send_key = tuple(block_ids)
        state.send_next = first_layer
        return gen

    def _staged_send(
        self, state: _ThreadState, block_ids: list[int], first_layer: int
    ) -> Generator[list[memoryview], None, None]:
        count = len(block_ids)
        api = self._api
        pin = self.device.type != "cpu"
        # Per staging buffer, the event of the copy into it still to be waited for.
        pending: list[Any] = [None, None]

        def issue(layer_index: int, slot: int) -> None:
            layer = self._layers[layer_index]
            nbytes = count * layer.block_nbytes
            buffer = state.send[slot].ensure(nbytes, pin)
            with self._on_copy_stream(state) as stream:
                src = layer.tensor.index_select(0, index).contiguous()
                buffer[:nbytes].copy_(src.view(-1).view(torch.uint8), non_blocking=api is not None)
                if api is not None:
                    pending[slot] = api.Event()
                    pending[slot].record(stream)

        def wait(slot: int) -> None:
            event = pending[slot]
            pending[slot] = None
            if event is not None:
                event.synchronize()

        try:
            if count == 0:
                return
            with self._on_copy_stream(state) as stream:
                index = torch.as_tensor(block_ids, dtype=torch.long).to(self.device)
                if stream is not None:
                    # Blocks the last prefill forward wrote are complete before we gather.
                    stream.wait_stream(self._engine_stream)
            issue(first_layer, first_layer % 2)
            for layer_index in range(first_layer, self.num_layers):
                slot = layer_index % 2
                if layer_index + 1 < self.num_layers:
                    # The other buffer's bytes were sent: the caller asked for this layer.
                    issue(layer_index + 1, 1 - slot)
                wait(slot)
                nbytes = count * self._layers[layer_index].block_nbytes
                yield [state.send[slot].view(nbytes)]
        finally:
            # Closed early (send failed, a new request): nothing may still write the buffers.
            for event in pending:
                if event is not None:
                    event.synchronize()

    @staticmethod
    def _direct_views(layer: _Layer, block_ids: Sequence[int]) -> list[memoryview]:
        rows = layer.host_rows
        assert rows is not None
        if layer.runs_are_contiguous:
            return [
                memoryview(cast(Any, rows[first : first + count])).cast("B")
                for first, count in block_runs(block_ids)
            ]
        return [memoryview(cast(Any, rows[b])).cast("B") for b in block_ids]
