"""Finding device backends: the built-in ``cpu`` and ``cuda``, and any installed package's backends declared
in the ``pdserve.devices`` entry point group, as vLLM finds its platform plugins::

    # the vendor's pyproject.toml
    [project.entry-points."pdserve.devices"]
    npu = "pdserve_npu:NpuBackend"

The entry point's name is the backend's ``--device`` name; its object is a ``DeviceBackend`` subclass, an
instance, or a function returning either. ``PDSERVE_DEVICE_PLUGINS=a,b`` loads only those plugins
(empty: none). A plugin that fails to import or to make its backend is logged once and listed as broken
(``--device`` naming it says why); the other backends are unaffected.

``--device auto`` takes the available backend of highest ``priority`` (cuda 100, cpu 0; plugins say theirs);
``--device NAME`` or ``NAME:INDEX`` that backend, which must be available. The engine makes its backend the
process's *active* one (``activate``): the KV data plane, which sees only tensors, asks ``backend_for_device``
and gets it for the tensors of its device type.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import torch

from pdserve.devices.base import DeviceBackend
from pdserve.devices.builtin import CpuBackend, CudaBackend
from pdserve.errors import DeviceError

logger = logging.getLogger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "PLUGINS_ENV", "Backends", "activate", "backend_for_device", "discover",
           "get_backend", "refresh", "resolve_backend"]

ENTRY_POINT_GROUP = "pdserve.devices"
PLUGINS_ENV = "PDSERVE_DEVICE_PLUGINS"
_BUILTIN: tuple[type[DeviceBackend], ...] = (CpuBackend, CudaBackend)


@dataclass(frozen=True)
class Backends:
    """What discovery found: usable backends by name (built-ins first) and broken plugins with the reason."""

    backends: dict[str, DeviceBackend]
    broken: dict[str, str] = field(default_factory=dict)

    def names(self) -> str:
        return ", ".join(["auto", *self.backends])


@functools.cache
def discover() -> Backends:
    """The built-in backends and every plugin of ``ENTRY_POINT_GROUP`` (once per process; ``refresh``)."""
    backends: dict[str, DeviceBackend] = {cls.name: cls() for cls in _BUILTIN}
    broken: dict[str, str] = {}
    allowed = os.environ.get(PLUGINS_ENV)
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if allowed_names is not None and ep.name not in allowed_names:
            continue
        if ep.name in backends:
            broken[ep.name] = f"{ep.value}: the name {ep.name!r} is taken by a built-in or another plugin"
        else:
            try:
                backends[ep.name] = _load(ep.name, ep.load())
            except Exception as e:  # noqa: BLE001 - a plugin's own failure must not stop the other backends
                broken[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
        if ep.name in broken:
            logger.warning("device plugin %s is broken: %s", ep.name, broken[ep.name])
        else:
            logger.info("device plugin %s: %s (priority %d)", ep.name, ep.value, backends[ep.name].priority)
    return Backends(backends, broken)


def refresh() -> None:
    """Forget discovered backends and the active one (packages were installed or sys.path changed)."""
    global _active
    discover.cache_clear()
    _active = None


def get_backend(name: str) -> DeviceBackend:
    """The backend called ``name``; DeviceError naming the known ones (and why a broken plugin failed)."""
    found = discover()
    if name in found.backends:
        return found.backends[name]
    if name in found.broken:
        raise DeviceError(f"device backend {name!r} failed to load: {found.broken[name]}")
    raise DeviceError(f"unknown device {name!r}: known devices are {found.names()} "
                      f"(plugins register in the {ENTRY_POINT_GROUP!r} entry point group)")


def resolve_backend(spec: str) -> tuple[DeviceBackend, torch.device]:
    """``--device``'s value (``auto``, ``NAME`` or ``NAME:INDEX``) as a backend and the torch device to run
    on. DeviceError for an unknown name, a bad index, or a backend that is not available here."""
    if spec == "auto":
        backend = _auto()
        return backend, backend.torch_device()
    name, _, index = spec.partition(":")
    if index and not index.isdigit():
        raise DeviceError(f"device {spec!r}: the index after ':' must be a number")
    backend = get_backend(name)
    if not _is_available(backend):
        available = ", ".join(n for n, b in discover().backends.items() if _is_available(b))
        raise DeviceError(f"device {name!r} is not available on this machine (available: {available})")
    return backend, backend.torch_device(int(index) if index else None)


def activate(backend: DeviceBackend) -> None:
    """Make ``backend`` the one ``backend_for_device`` answers for tensors of its device type (an engine
    calls this for its own; one engine per process)."""
    global _active
    _active = backend


def backend_for_device(device: torch.device | str) -> DeviceBackend:
    """The backend that owns tensors on ``device``: the active one when its device type matches, else the
    built-in or the first plugin of that type. DeviceError when no backend drives that device type."""
    device_type = torch.device(device).type
    if _active is not None and _active.device_type == device_type:
        return _active
    for backend in discover().backends.values():
        if backend.device_type == device_type:
            return backend
    raise DeviceError(f"no device backend drives torch device type {device_type!r} "
                      f"(known devices: {discover().names()})")


_active: DeviceBackend | None = None


def _auto() -> DeviceBackend:
    """The available backend of highest priority (built-ins first among equals)."""
    candidates = [b for b in discover().backends.values() if _is_available(b)]
    if not candidates:  # the CPU is always available; only a broken environment gets here
        raise DeviceError("no device backend is available")
    return max(candidates, key=lambda b: b.priority)  # max keeps the first of equal priority


def _is_available(backend: DeviceBackend) -> bool:
    try:
        return bool(backend.is_available())
    except Exception as e:  # noqa: BLE001 - a plugin's probe failing means: not available here
        logger.warning("device backend %s: is_available() failed (%s: %s); treated as unavailable",
                       backend.name, type(e).__name__, e)
        return False


def _load(name: str, obj: object) -> DeviceBackend:
    """An entry point's object as a backend instance: a subclass, an instance, or a function giving either."""
    if isinstance(obj, type) and issubclass(obj, DeviceBackend):
        backend = obj()
    elif isinstance(obj, DeviceBackend):
        backend = obj
    elif callable(obj) and not isinstance(obj, type):
        return _load(name, obj())
    else:
        raise TypeError(f"{obj!r} is not a pdserve.devices.DeviceBackend subclass, instance or factory")
    if backend.name != name:
        raise ValueError(f"the entry point is named {name!r} but the backend calls itself {backend.name!r}")
    if not isinstance(getattr(backend, "device_type", None), str):
        raise TypeError(f"{type(backend).__name__} sets no device_type (torch's device type of its tensors)")
    return backend
