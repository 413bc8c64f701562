"""The tiers together: lookups, loads and saves across host memory, disk and the remote store, and their counters.

A lookup or load walks the tiers in order (host, disk, remote) and extends the request's leading run of blocks
with whichever tier holds the next one, so a prefix may come partly from each. A save writes every tier (write
through: the host tier from the cache directly, disk and remote from one gathered copy). Blocks loaded from
disk or remote are also put in the host tier (the next worker on the host finds them there).

The remote tier is skipped for ``RETRY_S`` after a failure (one warning per outage, an error counted), so a
store that is down or unreachable costs nothing but the misses; the scheduler's lookups wait at most
``timeout_s`` for it.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pdserve.config import KVStoreConfig
from pdserve.kv.blocks import tensor_from_buffer
from pdserve.kv.store.codec import pack_header, unpack
from pdserve.kv.store.disk import DiskTier
from pdserve.kv.store.host import HostPool, open_pool
from pdserve.kv.store.keys import Namespace
from pdserve.kv.store.remote import RemoteBackend, RemoteError, connect

logger = logging.getLogger(__name__)

RETRY_S = 5.0
MAX_EVENTS = 4096  # store events kept for the router when nobody reads them (the oldest go)
TIERS = ("host", "disk", "remote")


@dataclass
class TierStats:
    """Counters since start for one tier (blocks, bytes, seconds); ``used_bytes``/``capacity_bytes`` now."""

    tier: str
    hits: int = 0  # blocks loaded from it
    misses: int = 0  # blocks looked for in a load and not found there (or found corrupt)
    load_bytes: int = 0
    load_s: float = 0.0
    num_loads: int = 0
    save_bytes: int = 0
    save_s: float = 0.0
    num_saves: int = 0  # blocks written
    evictions: int = 0
    errors: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0


@dataclass
class StoreEvent:
    tier: str
    stored: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)


class TieredStore:
    """Thread-safe: the scheduler's lookups run on the worker's loop, loads and saves on the connector's threads."""

    def __init__(self, config: KVStoreConfig, ns: Namespace) -> None:
        self.config = config
        self.ns = ns
        self.host: HostPool | None = open_pool(ns, config.host_memory_bytes) if config.host_memory_bytes else None
        self.disk = DiskTier(ns, config.disk_path, config.disk_bytes) if config.disk else None
        self.remote: RemoteBackend | None = None
        self.stats = {t: TierStats(t) for t in TIERS if self._configured(t)}
        self._events: deque[StoreEvent] = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()
        self._remote_down_until = 0.0
        self._remote_warned = False
        self._lookups = concurrent.futures.ThreadPoolExecutor(1, "kv-store-lookup") if config.remote else None
        self._pending_lookup: concurrent.futures.Future | None = None
        if config.remote:
            self._connect_remote()

    @property
    def tiers(self) -> list[str]:
        return list(self.stats)

    # -- the three operations ----------------------------------------------------------------------------
    def lookup(self, block_hashes: list[int]) -> int:
        """How many of ``block_hashes``, from the first, some tier holds (waits at most ``timeout_s``)."""
        n = 0
        while n < len(block_hashes):
            start = n
            if self.host is not None:
                n += self.host.lookup(block_hashes[n:])
            if self.disk is not None and n < len(block_hashes):
                n += self.disk.lookup(block_hashes[n:])
            if n < len(block_hashes) and self._remote_usable():
                n += self._remote_lookup(block_hashes[n:])
            if n == start:
                break
        return n

    def load(self, block_hashes: list[int], cache: torch.Tensor, block_ids: list[int]) -> int:
        """Copy the leading blocks some tier holds into ``cache`` at ``block_ids``; return how many landed."""
        n = 0
        while n < len(block_hashes):
            start = n
            if self.host is not None:
                n += self._timed_load("host", block_hashes[n:], cache, block_ids[n:],
                                      lambda h, i: self.host.load(h, cache, i))
            if self.disk is not None and n < len(block_hashes):
                n += self._timed_load("disk", block_hashes[n:], cache, block_ids[n:],
                                      lambda h, i: self._put_payloads(self.disk.load(h), cache, i))
            if n < len(block_hashes) and self._remote_usable():
                n += self._timed_load("remote", block_hashes[n:], cache, block_ids[n:],
                                      lambda h, i: self._remote_load(h, cache, i))
            if n == start:
                break
        return n

    def save(self, block_hashes: list[int], cache: torch.Tensor, block_ids: list[int]) -> int:
        """Write the blocks to every tier (those a tier holds already are skipped); return the bytes written."""
        written = 0
        if self.host is not None:
            t0 = time.perf_counter()
            stored, evicted = self.host.save(block_hashes, cache, block_ids)
            written += self._saved("host", stored, evicted, time.perf_counter() - t0)
        want_disk = self.disk is not None
        want_remote = self._remote_usable()
        if not (want_disk or want_remote):
            return written
        # (n, layers, 2, block_size, kv_heads, head_dim): each block's payload contiguous
        staging = gather_payloads(cache, block_ids)
        payloads = [staging[i].view(-1).view(torch.uint8).numpy().data for i in range(len(block_ids))]
        if want_disk:
            t0 = time.perf_counter()
            stored, evicted = self.disk.save(block_hashes, payloads)
            written += self._saved("disk", stored, evicted, time.perf_counter() - t0)
        if want_remote:
            t0 = time.perf_counter()
            try:
                keys = [self.ns.key(h) for h in block_hashes]
                present = self.remote.exists(keys)
                todo = [i for i, p in enumerate(present) if not p]
                if todo:
                    self.remote.put([keys[i] for i in todo],
                                    [pack_header(self.ns, block_hashes[i], payloads[i]) + bytes(payloads[i])
                                     for i in todo])
                self._remote_ok()
                written += self._saved("remote", [block_hashes[i] for i in todo], [], time.perf_counter() - t0)
            except RemoteError as e:
                self._remote_failed(e)
        return written

    # -- counters and events ------------------------------------------------------------------------------
    def tier_stats(self) -> list[TierStats]:
        """A copy of every tier's counters, with its use now."""
        out = []
        with self._lock:
            for name, s in self.stats.items():
                s = TierStats(**vars(s))
                if name == "host" and self.host is not None:
                    u = self.host.usage()
                    s.used_bytes, s.capacity_bytes, s.evictions = u.used_bytes, u.capacity_bytes, u.num_evictions
                elif name == "disk" and self.disk is not None:
                    s.used_bytes, s.capacity_bytes = self.disk.used_bytes, self.disk.capacity_bytes
                    s.evictions = self.disk.num_evictions
                out.append(s)
        return out

    def take_events(self) -> list[StoreEvent]:
        with self._lock:
            events, self._events = list(self._events), deque(maxlen=MAX_EVENTS)
        return events

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)
        if self.host is not None:
            self.host.close()
            self.host = None
        if self.remote is not None:
            self.remote.close()
            self.remote = None

    # -- private ------------------------------------------------------------------------------------------
    def _configured(self, tier: str) -> bool:
        c = self.config
        return bool({"host": c.host_memory_bytes, "disk": c.disk, "remote": c.remote}[tier])

    def _timed_load(self, tier: str, hashes: list[int], cache: torch.Tensor, block_ids: list[int], fn) -> int:
        t0 = time.perf_counter()
        try:
            n = fn(hashes, block_ids)
        except RemoteError as e:
            self._remote_failed(e)
            n = 0
        dt = time.perf_counter() - t0
        with self._lock:
            s = self.stats[tier]
            s.hits += n
            s.misses += len(hashes) - n
            s.load_bytes += n * self.ns.block_bytes
            s.load_s += dt
            s.num_loads += 1
        if n and tier != "host" and self.host is not None:  # promote: the next worker on the host finds them
            t0 = time.perf_counter()
            stored, evicted = self.host.save(hashes[:n], cache, block_ids[:n])
            self._saved("host", stored, evicted, time.perf_counter() - t0)
        return n

    def _saved(self, tier: str, stored: list[int], evicted: list[int], seconds: float) -> int:
        with self._lock:
            s = self.stats[tier]
            s.num_saves += len(stored)
            s.save_bytes += len(stored) * self.ns.block_bytes
            s.save_s += seconds
            if tier == "remote":
                s.evictions += len(evicted)
            if stored or evicted:
                self._events.append(StoreEvent(tier, list(stored), list(evicted)))
        return len(stored) * self.ns.block_bytes

    def _put_payloads(self, payloads: list, cache: torch.Tensor, block_ids: list[int]) -> int:
        shape = self.ns.block_shape
        for payload, b in zip(payloads, block_ids):
            data = tensor_from_buffer(payload, cache.dtype).view(shape)  # (layers, 2, block_size, heads, dim)
            cache[:, :, b].copy_(data)
        return len(payloads)

    def _remote_load(self, hashes: list[int], cache: torch.Tensor, block_ids: list[int]) -> int:
        values = self.remote.get([self.ns.key(h) for h in hashes])
        self._remote_ok()
        payloads = []
        for h, v in zip(hashes, values):
            payload = unpack(self.ns, h, v)
            if payload is None:
                if v is not None:
                    logger.warning("KV store (remote): a stored block is corrupt or truncated; a miss")
                break
            payloads.append(payload)
        return self._put_payloads(payloads, cache, block_ids)

    def _remote_lookup(self, hashes: list[int]) -> int:
        if self._pending_lookup is not None and not self._pending_lookup.done():
            return 0  # the last lookup is still stuck: skip the tier
        keys = [self.ns.key(h) for h in hashes]
        self._pending_lookup = self._lookups.submit(self.remote.exists, keys)
        try:
            present = self._pending_lookup.result(timeout=self.config.timeout_s)
        except (RemoteError, concurrent.futures.TimeoutError) as e:
            self._remote_failed(e if isinstance(e, RemoteError) else RemoteError("a lookup timed out"))
            return 0
        self._remote_ok()
        n = 0
        for p in present:
            if not p:
                break
            n += 1
        return n

    def _connect_remote(self) -> None:
        try:
            self.remote = connect(self.config.remote, self.config.timeout_s)
            self._remote_ok()
        except RemoteError as e:
            self._remote_failed(e)

    def _remote_usable(self) -> bool:
        if not self.config.remote or time.monotonic() < self._remote_down_until:
            return False
        if self.remote is None:
            self._connect_remote()
        return self.remote is not None and time.monotonic() >= self._remote_down_until

    def _remote_ok(self) -> None:
        if self._remote_warned:
            logger.warning("KV store (remote): %s answers again", self.config.remote)
            self._remote_warned = False

    def _remote_failed(self, e: Exception) -> None:
        with self._lock:
            self.stats["remote"].errors += 1
        self._remote_down_until = time.monotonic() + RETRY_S
        if not self._remote_warned:
            logger.warning("KV store (remote): %s failed (%s); serving without it, retrying every %.0f s",
                           self.config.remote, e, RETRY_S)
            self._remote_warned = True


def gather_payloads(cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """The blocks ``block_ids`` of ``cache`` as one contiguous (n, layers, 2, block_size, kv_heads, head_dim)
    tensor on the host: each block's payload in store order."""
    from pdserve.kv.blocks import block_runs

    out = torch.empty((len(block_ids), cache.shape[0], cache.shape[1], *cache.shape[3:]), dtype=cache.dtype)
    for s, d, k in block_runs(block_ids, list(range(len(block_ids)))):
        out[d:d + k].copy_(cache[:, :, s:s + k].permute(2, 0, 1, 3, 4, 5))
    return out
