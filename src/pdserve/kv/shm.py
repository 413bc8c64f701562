"""Same-host KV transfer: the decode worker's cache is a file in /dev/shm that prefill workers map.

The source copies its blocks straight into the reserved blocks of the mapped cache (one copy, no
serialization), then sends a small notice. The file is named after the decode worker's pid and removed
when the worker exits; files of dead workers are removed by the next worker that starts on the host.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch

from pdserve.kv.base import ConnectorCapabilities
from pdserve.kv.blocks import DTYPE_NAMES
from pdserve.kv.connector import ConnectorConfig
from pdserve.kv.mapped import MappedTargetConnector
from pdserve.protocol import KVTarget

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_FILE_RE = re.compile(r"pdserve-kv-(\d+)-[0-9a-f]+$")


class ShmConnector(MappedTargetConnector):
    """A target's cache must be in host memory (it places it); a source's may be anywhere (its blocks are
    staged through host memory on the way, kv/staging.py)."""

    capabilities = ConnectorCapabilities(is_target=True, places_cache=True, writes_remotely=True,
                                         same_host_only=True, layerwise=True)

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        self.path: Path | None = None

    def allocate_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        assert self.path is None, "one cache per connector"
        remove_stale_files()
        self.path = SHM_DIR / f"pdserve-kv-{os.getpid()}-{os.urandom(4).hex()}"
        numel = math.prod(shape)
        # shared=True maps the file MAP_SHARED (created and zero-filled at the right size).
        cache = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(shape)
        # Touch every page now: a /dev/shm too small fails here, not with SIGBUS mid-transfer, and no
        # transfer pays page faults later.
        cache.zero_()
        logger.info("KV cache in %s (%.1f MiB)", self.path, numel * cache.element_size() / 2**20)
        return cache

    def close(self) -> None:
        super().close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def _target_params(self) -> dict[str, str]:
        if self.path is None:
            raise ValueError("the shm connector receives only into a host cache it placed in shared memory")
        return {"path": str(self.path)}

    def _map(self, target: KVTarget) -> torch.Tensor:
        path = target.params.get("path", "")
        remote = self._maps.get(path)
        if remote is None:
            if not path or not os.path.exists(path):
                raise FileNotFoundError(f"no KV cache file {path!r} (is the decode worker on this host?)")
            dtype = DTYPE_NAMES[target.dtype]
            numel = math.prod(target.shape)
            expected = numel * torch.empty((), dtype=dtype).element_size()
            if os.path.getsize(path) != expected:
                raise ValueError(f"{path} is not {expected} bytes")
            remote = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(target.shape)
            _map_every_page(remote)
            # A dead target's file is removed (by its launcher, or remove_stale_files): let its mapping go too,
            # or every restart of a decode worker would keep a whole KV pool mapped here (a save in flight
            # holds its own reference)
            for gone in [p for p in self._maps if not os.path.exists(p)]:
                del self._maps[gone]
            self._maps[path] = remote
        return remote


def _map_every_page(remote: torch.Tensor) -> None:
    """Read one element of every page of a mapped cache (its target touched them all: no memory is added),
    so the mapping is complete from the start: no transfer pays a page fault for a block written the first
    time, and this process's RSS, which counts the mapped pages, is flat from the first transfer on instead of
    growing towards the cache's size as more of its blocks are written (issue 15's soak)."""
    flat = remote.view(-1).view(torch.uint8)  # bytes: torch sums no float8
    flat[:: os.sysconf("SC_PAGE_SIZE")].sum()


def remove_stale_files() -> None:
    """Remove cache files left by workers that died without cleaning up (pid no longer running)."""
    if not SHM_DIR.is_dir():
        return
    for path in SHM_DIR.glob("pdserve-kv-*"):
        m = _FILE_RE.match(path.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            path.unlink(missing_ok=True)
            logger.info("removed stale KV cache file %s", path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
