"""Cross-host KV transfer over ZMQ/TCP.

The source gathers the blocks into one contiguous buffer and sends it as zero-copy frames (pyzmq
``copy=False``: the kernel reads the tensor's memory) behind the notice. The target validates the notice
and copies the frames into the reserved blocks. Frames are capped at ``MAX_FRAME_BYTES`` so a long prompt
streams in pieces.
"""
from __future__ import annotations

import torch

from pdserve.kv.base import ConnectorCapabilities
from pdserve.kv.blocks import block_bytes, check_layout, gather_blocks, scatter_frames
from pdserve.kv.zmq_connector import ZmqConnector
from pdserve.protocol import KVTarget

MAX_FRAME_BYTES = 64 * 2**20


class TcpConnector(ZmqConnector):
    capabilities = ConnectorCapabilities(is_target=True)

    def _write(self, cache: torch.Tensor, src: list[int], dst: list[int], target: KVTarget) -> list:
        check_layout(cache, target.shape, target.dtype)
        per_frame = max(1, MAX_FRAME_BYTES // block_bytes(cache))
        frames = []
        for i in range(0, len(src), per_frame):
            data = gather_blocks(cache, src[i:i + per_frame])  # (num_layers, 2, n, block_size, heads, dim)
            frames.append(data.view(-1).view(torch.uint8).numpy())  # zero-copy bytes of the buffer
        return frames

    def _read(self, dst: list[int], frames: list) -> None:
        scatter_frames(self.cache, dst, frames)
