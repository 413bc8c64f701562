"""The disk tier: one file per block under ``DIR/<namespace>/``, header and payload (``codec``), within a byte
budget.

Writes go to a temporary name and are renamed into place (two writers of one block: the last rename wins,
both wrote the same bytes). The directory is the index, so workers of a host that share DIR find each
other's blocks; each worker keeps a view of the files (size, last use) in LRU order, rebuilt from the
directory every ``RESCAN_S`` seconds, and evicts its oldest when the total passes the budget. A read touches the
file's time (its last use). A full disk evicts and retries once, then skips the block.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from pdserve.kv.store.codec import HEADER_BYTES, pack_header, unpack
from pdserve.kv.store.keys import Namespace, unsigned

logger = logging.getLogger(__name__)

RESCAN_S = 10.0
SUFFIX = ".kv"


class DiskTier:
    """Thread-safe. ``load`` returns payloads (checked); ``save`` takes payloads (bytes-like, one block each)."""

    def __init__(self, ns: Namespace, directory: str | os.PathLike, capacity_bytes: int) -> None:
        self.ns = ns
        self.dir = Path(directory) / ns.digest
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.file_bytes = HEADER_BYTES + ns.block_bytes
        self._files: OrderedDict[int, None] = OrderedDict()  # unsigned hash -> present, LRU order (oldest first)
        self._lock = threading.Lock()
        self._last_scan = 0.0
        self.num_evictions = 0
        self._rescan()

    @property
    def used_bytes(self) -> int:
        return len(self._files) * self.file_bytes

    def lookup(self, block_hashes: list[int]) -> int:
        n = 0
        for h in block_hashes:
            if not os.path.exists(self._path(h)):
                break
            n += 1
        return n

    def load(self, block_hashes: list[int]) -> list[memoryview]:
        """The checked payloads of the leading blocks held (a missing or corrupt file ends the run; a corrupt
        one is removed)."""
        out = []
        for h in block_hashes:
            path = self._path(h)
            try:
                with open(path, "rb") as f:
                    value = f.read(self.file_bytes + 1)
                os.utime(path)
            except OSError:
                break
            payload = unpack(self.ns, h, value)
            if payload is None:
                logger.warning("KV store (disk): %s is corrupt or truncated; removed", path.name)
                path.unlink(missing_ok=True)
                break
            with self._lock:
                self._files[unsigned(h)] = None
                self._files.move_to_end(unsigned(h))
            out.append(payload)
        return out

    def save(self, block_hashes: list[int], payloads: list) -> tuple[list[int], list[int]]:
        """Write the blocks not on disk yet; return (hashes stored, hashes evicted)."""
        self._maybe_rescan()
        stored, evicted = [], []
        for h, payload in zip(block_hashes, payloads):
            path = self._path(h)
            if os.path.exists(path):
                continue
            evicted += self._make_room(self.file_bytes)
            if not self._write(path, h, payload, evicted):
                continue
            with self._lock:
                self._files[unsigned(h)] = None
            stored.append(h)
        return stored, evicted

    # -- private ----------------------------------------------------------------------------------------
    def _path(self, block_hash: int) -> Path:
        return self.dir / f"{unsigned(block_hash):016x}{SUFFIX}"

    def _write(self, path: Path, block_hash: int, payload, evicted: list[int]) -> bool:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        for attempt in range(2):
            try:
                with open(tmp, "wb") as f:
                    f.write(pack_header(self.ns, block_hash, payload))
                    f.write(payload)
                os.replace(tmp, path)
                return True
            except OSError as e:
                tmp.unlink(missing_ok=True)
                if e.errno in (errno.ENOSPC, errno.EDQUOT) and attempt == 0:
                    evicted += self._evict(max(1, len(self._files) // 10))  # the disk is full: make room, retry
                    continue
                logger.warning("KV store (disk): cannot write %s: %s; skipped", path.name, e)
                return False
        return False

    def _make_room(self, num_bytes: int) -> list[int]:
        over = self.used_bytes + num_bytes - self.capacity_bytes
        return self._evict(-(-over // self.file_bytes)) if over > 0 else []

    def _evict(self, num_files: int) -> list[int]:
        out = []
        with self._lock:
            while num_files > 0 and self._files:
                h, _ = self._files.popitem(last=False)
                (self.dir / f"{h:016x}{SUFFIX}").unlink(missing_ok=True)
                out.append(h if h < 1 << 63 else h - (1 << 64))
                num_files -= 1
                self.num_evictions += 1
        return out

    def _maybe_rescan(self) -> None:
        if time.monotonic() - self._last_scan > RESCAN_S:
            self._rescan()

    def _rescan(self) -> None:
        """Rebuild the view from the directory (other workers' files too), oldest use first."""
        found = []
        with os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                    try:
                        found.append((entry.stat().st_mtime, int(entry.name[:-len(SUFFIX)], 16)))
                    except (OSError, ValueError):
                        continue
                elif entry.name.startswith(".") and time.time() - _mtime(entry) > 60:
                    Path(entry.path).unlink(missing_ok=True)  # a temporary file its writer left behind
        found.sort()
        with self._lock:
            self._files = OrderedDict((h, None) for _, h in found)
        self._last_scan = time.monotonic()


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat().st_mtime
    except OSError:
        return time.time()
