"""Block data between a KV cache on any device and host memory: what a sender ships, what a receiver writes.

A cache in host memory needs no staging: ``to_host`` gathers its blocks into one host buffer and
``from_host`` copies received data straight into the blocks. A cache on an accelerator (its device backend,
``pdserve.devices``, has streams and events: CUDA, or a plugin's chip):

- sending, the blocks are gathered on the device into one contiguous buffer, on a side stream that first
  waits for the event the compute stream recorded when those layers were written (``mark``, called on the
  worker's thread right after the layer's kernels were queued: the host runs ahead of the device), then
  copied into pinned host memory (``pin_memory``: PyTorch's caching host allocator, so repeated sends reuse
  the pages) and the side stream is synchronized before the buffer goes on the wire;
- receiving, the data is copied into pinned memory, then to the device and into the blocks on the side
  stream, which is synchronized before the load is reported (so the compute stream that reads the blocks
  next sees them).

``Staging(device, staged=True)`` on CPU runs the accelerator's path (gather into a device-side buffer, copy
into a separate host buffer, and back) without streams or pinned memory, which CPUs do not have: the unit
tests check the path's indexing and layout that way. Block copies are the backend's (``copy_blocks``).
"""
from __future__ import annotations

import torch

from pdserve.devices import backend_for_device
from pdserve.kv.blocks import ALL_LAYERS, gather_blocks


class Staging:
    """One per connector side and device; used from the connector's save thread (sends) or the worker's loop
    (receives), never from two threads at once per direction."""

    def __init__(self, device: torch.device | str, *, staged: bool | None = None) -> None:
        self.device = torch.device(device)
        self.backend = backend_for_device(self.device)  # its streams, pinned memory and block copies
        self.staged = not self.backend.kv_cache_in_host_memory if staged is None else staged
        self.has_streams = self.backend.has_streams
        self._module = self.backend.stream_module() if self.has_streams else None
        self._send_stream = self._recv_stream = None
        self.pin = self.backend.pin_memory  # pinned host memory only where an accelerator copies from it
        self._copy = self.backend.copy_blocks

    @classmethod
    def for_cache(cls, cache: torch.Tensor) -> Staging:
        return cls(cache.device)

    def mark(self):
        """On the compute thread, after queuing the kernels that wrote some KV: an event a send waits for
        before it reads that KV (None on CPU, where the KV is written when the call returns)."""
        if not self.has_streams:
            return None
        return self._module.current_stream(self.device).record_event()

    def to_host(self, cache: torch.Tensor, block_ids: list[int], layers: slice = ALL_LAYERS,
                ready=None) -> torch.Tensor:
        """The blocks' ``layers`` as one contiguous host tensor (num_layers_in_slice, 2, len(block_ids),
        block_size, num_kv_heads, head_dim), complete when this returns. ``ready``: ``mark``'s event."""
        if not self.staged:
            return gather_blocks(cache, block_ids, layers)
        if not self.has_streams:  # the accelerator path without streams: gather, then a separate host copy
            on_device = gather_blocks(cache, block_ids, layers)
            host = torch.empty(on_device.shape, dtype=on_device.dtype)
            host.copy_(on_device)
            return host
        stream = self._stream("send")
        with self._module.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            on_device = gather_blocks(cache, block_ids, layers)
            host = torch.empty(on_device.shape, dtype=on_device.dtype, pin_memory=self.pin)
            host.copy_(on_device, non_blocking=True)
        stream.synchronize()
        return host

    def from_host(self, cache: torch.Tensor, block_ids: list[int], data: torch.Tensor,
                  layers: slice = ALL_LAYERS) -> None:
        """Write host ``data`` (``to_host``'s layout) into the blocks' ``layers``; complete on return."""
        ids = list(range(data.shape[2]))
        if not self.staged:
            self._copy(cache, block_ids, data, ids, layers, ALL_LAYERS)
            return
        if not self.has_streams:
            on_device = torch.empty(data.shape, dtype=data.dtype, device=cache.device)
            on_device.copy_(data)
            self._copy(cache, block_ids, on_device, ids, layers, ALL_LAYERS)
            return
        pinned = torch.empty(data.shape, dtype=data.dtype, pin_memory=self.pin)
        pinned.copy_(data)
        stream = self._stream("recv")
        with self._module.stream(stream):
            on_device = pinned.to(cache.device, non_blocking=True)
            self._copy(cache, block_ids, on_device, ids, layers, ALL_LAYERS)
        stream.synchronize()

    def copy_between(self, dst: torch.Tensor, dst_ids: list[int], src: torch.Tensor, src_ids: list[int],
                     layers: slice = ALL_LAYERS, ready=None) -> None:
        """Blocks of ``src`` (this device's cache) into ``dst`` (a peer's cache mapped here: host shared
        memory, or the same device through CUDA IPC); complete on return."""
        if dst.device == src.device and not self.has_streams:
            self._copy(dst, dst_ids, src, src_ids, layers)
            return
        if dst.device.type == "cpu":
            self._copy(dst, dst_ids, self.to_host(src, src_ids, layers, ready), list(range(len(src_ids))),
                        layers, ALL_LAYERS)
            return
        stream = self._stream("send")
        with self._module.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            self._copy(dst, dst_ids, src, src_ids, layers)
        stream.synchronize()

    def _stream(self, direction: str):
        attr = f"_{direction}_stream"
        stream = getattr(self, attr)
        if stream is None:
            stream = self._module.Stream(self.device)
            setattr(self, attr, stream)
        return stream
