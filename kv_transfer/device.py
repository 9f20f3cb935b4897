"""The one device-specific piece: turning KV cache blocks into byte buffers and back.

``KVCacheAccess`` hands the transport flat ``memoryview``s over block runs.
For CPU caches they point straight into the cache tensors, so sockets read
from and write into the cache itself. For accelerator caches (CUDA, NPU) they
point into a per-thread host staging buffer (pinned when the platform
supports it) filled from / copied back to the device. An RDMA, NIXL or HCCL
transport would replace this class and the TCP transport around it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
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


class _Layer:
    """Byte-level geometry of one layer's cache tensor ``[num_blocks, ...]``."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.dim() < 2:
            raise ValueError(
                f"KV cache tensor must be [num_blocks, ...], got {tuple(tensor.shape)}"
            )
        if not tensor[0].is_contiguous():
            raise ValueError(
                f"each KV block must be contiguous in memory; got shape {tuple(tensor.shape)} "
                f"strides {tensor.stride()}"
            )
        self.tensor = tensor
        self.num_blocks = int(tensor.shape[0])
        elem = tensor.element_size()
        self.block_nbytes = int(tensor[0].numel()) * elem
        self.block_stride = int(tensor.stride(0)) * elem
        self.host_rows: np.ndarray | None = None
        if tensor.device.type == "cpu":
            # A [num_blocks, block_nbytes] uint8 view of the cache memory itself.
            flat = tensor.view(torch.uint8).numpy()
            self.host_rows = np.lib.stride_tricks.as_strided(
                flat, shape=(self.num_blocks, self.block_nbytes), strides=(self.block_stride, 1)
            )

    @property
    def runs_are_contiguous(self) -> bool:
        return self.block_stride == self.block_nbytes


class KVCacheAccess:
    """Block-granular byte access to a list of per-layer KV cache tensors.

    Every layer tensor is indexed by block id on dim 0. Layers that are the
    same tensor (cross-layer KV sharing) must be passed once. Methods are
    thread-safe: staging buffers are per thread.
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        *,
        force_staging: bool = False,
    ) -> None:
        if not layers:
            raise ValueError("no KV cache layers to transfer")
        self._layers = [_Layer(t) for t in layers]
        num_blocks = {layer.num_blocks for layer in self._layers}
        if len(num_blocks) != 1:
            raise ValueError(f"layers disagree on num_blocks: {sorted(num_blocks)}")
        self.num_blocks = num_blocks.pop()
        self.staged = force_staging or any(layer.host_rows is None for layer in self._layers)
        self._local = threading.local()
        first = layers[0]
        self.dtype = first.dtype
        self.device = first.device
        self.block_shape = tuple(int(x) for x in first.shape[1:])

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

    def send_views(self, layer_index: int, block_ids: Sequence[int]) -> list[memoryview]:
        """Byte views of ``block_ids`` of one layer, in order, valid until the next call."""
        layer = self._layers[layer_index]
        if self.staged:
            staging = self._staging(len(block_ids) * layer.block_nbytes)
            index = torch.as_tensor(list(block_ids), dtype=torch.long, device=layer.tensor.device)
            src = layer.tensor.index_select(0, index).contiguous()
            staging[: src.numel() * src.element_size()].copy_(src.view(-1).view(torch.uint8))
            return [self._staging_view(len(block_ids) * layer.block_nbytes)]
        return self._direct_views(layer, block_ids)

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
            self._staging(len(block_ids) * layer.block_nbytes)
            return [self._staging_view(len(block_ids) * layer.block_nbytes)]
        return self._direct_views(layer, block_ids)

    def commit_recv(self, layer_index: int, block_ids: Sequence[int]) -> None:
        """Make the bytes received into ``recv_views`` visible in the cache."""
        if not self.staged:
            return  # received straight into the cache
        layer = self._layers[layer_index]
        nbytes = len(block_ids) * layer.block_nbytes
        host = self._local.staging[:nbytes]
        blocks = host.view(layer.tensor.dtype).view(len(block_ids), *layer.tensor.shape[1:])
        index = torch.as_tensor(list(block_ids), dtype=torch.long, device=layer.tensor.device)
        layer.tensor.index_copy_(0, index, blocks.to(layer.tensor.device))

    # -- internals ----------------------------------------------------------------------------

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

    def _staging(self, nbytes: int) -> torch.Tensor:
        staging: torch.Tensor | None = getattr(self._local, "staging", None)
        if staging is None or staging.numel() < nbytes:
            size = max(nbytes, 1)
            try:
                # Pinned memory lets device<->host copies run at full DMA speed.
                staging = torch.empty(size, dtype=torch.uint8, pin_memory=self.device.type != "cpu")
            except RuntimeError:
                staging = torch.empty(size, dtype=torch.uint8)
            self._local.staging = staging
            self._local.staging_np = staging.numpy()
        return staging

    def _staging_view(self, nbytes: int) -> memoryview:
        return memoryview(cast(Any, self._local.staging_np[:nbytes])).cast("B")
