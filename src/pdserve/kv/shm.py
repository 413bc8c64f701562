"""Same-host KV transfer: the decode worker's cache is a file in /dev/shm that prefill workers map.

The sender copies its blocks straight into the reserved blocks of the mapped cache (one copy, no
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
import zmq

from pdserve.kv.transfer import DTYPE_NAMES, KVReceiver, KVSender, copy_blocks, dtype_name
from pdserve.worker.protocol import KVReservationMsg, KVTarget, KVTransferDone

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_FILE_RE = re.compile(r"pdserve-kv-(\d+)-[0-9a-f]+$")


class ShmReceiver(KVReceiver):
    backend = "shm"

    def __init__(self, context: zmq.Context, worker_id: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(context, worker_id, host, port)
        self.path: Path | None = None
        remove_stale_files()

    def allocate_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        assert self.cache is None, "one cache per receiver"
        self.path = SHM_DIR / f"pdserve-kv-{os.getpid()}-{os.urandom(4).hex()}"
        numel = math.prod(shape)
        # shared=True maps the file MAP_SHARED (created and zero-filled at the right size).
        self.cache = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(shape)
        # Touch every page now: a /dev/shm too small fails here, not with SIGBUS mid-transfer, and no
        # transfer pays page faults later.
        self.cache.zero_()
        logger.info("KV cache in %s (%.1f MiB)", self.path, numel * self.cache.element_size() / 2**20)
        return self.cache

    def target(self) -> KVTarget:
        assert self.cache is not None and self.path is not None
        return KVTarget(self.worker_id, "shm", self.address, str(self.path), list(self.cache.shape),
                        dtype_name(self.cache.dtype))

    def close(self) -> None:
        super().close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class ShmSender(KVSender):
    backend = "shm"

    def __init__(self, context: zmq.Context) -> None:
        super().__init__(context)
        self._maps: dict[str, torch.Tensor] = {}

    def _send(self, cache: torch.Tensor, src: list[int], reservation: KVReservationMsg,
              notice: KVTransferDone) -> None:
        remote = self._map(reservation.target)
        if remote.shape[0] != cache.shape[0] or remote.shape[1] != cache.shape[1] or \
                remote.shape[3:] != cache.shape[3:]:
            raise ValueError(f"cache shapes differ: local {tuple(cache.shape)}, remote {tuple(remote.shape)}")
        copy_blocks(remote, notice.dst_block_ids, cache, src)
        self._notify(reservation.target.address, notice, [])

    def _map(self, target: KVTarget) -> torch.Tensor:
        remote = self._maps.get(target.shm_path)
        if remote is None:
            if not os.path.exists(target.shm_path):
                raise FileNotFoundError(f"no KV cache file {target.shm_path} (is the decode worker on this host?)")
            dtype = DTYPE_NAMES[target.dtype]
            numel = math.prod(target.shape)
            expected = numel * torch.empty((), dtype=dtype).element_size()
            if os.path.getsize(target.shm_path) != expected:
                raise ValueError(f"{target.shm_path} is not {expected} bytes")
            remote = torch.from_file(target.shm_path, shared=True, size=numel, dtype=dtype).view(target.shape)
            self._maps[target.shm_path] = remote
        return remote

    def close(self) -> None:
        super().close()
        self._maps.clear()


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
