"""The host-memory tier: one pool of KV blocks in shared memory that every worker of a model on a host shares.

The pool is a file in /dev/shm (``pdserve-kvstore-<namespace>``) mapped by each worker: a header, an index (an
open-addressing hash table, block hash -> slot), per-slot metadata (hash, checksum, generation, state, an LRU
list) and the slots, one block each in ``(num_layers, 2, block_size, num_kv_heads, head_dim)`` order. Its own
allocator: a free stack, then the least recently used ready slot. Bookkeeping runs under a lock that spans
processes (a POSIX record lock on the file's first byte, released by the kernel if its holder dies); data moves
outside it, as strided copies over runs of consecutive slots and cache blocks (one copy in, one copy out):

- save: allocate slots under the lock (state *writing*, generation + 1), copy and checksum outside it, then
  publish under the lock; a hash that another writer published meanwhile keeps the first copy (both correct);
- load: find the leading hashes' slots and generations under the lock, copy them out, check each slot's
  checksum, then confirm under the lock that no generation moved (a slot evicted and rewritten during the copy
  is a miss, as is a corrupt one, which is also dropped).

Every attached process holds a shared lock on the file's second byte; the last one to detach removes the
file. A pool outlives a worker that crashes (the next one on the host finds its blocks).

(Over 400 lines: the pool's layout, its lock and its allocator are one shared-memory format, read and
written by every process attached; split, the offsets would be read across files.)
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from pdserve.kv.blocks import DTYPE_NAMES, block_runs
from pdserve.kv.store.keys import Namespace

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MAGIC = 0x50444B5653544F52  # "PDKVSTOR"
VERSION = 1
FREE, WRITING, READY = 0, 1, 2
STALE_WRITE_S = 60.0  # a slot left "writing" this long (its writer died) is reclaimed
_H = 16  # header words
_HEAD, _TAIL, _FREE_TOP, _NUM_READY, _EVICTIONS = 5, 6, 7, 8, 9
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_POOLS: dict[Path, "HostPool"] = {}
_POOLS_LOCK = threading.Lock()


@dataclass(frozen=True)
class PoolUsage:
    num_slots: int
    num_ready: int
    num_writing: int
    slot_bytes: int
    num_evictions: int

    @property
    def used_bytes(self) -> int:
        return (self.num_ready + self.num_writing) * self.slot_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes


def open_pool(ns: Namespace, capacity_bytes: int, directory: Path = SHM_DIR) -> HostPool:
    """This process's handle on the host's pool for ``ns`` (one per process and file: record locks belong to
    a process, so two handles in one process would not exclude each other); ``close`` it once per call."""
    path = directory / f"pdserve-kvstore-{ns.digest}"
    with _POOLS_LOCK:
        pool = _POOLS.get(path)
        if pool is None or pool._fd < 0:
            pool = _POOLS[path] = HostPool(ns, capacity_bytes, directory)
        pool._handles += 1
        return pool


class HostPool:
    """A process's handle on its host's pool for one namespace (``open_pool``). Thread-safe; every method may
    be called from any thread. ``capacity_bytes`` sizes a pool this call creates; an existing pool keeps its
    size."""

    def __init__(self, ns: Namespace, capacity_bytes: int, directory: Path = SHM_DIR) -> None:
        self.ns = ns
        self.path = directory / f"pdserve-kvstore-{ns.digest}"
        self.slot_bytes = ns.block_bytes
        self._thread_lock = threading.Lock()
        self._fd = -1
        self._handles = 0
        self._open(capacity_bytes)

    # -- queries ----------------------------------------------------------------------------------------
    def lookup(self, block_hashes: list[int]) -> int:
        """How many of ``block_hashes``, from the first, the pool holds now (no side effects)."""
        with self._locked():
            n = 0
            for h in block_hashes:
                if self._find(h) < 0:
                    break
                n += 1
            return n

    def usage(self) -> PoolUsage:
        hdr = self._hdr
        with self._locked():
            writing = int((self._state_np == WRITING).sum())
            return PoolUsage(self.num_slots, hdr[_NUM_READY], writing, self.slot_bytes, hdr[_EVICTIONS])

    # -- data -------------------------------------------------------------------------------------------
    def load(self, block_hashes: list[int], cache: torch.Tensor, block_ids: list[int]) -> int:
        """Copy the blocks of the leading ``block_hashes`` the pool holds into ``cache`` at ``block_ids`` (same
        order); return how many landed intact (a leading run: the first miss, corrupt or moved slot ends it)."""
        with self._locked():
            slots, gens, sums = [], [], []
            for h in block_hashes:
                t = self._find(h)
                if t < 0:
                    break
                s = self._tslot[t]
                slots.append(s)
                gens.append(self._gen[s])
                sums.append(self._sum[s])
                self._lru_remove(s)
                self._lru_push_front(s)
        if not slots:
            return 0
        n = len(slots)
        for s, d, k in block_runs(slots, block_ids[:n]):
            # (layers, 2, k, block_size, kv_heads, head_dim) <- (k, layers, 2, block_size, kv_heads, head_dim)
            cache[:, :, d:d + k].copy_(self._slots[s:s + k].permute(1, 2, 0, 3, 4, 5))
        bad = -1
        for i, s in enumerate(slots):
            if self._checksum(s) != sums[i] & _MASK64:
                n, bad = i, s
                break
        with self._locked():
            for i in range(n):
                if self._gen[slots[i]] != gens[i]:
                    n = i
                    break
            if bad >= 0 and self._gen[bad] == gens[slots.index(bad)] and self._state[bad] == READY:
                logger.warning("KV store (host): a stored block failed its checksum; dropped")
                self._drop(bad)
        return n

    def save(self, block_hashes: list[int], cache: torch.Tensor, block_ids: list[int]) -> tuple[list[int], list[int]]:
        """Store the blocks ``block_ids`` of ``cache`` under ``block_hashes`` (those not held yet), evicting the
        least recently used blocks as needed; return (hashes stored, hashes evicted)."""
        evicted: list[int] = []
        todo: list[tuple[int, int, int]] = []  # (position in block_hashes, slot, generation)
        now = time.time()
        with self._locked():
            for i, h in enumerate(block_hashes):
                t = self._find(h)
                if t >= 0:  # held already: it is used again
                    s = self._tslot[t]
                    self._lru_remove(s)
                    self._lru_push_front(s)
                    continue
                s = self._allocate(evicted, now)
                if s < 0:
                    break  # every slot is being written
                self._state[s], self._key[s], self._wtime[s] = WRITING, h, now
                self._gen[s] += 1
                todo.append((i, s, self._gen[s]))
        if not todo:
            return [], evicted
        slots = [s for _, s, _ in todo]
        srcs = [block_ids[i] for i, _, _ in todo]
        for src, s, k in block_runs(srcs, slots):
            # (k, layers, 2, block_size, kv_heads, head_dim) <- (layers, 2, k, block_size, kv_heads, head_dim)
            self._slots[s:s + k].copy_(cache[:, :, src:src + k].permute(2, 0, 1, 3, 4, 5))
        sums = [self._checksum(s) for s in slots]
        stored: list[int] = []
        with self._locked():
            for (i, s, gen), digest in zip(todo, sums):
                if self._gen[s] != gen or self._state[s] != WRITING:
                    continue  # reclaimed as stale meanwhile
                h = block_hashes[i]
                if self._find(h) >= 0:  # another writer stored the same block first: keep theirs
                    self._free(s)
                    continue
                self._sum[s] = digest if digest < 1 << 63 else digest - (1 << 64)
                self._state[s] = READY
                self._insert(h, s)
                self._lru_push_front(s)
                self._hdr[_NUM_READY] += 1
                stored.append(h)
        return stored, evicted

    # -- maintenance ------------------------------------------------------------------------------------
    def check_integrity(self, verify_data: bool = False) -> None:
        """Assert the pool's invariants: every slot free, writing or ready exactly once; the free stack, the
        LRU list and the index agree with the slots' states; with ``verify_data``, every ready slot's checksum."""
        with self._locked():
            hdr = self._hdr
            states = [self._state[s] for s in range(self.num_slots)]
            free = [self._free_stack[i] for i in range(hdr[_FREE_TOP])]
            assert len(set(free)) == len(free), "a slot twice on the free stack"
            assert all(states[s] == FREE for s in free), "a used slot on the free stack"
            assert states.count(FREE) == len(free), (states.count(FREE), len(free))
            ready = states.count(READY)
            assert ready == hdr[_NUM_READY], (ready, hdr[_NUM_READY])
            seen, s, prev = 0, hdr[_HEAD], -1
            while s >= 0:
                assert states[s] == READY and self._prev[s] == prev, ("LRU list", s)
                seen += 1
                assert seen <= ready, "the LRU list loops"
                prev, s = s, self._next[s]
            assert prev == hdr[_TAIL] and seen == ready, ("LRU list", seen, ready)
            entries = 0
            for t in range(self._table_size):
                s = self._tslot[t]
                if s < 0:
                    continue
                entries += 1
                assert states[s] == READY and self._key[s] == self._tkey[t], ("index", t, s)
                assert self._find(self._tkey[t]) == t, ("index probe", t)
            assert entries == ready, (entries, ready)
            if verify_data:
                for s in range(self.num_slots):
                    if states[s] == READY:
                        assert self._checksum(s) == self._sum[s] & _MASK64, ("checksum", s)

    def flip_a_byte(self, block_hash: int) -> bool:
        """Fault injection (tests): corrupt one byte of a stored block; False when the pool does not hold it."""
        with self._locked():
            t = self._find(block_hash)
            if t < 0:
                return False
            off = self._data_off + self._tslot[t] * self.slot_bytes
            self._mm[off] ^= 0xFF
            return True

    def close(self) -> None:
        """Detach; the last process to detach removes the pool's file."""
        with _POOLS_LOCK:
            self._handles -= 1
            if self._handles > 0 or self._fd < 0:
                return
            _POOLS.pop(self.path, None)
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 1)
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
                    self.path.unlink(missing_ok=True)  # nobody else is attached
                    logger.info("KV store (host): removed %s", self.path)
                except OSError:
                    pass  # other workers still use it
            finally:
                os.close(self._fd)  # drops every lock this process held on the file
                self._fd = -1

    # -- private: the file ------------------------------------------------------------------------------
    def _open(self, capacity_bytes: int) -> None:
        num_slots = max(1, capacity_bytes // self.slot_bytes)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
            if os.fstat(fd).st_nlink == 0:  # removed by its last user while we waited: start again
                os.close(fd)
                continue
            break
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH, 1, 1)  # attached
            size = os.fstat(fd).st_size
            header = os.pread(fd, 8 * _H, 0) if size >= 8 * _H else b""
            words = memoryview(header).cast("q").tolist() if header else []
            if words and words[0] == MAGIC and words[1] == VERSION and words[3] == self.slot_bytes and words[11]:
                num_slots = words[2]
                if num_slots * self.slot_bytes != capacity_bytes // self.slot_bytes * self.slot_bytes:
                    logger.info("KV store (host): %s exists with %d MiB; using it as it is", self.path,
                                num_slots * self.slot_bytes >> 20)
                self._map(fd, num_slots, init=False)
            else:
                self._map(fd, num_slots, init=True)
                logger.info("KV store (host): created %s, %d blocks (%.1f MiB)", self.path, num_slots,
                            num_slots * self.slot_bytes / 2**20)
        except BaseException:
            os.close(fd)
            raise
        finally:
            if fd >= 0:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
                except OSError:
                    pass
        self._fd = fd

    def _map(self, fd: int, num_slots: int, init: bool) -> None:
        table_size = 1 << max(4, (2 * num_slots - 1).bit_length())
        layout = [("hdr", _H), ("tkey", table_size), ("tslot", table_size), ("key", num_slots),
                  ("sum", num_slots), ("gen", num_slots), ("state", num_slots), ("prev", num_slots),
                  ("next", num_slots), ("wtime", num_slots), ("free_stack", num_slots)]
        offsets, off = {}, 0
        for name, n in layout:
            offsets[name] = off
            off += 8 * n
        data_off = -(-off // 4096) * 4096
        total = data_off + num_slots * self.slot_bytes
        if init:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, total)
        self._mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(self._mm)
        views = {name: mv[offsets[name]:offsets[name] + 8 * n].cast("q") for name, n in layout}
        self._hdr, self._tkey, self._tslot = views["hdr"], views["tkey"], views["tslot"]
        self._key, self._sum, self._gen, self._state = views["key"], views["sum"], views["gen"], views["state"]
        self._prev, self._next, self._free_stack = views["prev"], views["next"], views["free_stack"]
        self._wtime = mv[offsets["wtime"]:offsets["wtime"] + 8 * num_slots].cast("d")
        import numpy as np

        self._state_np = np.frombuffer(self._mm, dtype=np.int64, count=num_slots, offset=offsets["state"])
        self.num_slots, self._table_size, self._mask, self._data_off = num_slots, table_size, table_size - 1, data_off
        shape = (num_slots, *self.ns.block_shape)  # (slots, layers, 2, block_size, kv_heads, head_dim)
        # The cache's own dtype (by name: float16 and bfloat16 have one size), so copies move bytes, never
        # convert values (a 1-byte float8 cache copied into uint8 slots would be rounded to integers)
        dtype = DTYPE_NAMES[self.ns.dtype]
        data = torch.frombuffer(self._mm, dtype=torch.uint8, offset=data_off, count=num_slots * self.slot_bytes)
        self._slots = data.view(dtype).view(shape)
        if init:
            np.frombuffer(self._mm, dtype=np.int64, count=table_size, offset=offsets["tslot"])[:] = -1
            for name in ("prev", "next"):
                np.frombuffer(self._mm, dtype=np.int64, count=num_slots, offset=offsets[name])[:] = -1
            np.frombuffer(self._mm, dtype=np.int64, count=num_slots, offset=offsets["free_stack"])[:] = \
                np.arange(num_slots - 1, -1, -1)  # popped from the top: slot 0 first, so runs stay consecutive
            hdr = self._hdr
            hdr[1], hdr[2], hdr[3], hdr[4] = VERSION, num_slots, self.slot_bytes, table_size
            hdr[_HEAD], hdr[_TAIL], hdr[_FREE_TOP] = -1, -1, num_slots
            hdr[0] = MAGIC
            hdr[11] = 1  # initialized

    @contextmanager
    def _locked(self):
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)

    def _checksum(self, slot: int) -> int:
        off = self._data_off + slot * self.slot_bytes
        return xxhash.xxh3_64_intdigest(memoryview(self._mm)[off:off + self.slot_bytes])

    # -- private: allocator and LRU (under the lock) ---------------------------------------------------------
    def _allocate(self, evicted: list[int], now: float) -> int:
        hdr = self._hdr
        if hdr[_FREE_TOP] == 0:
            s = hdr[_TAIL]
            if s >= 0:
                evicted.append(self._key[s])
                self._drop(s)
                hdr[_EVICTIONS] += 1
            else:
                self._reclaim_stale_writes(now)
                if hdr[_FREE_TOP] == 0:
                    return -1
        hdr[_FREE_TOP] -= 1
        return self._free_stack[hdr[_FREE_TOP]]

    def _drop(self, s: int) -> None:
        """A ready slot leaves the index and the LRU list and becomes free."""
        t = self._find(self._key[s])
        if t >= 0 and self._tslot[t] == s:
            self._delete(t)
        self._lru_remove(s)
        self._hdr[_NUM_READY] -= 1
        self._free(s)

    def _free(self, s: int) -> None:
        self._state[s] = FREE
        self._gen[s] += 1
        hdr = self._hdr
        self._free_stack[hdr[_FREE_TOP]] = s
        hdr[_FREE_TOP] += 1

    def _reclaim_stale_writes(self, now: float) -> None:
        for s in range(self.num_slots):
            if self._state[s] == WRITING and now - self._wtime[s] > STALE_WRITE_S:
                logger.warning("KV store (host): slot %d was left mid-write (its writer died?); reclaimed", s)
                self._free(s)

    def _lru_remove(self, s: int) -> None:
        p, n = self._prev[s], self._next[s]
        if p >= 0:
            self._next[p] = n
        else:
            self._hdr[_HEAD] = n
        if n >= 0:
            self._prev[n] = p
        else:
            self._hdr[_TAIL] = p
        self._prev[s] = self._next[s] = -1

    def _lru_push_front(self, s: int) -> None:
        head = self._hdr[_HEAD]
        self._prev[s], self._next[s] = -1, head
        if head >= 0:
            self._prev[head] = s
        else:
            self._hdr[_TAIL] = s
        self._hdr[_HEAD] = s

    # -- private: the index (linear probing, backward-shift deletion; under the lock) --------------------------
    def _home(self, key: int) -> int:
        return (((key & _MASK64) * _GOLDEN) & _MASK64) >> 20 & self._mask

    def _find(self, key: int) -> int:
        i = self._home(key)
        tslot, tkey = self._tslot, self._tkey
        while True:
            if tslot[i] < 0:
                return -1
            if tkey[i] == key:
                return i
            i = (i + 1) & self._mask

    def _insert(self, key: int, slot: int) -> None:
        i = self._home(key)
        while self._tslot[i] >= 0:
            i = (i + 1) & self._mask
        self._tkey[i], self._tslot[i] = key, slot

    def _delete(self, i: int) -> None:
        mask, tslot, tkey = self._mask, self._tslot, self._tkey
        j = i
        while True:
            j = (j + 1) & mask
            if tslot[j] < 0:
                break
            k = self._home(tkey[j])
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue  # its home lies between the hole and it: it stays
            tkey[i], tslot[i] = tkey[j], tslot[j]
            i = j
        tslot[i] = -1
