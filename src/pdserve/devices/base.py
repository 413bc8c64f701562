"""The device backend seam: what pdserve asks of a chip, in one class a vendor implements in its own package.

A backend names a kind of device (``--device NAME``) and the torch device type its tensors live on, says
whether it is usable here, and answers the questions the engine, the loader, the worker and the KV data
plane used to answer by testing ``device.type``: which dtypes it runs (and whether bfloat16 arithmetic is
native), which attention to use, how to allocate the KV cache and copy its blocks, whether it has streams
and pinned host memory, how much memory it has, and which same-node KV connector suits a cache on it.

Every method has a default that works on any device PyTorch drives (plain torch ops, the model's own paged
attention in ``model/attention.py``), so a minimal backend is a name, a device type and ``is_available``.
Backends are found by ``devices/registry.py``: ``cpu`` and ``cuda`` built in (``devices/builtin.py``), others
through the ``pdserve.devices`` entry point group.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

__all__ = ["AttentionFn", "DeviceBackend", "copy_block_runs", "block_runs"]

# The model's attention contract (``pdserve.model.attention.paged_attention``): write this step's K/V into
# ``kv_cache`` at ``meta.slot_mapping``, then attend. Arguments: q (num_tokens, num_heads, head_dim), k and v
# (num_tokens, num_kv_heads, head_dim), kv_cache (2, num_blocks, block_size, num_kv_heads, head_dim), meta
# (``AttentionMetadata``), scale (float), window (int | None: a sliding window, itself included).
# Returns (num_tokens, num_heads, head_dim).
AttentionFn = Callable[..., torch.Tensor]

_ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DeviceBackend(ABC):
    """One kind of device. Instances are made once per process by the registry (no arguments) and must be
    cheap to make: no device work in ``__init__``; probe the hardware in ``is_available``.

    Methods that take a ``device`` get the ``torch.device`` the engine runs on (``torch_device``'s answer).
    None of them is called on a hot path except ``attention``'s function (per layer and step) and
    ``copy_blocks`` (per KV transfer).
    """

    name: ClassVar[str]  # what --device takes: "cpu", "cuda", "npu", ...
    device_type: ClassVar[str]  # torch's device type of its tensors: "cpu", "cuda", "xpu", "privateuseone", ...
    priority: ClassVar[int] = 0  # --device auto picks the available backend of highest priority (cpu 0, cuda 100)
    # The same-node KV connector for a cache on this device (a name in ``kv/registry.py``: "shm" for a
    # cache in host memory, "cuda_ipc" device to device); None: only the network connector.
    same_node_connector: ClassVar[str | None] = None

    # -- presence and identity ------------------------------------------------------------------------------
    @abstractmethod
    def is_available(self) -> bool:
        """Whether this process can run on the device now (driver present, a device visible). No side
        effects beyond probing; never raises for a missing device (returns False)."""

    def torch_device(self, index: int | None = None) -> torch.device:
        """The torch device an engine runs on: ``--device NAME:INDEX`` passes ``index``."""
        return torch.device(self.device_type, index) if index is not None else torch.device(self.device_type)

    def device_name(self, device: torch.device) -> str:
        """The model name of the device (matched against the simulator's hardware catalogue)."""
        return self.name

    def label(self, device: torch.device) -> str:
        """For logs: ``cuda:0``; a backend on another's device type says its name too: ``npu (cpu)``."""
        return str(device) if self.name == device.type else f"{self.name} ({device})"

    def num_cores(self) -> int:
        """Host cores the worker may run on, for a backend whose compute is the host CPU; 0 otherwise."""
        return 0

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        """``(free_bytes, total_bytes)`` of the device's memory. Default: the torch device module's
        ``mem_get_info`` (CUDA, XPU, ... have one); NotImplementedError where there is none."""
        module = torch.get_device_module(device.type)
        if not hasattr(module, "mem_get_info"):
            raise NotImplementedError(f"{self.name}: no memory_info for device type {device.type!r}")
        free, total = module.mem_get_info(device)
        return int(free), int(total)

    # -- arithmetic -------------------------------------------------------------------------------------------
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes weights, activations and the KV cache may have on this device."""
        return _ALL_DTYPES

    def has_native_bfloat16(self) -> bool:
        """bfloat16 arithmetic at least as fast as float32 (not emulated)."""
        return True

    def default_dtype(self) -> torch.dtype:
        """``--dtype auto``: bfloat16 where it is native, else float32."""
        return torch.bfloat16 if self.has_native_bfloat16() and torch.bfloat16 in self.supported_dtypes() \
            else torch.float32

    @property
    def uses_cpu_kernels(self) -> bool:
        """Whether pdserve's CPU C++ kernels (``pdserve.kernels``: fused norms, quantized GEMMs, paged
        attention) run on this device's tensors: the loader builds them and keeps quantized weights quantized
        only then. (Norms and GEMMs dispatch by tensor: a backend on device type "cpu" gets them anyway.)"""
        return self.device_type == "cpu"

    def attention(self) -> AttentionFn | None:
        """This device's paged attention (``AttentionFn``'s contract), or None for the built-in one: the CPU
        kernels on a CPU tensor, else ``model/attention.py``'s PyTorch paged attention (SDPA)."""
        return None

    # -- the KV cache -------------------------------------------------------------------------------------------
    @property
    def kv_cache_in_host_memory(self) -> bool:
        """Whether the KV cache lives in host memory (then a connector may place it, e.g. in shared memory)."""
        return self.device_type == "cpu"

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The whole paged KV cache, zeroed: ``shape`` is (num_layers, 2, num_blocks, block_size,
        num_kv_heads, head_dim). Called once per engine, when no connector places the cache."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def copy_blocks(self, dst: torch.Tensor, dst_ids: list[int], src: torch.Tensor, src_ids: list[int],
                    layers: slice = slice(None), src_layers: slice | None = None) -> None:
        """``dst[layers, :, dst_ids] = src[src_layers, :, src_ids]`` between caches (or block buffers) of
        ``shape``'s layout; either side may be host memory. Queued on the current stream where the device has
        streams (the caller synchronizes). Default: strided torch copies over runs of consecutive ids."""
        copy_block_runs(dst, dst_ids, src, src_ids, layers, src_layers)

    # -- streams and host memory ------------------------------------------------------------------------------
    @property
    def has_streams(self) -> bool:
        """Whether the device runs work asynchronously on streams with events (then KV transfers wait for the
        event recorded after a layer's kernels, on a side stream)."""
        return False

    @property
    def pin_memory(self) -> bool:
        """Whether host buffers for transfers should be pinned (page-locked) memory."""
        return self.has_streams

    def stream_module(self) -> Any:
        """The torch device module with ``Stream``, ``stream``, ``current_stream`` and ``synchronize``
        (``torch.cuda``, ``torch.xpu``, ...); only asked when ``has_streams``."""
        return torch.get_device_module(self.device_type)

    def synchronize(self, device: torch.device) -> None:
        """Wait for all work queued on the device (a no-op without streams)."""
        if self.has_streams:
            self.stream_module().synchronize(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device_type={self.device_type!r})"


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` runs where both id lists advance by one together."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_block_runs(dst: torch.Tensor, dst_ids: list[int], src: torch.Tensor, src_ids: list[int],
                    layers: slice = slice(None), src_layers: slice | None = None) -> None:
    """The default block copy: ``dst[layers, :, dst_ids] = src[src_layers, :, src_ids]`` as strided copies
    over runs (no gather temporary). ``src_layers`` defaults to ``layers`` (both hold every layer)."""
    src_layers = layers if src_layers is None else src_layers
    for s, d, n in block_runs(src_ids, dst_ids):
        # (num_layers, 2, n, block_size, num_kv_heads, head_dim)
        dst[layers, :, d:d + n].copy_(src[src_layers, :, s:s + n], non_blocking=dst.device != src.device)
