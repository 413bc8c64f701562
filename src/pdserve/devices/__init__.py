"""Device backends: what pdserve asks of a chip (``base.DeviceBackend``), the built-in ``cpu`` and ``cuda``
(``builtin``), and how ``--device`` finds one, plugins included (``registry``: the ``pdserve.devices`` entry
point group). docs/architecture.md, "Device backends", says how to write one."""
from __future__ import annotations

from pdserve.devices.base import AttentionFn, DeviceBackend
from pdserve.devices.builtin import CpuBackend, CudaBackend
from pdserve.devices.registry import (ENTRY_POINT_GROUP, activate, backend_for_device, discover, get_backend,
                                      refresh, resolve_backend)

__all__ = ["ENTRY_POINT_GROUP", "AttentionFn", "CpuBackend", "CudaBackend", "DeviceBackend", "activate",
           "backend_for_device", "discover", "get_backend", "refresh", "resolve_backend"]
