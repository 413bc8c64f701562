"""The KV store's worker side (``KVConnector`` with capability ``is_store``): loads and saves by block hash on
two threads of its own (loads never wait behind saves), reported through ``poll_loads``/``poll_saves``.

Saves are bounded: ``num_savable`` (asked by the scheduler side before it holds a finished request's blocks)
lets through only the leading blocks that fit under ``save_queue_bytes`` of waiting KV; the rest of the save,
or all of it, is dropped (counted), never waited for. A load writes
into its request's blocks until its ``LoadDone`` is out: the worker keeps an aborted request's blocks until
then (``flow.store.StoreLoads``); a load ``cancel``led before it starts does nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from pdserve.kv.base import ConnectorCapabilities, LoadDone, SaveDone
from pdserve.kv.blocks import dtype_name
from pdserve.kv.connector import ConnectorConfig, KVConnector, LoadJob, SaveJob, ThreadedSaves
from pdserve.kv.store.keys import Namespace
from pdserve.kv.store.scheduler_side import num_fitting, save_queue_bytes
from pdserve.kv.store.tiers import StoreEvent, TieredStore, TierStats
from pdserve.protocol import KVReservationMsg, KVTarget

logger = logging.getLogger(__name__)


@dataclass
class QueueStats:
    queued_bytes: int = 0
    num_dropped: int = 0  # saves not queued, or cut to their leading blocks: the queue was full
    num_failed: int = 0  # loads or saves that raised
    in_flight: dict[str, int] = field(default_factory=dict)


class StoreConnector(KVConnector):
    capabilities = ConnectorCapabilities(is_target=False, is_store=True)

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        if config.store is None or not config.store.enabled:
            raise ValueError("the store connector needs KV store tiers (kv_host_memory, kv_disk or kv_remote)")
        self.store: TieredStore | None = None
        self.save_queue_bytes = config.store.save_queue_bytes  # set from the cache once it is registered
        self.queue = QueueStats()
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._loads = ThreadedSaves("kv-store-load", self._load)
        self._saves = ThreadedSaves("kv-store-save", self._save)

    # -- the cache and the store ---------------------------------------------------------------------------
    def register_cache(self, cache: torch.Tensor) -> None:
        super().register_cache(cache)
        self.save_queue_bytes = save_queue_bytes(self.config.store.save_queue_bytes, cache.nbytes)
        shape = (cache.shape[0], cache.shape[1], *cache.shape[3:])  # (layers, 2, block_size, kv_heads, head_dim)
        ns = Namespace(self.config.model, dtype_name(cache.dtype), tuple(shape), cache.element_size())
        self.store = TieredStore(self.config.store, ns)
        logger.info("KV store: tiers %s, namespace %s (%s, %s), %d bytes a block", "+".join(self.store.tiers),
                    ns.digest, self.config.model, ns.dtype, ns.block_bytes)

    @property
    def block_bytes(self) -> int:
        return self.store.ns.block_bytes

    def lookup(self, block_hashes: list[int]) -> int:
        """How many of ``block_hashes``, from the first, the store holds (the scheduler side asks, at admission)."""
        return self.store.lookup(block_hashes)

    def num_savable(self, num_blocks: int) -> int:
        """How many leading blocks of a save of ``num_blocks`` fit the queue now (a save cut short counts
        as dropped)."""
        n = num_fitting(num_blocks, self.save_queue_bytes, self.queue.queued_bytes, self.block_bytes)
        if n < num_blocks:
            self.queue.num_dropped += 1
        return n

    def tier_stats(self) -> list[TierStats]:
        return self.store.tier_stats() if self.store is not None else []

    def take_events(self) -> list[StoreEvent]:
        return self.store.take_events() if self.store is not None else []

    # -- loads ----------------------------------------------------------------------------------------------
    def start_load(self, job: LoadJob, cache: torch.Tensor) -> None:
        with self._lock:
            self._cancelled.discard(job.request_id)
        self._loads.submit(job, cache)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def poll_loads(self) -> list[LoadDone]:
        done = self._loads.poll()
        with self._lock:
            for d in done:
                self._cancelled.discard(d.request_id)
        return done

    # -- saves ----------------------------------------------------------------------------------------------
    def start_save(self, job: SaveJob, cache: torch.Tensor) -> None:
        n = len(job.block_hashes) * self.block_bytes
        with self._lock:
            self.queue.queued_bytes += n
            self.queue.in_flight[job.request_id] = n
        self._saves.submit(job, cache)

    def poll_saves(self) -> list[SaveDone]:
        done = self._saves.poll()
        with self._lock:
            for d in done:
                self.queue.queued_bytes -= self.queue.in_flight.pop(d.request_id, 0)
        return done

    # -- not a transfer target ----------------------------------------------------------------------------
    def target(self) -> KVTarget:
        raise NotImplementedError("the KV store is not a transfer target")

    def expect(self, reservation: KVReservationMsg) -> None:
        raise NotImplementedError("the KV store is not a transfer target")

    def refuse(self, reservation: KVReservationMsg, reason: str) -> None:
        raise NotImplementedError("the KV store is not a transfer target")

    def wait_handles(self) -> list:
        return [self._loads.wake_fd, self._saves.wake_fd]

    def close(self) -> None:
        self._loads.close()
        self._saves.close()
        if self.store is not None:
            self.store.close()
            self.store = None

    # -- on the threads -------------------------------------------------------------------------------------
    def _load(self, job: LoadJob, cache: torch.Tensor) -> LoadDone:
        block_size = cache.shape[3]
        with self._lock:
            if job.request_id in self._cancelled:
                return LoadDone(job.request_id, False, error="cancelled")
        try:
            n = self.store.load(job.block_hashes, cache, job.block_ids)
        except (OSError, RuntimeError, ValueError) as e:
            logger.warning("KV store: the load of %s failed: %s", job.request_id, e)
            self.queue.num_failed += 1
            return LoadDone(job.request_id, False, error=str(e))
        return LoadDone(job.request_id, n > 0, kv_bytes=n * self.store.ns.block_bytes, num_tokens=n * block_size,
                        error="" if n else "the blocks left the store", finished_at=time.monotonic())

    def _save(self, job: SaveJob, cache: torch.Tensor) -> SaveDone:
        try:
            written = self.store.save(job.block_hashes, cache, job.src_block_ids)
        except (OSError, RuntimeError, ValueError) as e:
            logger.warning("KV store: the save of %s failed: %s", job.request_id, e)
            self.queue.num_failed += 1
            return SaveDone(job.request_id, False, num_blocks=len(job.block_hashes), error=str(e))
        return SaveDone(job.request_id, True, written, num_blocks=len(job.block_hashes))
