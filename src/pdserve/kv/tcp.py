"""Cross-host KV transfer over ZMQ/TCP.

The source gathers the blocks (all layers, or the layers of a layer-wise job) into one contiguous host
buffer (staged through pinned memory when its cache is on an accelerator, kv/staging.py) and sends it as
zero-copy frames (pyzmq ``copy=False``: the kernel reads the buffer's memory) behind the notice. The target
validates the notice and copies the frames into the reserved blocks (through pinned memory to a device
cache). Frames are capped at ``MAX_FRAME_BYTES`` so a long prompt streams in pieces.
"""
from __future__ import annotations

import torch

from pdserve.kv.base import ConnectorCapabilities
from pdserve.kv.blocks import ALL_LAYERS, block_bytes, check_layout, frames_to_tensors
from pdserve.kv.zmq_connector import ZmqConnector
from pdserve.protocol import KVTarget

MAX_FRAME_BYTES = 64 * 2**20


class TcpConnector(ZmqConnector):
    capabilities = ConnectorCapabilities(is_target=True, layerwise=True)

    def _write(self, cache: torch.Tensor, src: list[int], dst: list[int], target: KVTarget,
               layers: slice = ALL_LAYERS, ready=None) -> list:
        check_layout(cache, target.shape, target.dtype)
        num_layers = len(range(*layers.indices(cache.shape[0])))
        per_frame = max(1, MAX_FRAME_BYTES * cache.shape[0] // (block_bytes(cache) * num_layers))
        frames = []
        for i in range(0, len(src), per_frame):
            # (num_layers_in_slice, 2, n, block_size, num_kv_heads, head_dim), in host memory
            data = self.staging(cache).to_host(cache, src[i:i + per_frame], layers, ready)
            frames.append(data.view(-1).view(torch.uint8).numpy())  # zero-copy bytes of the buffer
        return frames

    def _read(self, dst: list[int], frames: list, layers: slice = ALL_LAYERS) -> None:
        num_layers = len(range(*layers.indices(self.cache.shape[0])))
        i = 0
        for data in frames_to_tensors(self.cache, len(dst), frames, num_layers):
            n = data.shape[2]
            self.staging(self.cache).from_host(self.cache, dst[i:i + n], data, layers)
            i += n
