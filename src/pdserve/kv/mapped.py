"""Connectors that write straight into the target's cache, mapped into the source's process (``shm``: the
decode worker's cache file in /dev/shm; ``cuda_ipc``: its CUDA cache by IPC handle). One copy, source blocks
to reserved blocks; only the notice travels over ZMQ, so no block frames are ever read."""
from __future__ import annotations

import abc

import torch

from pdserve.kv.blocks import ALL_LAYERS, check_layout, flip_a_byte
from pdserve.kv.connector import ConnectorConfig
from pdserve.kv.zmq_connector import ZmqConnector
from pdserve.protocol import KVTarget


class MappedTargetConnector(ZmqConnector):
    """Subclasses say how a target's cache is mapped (``_map``: kept in ``_maps`` by what names it)."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        self._maps: dict[str, torch.Tensor] = {}  # source side: mapped target caches

    def close(self) -> None:
        super().close()
        self._maps.clear()

    @abc.abstractmethod
    def _map(self, target: KVTarget) -> torch.Tensor:
        """The target's whole cache, mapped here (ValueError or OSError when it cannot be)."""

    def _write(self, cache: torch.Tensor, src: list[int], dst: list[int], target: KVTarget,
               layers: slice = ALL_LAYERS, ready=None) -> list:
        # before mapping (``_map`` views the peer's cache as target.shape): a peer's float8 cache is never
        # read as bfloat16, nor written with a conversion
        check_layout(cache, list(target.shape), target.dtype)
        remote = self._map(target)
        self.staging(cache).copy_between(remote, dst, cache, src, layers, ready)
        return []

    def _corrupt_target_block(self, target: KVTarget, block_id: int) -> None:
        flip_a_byte(self._map(target), block_id)

    def _read(self, dst: list[int], frames: list, layers: slice = ALL_LAYERS) -> None:
        if frames:
            raise ValueError(f"the {self.name or type(self).__name__} connector carries no block frames")
