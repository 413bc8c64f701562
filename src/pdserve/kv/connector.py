"""The KV connector seam, worker side: what a worker process calls to move KV blocks in and out of its cache.

One ``KVConnector`` per worker and connector kind. A decode worker (the *target*) opens its data plane with
``listen``, may let the connector place its cache (``allocate_cache``, capability ``places_cache``), advertises
``target()`` in the reservations it sends, is told what to ``expect``, and collects finished loads from
``poll_loads``. A prefill worker (the *source*) starts a save of a finished request's blocks into a target's
reserved blocks with ``start_save`` (asynchronous: it returns at once) and collects finished saves from
``poll_saves``; only then may it free the blocks. Nothing here blocks the engine step.

The rules every connector keeps (the base class keeps the first two for its subclasses): a load is reported
ok only for blocks that match the request's current reservation; a source never writes after the
reservation's deadline; a target that ``cancel``s a request never writes a late arrival for it into its cache.
Connectors are found by name in ``kv.registry`` (``module:Class`` for out-of-tree ones).

A store connector (capability ``is_store``, ``kv.store.connector``) moves blocks by hash instead: the worker
``start_load``s a request's blocks that the scheduler side found in the store and ``start_save``s a finished
request's blocks (``SaveJob.block_hashes``, no reservation); both report as above.
"""
from __future__ import annotations

import abc
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pdserve.config import KVStoreConfig
from pdserve.kv.base import ConnectorCapabilities, LoadDone, SaveDone
from pdserve.protocol import KVReservationMsg, KVTarget

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectorConfig:
    """Where a connector runs: the worker's id, the interface (and port, 0: any) its data plane binds; a store
    connector's tiers (``store``) and the identity of the model whose blocks it keeps (``model``)."""

    worker_id: str
    host: str = "127.0.0.1"
    port: int = 0
    store: KVStoreConfig | None = None
    model: str = ""


@dataclass
class SaveJob:
    """One request's KV to send: blocks ``src_block_ids[k:]`` of the local cache into
    ``reservation.block_ids[k:]`` of the target, ``k = reservation.num_cached_tokens // block_size`` (the
    target's own prefix hits), with the first token the source sampled. To a store: no reservation, the
    blocks ``src_block_ids`` under ``block_hashes``."""

    request_id: str
    src_block_ids: list[int]
    reservation: KVReservationMsg | None
    first_token_id: int = -1
    first_logprobs: list | None = None
    block_hashes: list[int] = field(default_factory=list)


@dataclass
class LoadJob:
    """A store load: the blocks under ``block_hashes`` into the local cache's ``block_ids`` (same order)."""

    request_id: str
    block_ids: list[int]
    block_hashes: list[int]


class KVConnector(abc.ABC):
    """Worker side of a connector. Every method is called from the worker's loop thread; a connector may
    run its own threads behind them."""

    name: ClassVar[str] = ""  # set by the registry: what ``KVTarget.connector`` names
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities()

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self.cache: torch.Tensor | None = None

    # -- the cache ----------------------------------------------------------------------------------------
    def allocate_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The engine's KV cache allocator (capability ``places_cache`` only): a zeroed tensor."""
        raise NotImplementedError(f"{type(self).__name__} does not place the KV cache")

    def register_cache(self, cache: torch.Tensor) -> None:
        """The engine's cache, once built (whoever allocated it)."""
        self.cache = cache

    # -- target side ----------------------------------------------------------------------------------------
    def listen(self) -> None:
        """Open the data plane so that sources can reach this worker (decode workers; before ``target``)."""

    @abc.abstractmethod
    def target(self) -> KVTarget:
        """How a source reaches this worker's cache (after ``listen`` and ``register_cache``)."""

    @abc.abstractmethod
    def expect(self, reservation: KVReservationMsg) -> None:
        """A reservation went out: a load for its blocks may arrive until its deadline."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Forget the request's reservation: a later arrival for it is dropped, never written."""

    @abc.abstractmethod
    def poll_loads(self) -> list[LoadDone]:
        """Loads finished since the last call (non-blocking); ``ok`` ones are in the cache already."""

    # -- source side ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def start_save(self, job: SaveJob, cache: torch.Tensor) -> None:
        """Start sending ``job``'s blocks of ``cache``; returns at once. Its blocks must stay allocated until
        its ``SaveDone`` comes out of ``poll_saves``. A failure is a ``SaveDone`` with ``ok`` false (and the
        target told, so it computes the prompt itself), never an exception."""

    def start_load(self, job: LoadJob, cache: torch.Tensor) -> None:
        """A store connector (``is_store``): start loading ``job``'s blocks into ``cache``; returns at once, and
        the ``LoadDone`` (its ``num_tokens``: the leading tokens that landed) comes out of ``poll_loads``."""
        raise NotImplementedError(f"{type(self).__name__} does not load blocks by hash")

    @abc.abstractmethod
    def poll_saves(self) -> list[SaveDone]:
        """Saves finished since the last call (non-blocking)."""

    @abc.abstractmethod
    def refuse(self, reservation: KVReservationMsg, reason: str) -> None:
        """Tell the reservation's target that no data will come (it computes the prompt itself)."""

    # -- the worker loop ------------------------------------------------------------------------------------
    def wait_handles(self) -> list:
        """ZMQ sockets or file descriptors that become readable when ``poll_loads``/``poll_saves`` may have
        news (the worker's poller watches them). Empty: the worker polls every few ms while work is pending."""
        return []

    def close(self) -> None:
        """Release sockets, threads and files (a placed cache's shared-memory file included)."""


class ThreadedSaves:
    """Runs a connector's saves on one background thread, in order; finished ones come out of ``poll``, and
    a pipe wakes the worker's poller (``wake_fd``). ``send(job, cache)`` does the work and returns the
    ``SaveDone``; ``run(fn)`` queues any other source-side work (a refusal) behind the saves."""

    def __init__(self, name: str, send) -> None:
        self._send = send
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def wake_fd(self) -> int:
        return self._read_fd

    def submit(self, job: SaveJob, cache) -> None:
        self._jobs.put((job, cache))

    def run(self, fn) -> None:
        self._jobs.put((None, fn))

    def poll(self) -> list[SaveDone]:
        try:
            os.read(self._read_fd, 4096)
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10.0)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, arg = item
            if job is None:
                arg()
                continue
            t0 = time.perf_counter()
            done = self._send(job, arg)
            done.seconds = time.perf_counter() - t0
            done.finished_at = time.monotonic()
            self._done.put(done)
            try:
                os.write(self._write_fd, b"x")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already
