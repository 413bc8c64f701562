"""The two backends pdserve ships: the host CPU and CUDA (NVIDIA, and AMD through ROCm's CUDA API)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from pdserve.devices.base import DeviceBackend

__all__ = ["CpuBackend", "CudaBackend", "cpu_has_bfloat16", "cpu_model_name"]


class CpuBackend(DeviceBackend):
    """The host CPU: pdserve's C++ kernels (``pdserve.kernels``) where they build, plain PyTorch otherwise;
    the KV cache in host memory (shared memory between workers of one node)."""

    name = "cpu"
    device_type = "cpu"
    priority = 0
    same_node_connector = "shm"

    def is_available(self) -> bool:
        return True

    def device_name(self, device: torch.device) -> str:
        return cpu_model_name()

    def num_cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        """Available and total host memory (``/proc/meminfo``; sysconf where there is none)."""
        fields = _meminfo()
        if "MemAvailable" in fields and "MemTotal" in fields:
            return fields["MemAvailable"], fields["MemTotal"]
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def has_native_bfloat16(self) -> bool:
        """AVX512-BF16 or AMX: 2x float32's GEMM rate at half the bytes; elsewhere bfloat16 is emulated."""
        return cpu_has_bfloat16()


class CudaBackend(DeviceBackend):
    """CUDA devices: PyTorch's SDPA over the paged cache, the KV cache in device memory, transfers staged
    through pinned host memory on side streams, device-to-device copies between workers of one node."""

    name = "cuda"
    device_type = "cuda"
    priority = 100
    same_node_connector = "cuda_ipc"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_name(self, device: torch.device) -> str:
        return torch.cuda.get_device_name(device)

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)

    @property
    def has_streams(self) -> bool:
        return True

    def stream_module(self):
        return torch.cuda


def cpu_has_bfloat16() -> bool:
    """Native bfloat16 dot products on this CPU (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: platform's answer below
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes ({} where it cannot be read)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out
