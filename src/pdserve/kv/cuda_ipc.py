"""Same-node KV transfer between GPU caches: the decode worker's cache is mapped into the prefill worker
through CUDA IPC, and the blocks are copied device to device (no host memory on the way).

The target exports its cache's IPC handle in its ``KVTarget.params`` (the fields PyTorch's own
``torch.multiprocessing`` sends for a CUDA tensor, as plain JSON: no pickle crosses a process); the source
opens it once and copies each job's blocks on a side stream that waits for the layer's compute event
(kv/staging.py), synchronizes, then sends the notice over ZMQ as shm does. Only between processes of one
node whose source cache is on a CUDA device.
"""
from __future__ import annotations

import base64
import json
import logging

import torch

from pdserve.kv.base import ConnectorCapabilities
from pdserve.kv.blocks import DTYPE_NAMES
from pdserve.kv.connector import node_name
from pdserve.kv.mapped import MappedTargetConnector
from pdserve.protocol import KVTarget

logger = logging.getLogger(__name__)


class CudaIpcConnector(MappedTargetConnector):
    capabilities = ConnectorCapabilities(is_target=True, writes_remotely=True, same_host_only=True, layerwise=True)

    @classmethod
    def can_reach(cls, target: KVTarget, cache: torch.Tensor) -> bool:
        return cache.is_cuda and target.host == node_name()

    def _target_params(self) -> dict[str, str]:
        if self.cache is None or not self.cache.is_cuda:
            raise ValueError("the cuda_ipc connector receives only into a cache on a CUDA device")
        return {"ipc": export_handle(self.cache)}

    def _map(self, target: KVTarget) -> torch.Tensor:
        text = target.params.get("ipc", "")
        remote = self._maps.get(text)
        if remote is None:
            if not text:
                raise ValueError(f"target {target.worker_id} exports no CUDA IPC handle")
            remote = import_handle(text, DTYPE_NAMES[target.dtype]).view(target.shape)
            self._maps[text] = remote
        return remote


def export_handle(cache: torch.Tensor) -> str:
    """The IPC fields of a CUDA tensor (``torch.multiprocessing.reductions.reduce_tensor``'s), as JSON."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(cache)
    (_, size, stride, offset, _, _, device, handle, size_bytes, offset_bytes, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    b64 = lambda b: base64.b64encode(b).decode() if b else ""  # noqa: E731
    return json.dumps({"size": list(size), "stride": list(stride), "offset": offset, "device": device,
                       "handle": b64(handle), "size_bytes": size_bytes, "offset_bytes": offset_bytes,
                       "ref_handle": b64(ref_handle), "ref_offset": ref_offset, "event_handle": b64(event_handle),
                       "event_sync": bool(event_sync)})


def import_handle(text: str, dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``export_handle`` described, mapped into this process (ValueError on a malformed text)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        f = json.loads(text)
        raw = lambda k: base64.b64decode(f[k]) if f[k] else None  # noqa: E731
        return rebuild_cuda_tensor(torch.Tensor, tuple(f["size"]), tuple(f["stride"]), int(f["offset"]),
                                   torch.storage.TypedStorage, dtype, int(f["device"]), raw("handle"),
                                   int(f["size_bytes"]), int(f["offset_bytes"]), False, raw("ref_handle"),
                                   int(f["ref_offset"]), raw("event_handle"), bool(f["event_sync"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a CUDA IPC handle: {e}") from e
