"""Cross-host KV transfer over ZMQ/TCP.

The sender gathers the blocks into one contiguous buffer and sends it as a zero-copy frame (pyzmq
``copy=False``: the kernel reads the tensor's memory) behind the notice. The receiver's worker loop
validates the notice and copies the frame into the reserved blocks (``IncomingTransfer.write_into``).
Frames are capped at ``MAX_FRAME_BYTES`` so a long prompt streams in pieces.
"""
from __future__ import annotations

import torch

from pdserve.kv.transfer import KVReceiver, KVSender, block_bytes, dtype_name, gather_blocks
from pdserve.worker.protocol import KVReservationMsg, KVTarget, KVTransferDone

MAX_FRAME_BYTES = 64 * 2**20


class TcpReceiver(KVReceiver):
    backend = "tcp"

    def allocate_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        assert self.cache is None, "one cache per receiver"
        self.cache = torch.zeros(shape, dtype=dtype)
        return self.cache

    def target(self) -> KVTarget:
        assert self.cache is not None
        return KVTarget(self.worker_id, "tcp", self.address, shape=list(self.cache.shape),
                        dtype=dtype_name(self.cache.dtype))


class TcpSender(KVSender):
    backend = "tcp"

    def _send(self, cache: torch.Tensor, src: list[int], reservation: KVReservationMsg,
              notice: KVTransferDone) -> None:
        target = reservation.target
        if target.dtype and target.dtype != dtype_name(cache.dtype):
            raise ValueError(f"KV dtypes differ: local {cache.dtype}, remote {target.dtype}")
        if target.shape and (target.shape[:2] != list(cache.shape[:2]) or target.shape[3:] != list(cache.shape[3:])):
            raise ValueError(f"cache shapes differ: local {tuple(cache.shape)}, remote {target.shape}")
        per_frame = max(1, MAX_FRAME_BYTES // block_bytes(cache))
        frames = []
        for i in range(0, len(src), per_frame):
            data = gather_blocks(cache, src[i:i + per_frame])  # (num_layers, 2, n, block_size, heads, dim)
            frames.append(data.view(-1).view(torch.uint8).numpy())  # zero-copy bytes of the buffer
        self._notify(target.address, notice, frames)
