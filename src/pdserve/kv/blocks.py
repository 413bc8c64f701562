"""Tensor helpers for moving KV blocks (the only torch in the data plane besides the connectors).

The cache is one tensor ``(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)``; a block of one
layer's keys (or values) is contiguous, so a request's blocks move as strided copies over runs of
consecutive block ids, all layers at once or a range of layers (layer-wise streaming). The cache may be on
any device: moving its blocks to and from host memory is ``kv/staging.py``'s.
"""
from __future__ import annotations

import hashlib
import warnings

import torch

from pdserve.devices.base import block_runs, copy_block_runs

# The KV cache's dtypes by name (a peer's cache layout, a store namespace); float8_e4m3fn: --kv-cache-dtype fp8
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float8_e4m3fn": torch.float8_e4m3fn}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPE_NAMES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def block_bytes(cache: torch.Tensor) -> int:
    """Bytes of one block across all layers, keys and values."""
    return cache.shape[0] * cache.shape[1] * cache[0, 0, 0].numel() * cache.element_size()


ALL_LAYERS = slice(None)

# The default block copy lives with the device backends (a backend may bring its own:
# ``DeviceBackend.copy_blocks``, which kv/staging.py uses).
copy_blocks = copy_block_runs


def gather_blocks(src: torch.Tensor, src_ids: list[int], layers: slice = ALL_LAYERS) -> torch.Tensor:
    """The blocks ``src_ids`` of ``layers`` as one contiguous tensor on ``src``'s device
    (num_layers_in_slice, 2, len(src_ids), block_size, num_kv_heads, head_dim)."""
    num_layers = len(range(*layers.indices(src.shape[0])))
    out = torch.empty((num_layers, src.shape[1], len(src_ids), *src.shape[3:]), dtype=src.dtype, device=src.device)
    copy_blocks(out, list(range(len(src_ids))), src, src_ids, ALL_LAYERS, layers)
    return out


def frames_to_tensors(cache: torch.Tensor, num_blocks: int, buffers: list, num_layers: int | None = None
                      ) -> list[torch.Tensor]:
    """Received contiguous block data (``gather_blocks`` layout, split along the blocks across ``buffers``)
    as host tensors (num_layers, 2, n, block_size, num_kv_heads, head_dim), no copy. ValueError unless they
    hold exactly ``num_blocks`` blocks of ``num_layers`` layers (default: every layer of ``cache``)."""
    num_layers = cache.shape[0] if num_layers is None else num_layers
    block_shape = (num_layers, cache.shape[1], -1, *cache.shape[3:])
    per_block = num_layers * cache.shape[1] * cache[0, 0, 0].numel()  # elements of one block's layers
    out, i = [], 0
    for buffer in buffers:
        data = tensor_from_buffer(buffer, cache.dtype)
        if data.numel() % per_block:
            raise ValueError(f"a frame of {data.numel()} elements is not a whole number of blocks")
        data = data.view(block_shape)
        i += data.shape[2]
        if i > num_blocks:
            raise ValueError(f"more blocks arrived than the {num_blocks} announced")
        out.append(data)
    if i != num_blocks:
        raise ValueError(f"{i} blocks arrived, {num_blocks} announced")
    return out


def scatter_frames(cache: torch.Tensor, dst_ids: list[int], buffers: list) -> None:
    """Copy received contiguous block data (``gather_blocks`` layout, split across ``buffers``) into a host
    ``cache`` at ``dst_ids``. ValueError when the buffers do not hold exactly ``len(dst_ids)`` blocks."""
    i = 0
    for data in frames_to_tensors(cache, len(dst_ids), buffers):
        n = data.shape[2]
        copy_blocks(cache, dst_ids[i:i + n], data, list(range(n)))
        i += n


def check_layout(cache: torch.Tensor, shape: list[int], dtype: str) -> None:
    """ValueError unless a peer's cache (``shape``, ``dtype`` name) holds blocks like ``cache``'s."""
    if dtype and dtype != dtype_name(cache.dtype):
        raise ValueError(f"KV dtypes differ: local {dtype_name(cache.dtype)}, remote {dtype}")
    if shape and (list(shape[:2]) != list(cache.shape[:2]) or list(shape[3:]) != list(cache.shape[3:])):
        raise ValueError(f"cache shapes differ: local {tuple(cache.shape)}, remote {tuple(shape)}")


def blocks_checksum(cache: torch.Tensor, block_ids: list[int]) -> int:
    """A sum of the blocks' bytes (as 16-bit words, position-free): it changes when any byte does, at one
    pass over the data (transfers' optional integrity check, kv/faults.py)."""
    total = 0
    for s, _, n in block_runs(block_ids, block_ids):
        # (num_layers, 2, n, block_size, num_kv_heads, head_dim) as 16-bit words
        total += int(torch.sum(cache[:, :, s:s + n].contiguous().view(torch.int16), dtype=torch.int64))
    return total


def flip_a_byte(cache: torch.Tensor, block_id: int) -> None:
    """Corrupt one byte of a block (fault injection)."""
    cache[0, 0, block_id].view(-1).view(torch.uint8)[0] ^= 0xFF


def block_digest(cache: torch.Tensor, block_id: int) -> str:
    """SHA-256 of one block's bytes over all layers, keys and values (KV integrity checks)."""
    data = cache[:, :, block_id].contiguous()  # (num_layers, 2, block_size, num_kv_heads, head_dim)
    return hashlib.sha256(data.view(-1).view(torch.uint8).numpy()).hexdigest()


def tensor_from_buffer(buffer, dtype: torch.dtype) -> torch.Tensor:
    """A read-only view of received bytes as a flat tensor (no copy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the buffer is read-only; we only read it
        return torch.frombuffer(buffer, dtype=dtype)
