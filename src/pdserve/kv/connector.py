"""The KV connector seam, worker side: what a worker process calls to move KV blocks in and out of its cache.

One ``KVConnector`` per worker and connector kind. A decode worker (the *target*) opens its data plane with
``listen``, may let the connector place its cache (``allocate_cache``, capability ``places_cache``), advertises
``target()`` in the reservations it sends, is told what to ``expect``, and collects finished loads from
``poll_loads``. A prefill worker (the *source*) starts a save of a finished request's blocks into a target's
reserved blocks with ``start_save`` (asynchronous: it returns at once) and collects finished saves from
``poll_saves``; only then may it free the blocks. Nothing here blocks the engine step.

Layer-wise streaming (capability ``layerwise``): a source may be handed a request's KV one layer at a time,
while the prompt is still being computed (``save_layer``: that layer's blocks as the forward pass of a
chunk of the prompt wrote them), so the transfer of earlier layers and chunks overlaps the compute of later
ones; the request's ``start_save`` then only closes the stream (``SaveJob.streamed``: the notice with the
first token, which the target takes as "every layer of every block has landed"). ``kv.layerwise`` keeps
track of what was computed and sent; a source that is not layer-wise gets the whole request at the end.

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
import socket
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

NODE_ENV = "PDSERVE_NODE"


def node_name() -> str:
    """The node this process runs on, as KV targets name it (``KVTarget.host``): ``PDSERVE_NODE`` where a
    launcher placed the worker on a node of its own (Ray: the node's id, so that several Ray nodes on one
    machine are still different nodes), else the host name. Connectors that need a shared host (shared
    memory, CUDA IPC) are used only between workers of the same node."""
    return os.environ.get(NODE_ENV) or socket.gethostname()


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
    streamed: bool = False  # every block of every layer went out by ``save_layer``: only the notice is left


@dataclass
class LoadJob:
    """A store load: the blocks under ``block_hashes`` into the local cache's ``block_ids`` (same order)."""

    request_id: str
    block_ids: list[int]
    block_hashes: list[int]


@dataclass
class LayerJob:
    """Layers ``[layer_start, layer_end)`` of a request's blocks ``src_block_ids`` (the local cache) into the
    target's ``dst_block_ids`` of ``reservation``, computed and ready to go. ``ready``: the event the
    compute stream recorded once they were written (``kv.staging.Staging.mark``; None on CPU)."""

    request_id: str
    reservation: KVReservationMsg
    layer_start: int
    layer_end: int
    src_block_ids: list[int]
    dst_block_ids: list[int]
    ready: object = None


class KVConnector(abc.ABC):
    """Worker side of a connector. Every method is called from the worker's loop thread; a connector may
    run its own threads behind them."""

    name: ClassVar[str] = ""  # set by the registry: what ``KVTarget.connector`` names
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities()

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self.cache: torch.Tensor | None = None

    @classmethod
    def can_reach(cls, target: KVTarget, cache: torch.Tensor) -> bool:
        """Whether a source with ``cache`` (on its device) can send to ``target`` this way (a connector that
        needs a shared host: only on the target's node)."""
        return not cls.capabilities.same_host_only or not target.host or target.host == node_name()

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

    def save_layer(self, job: LayerJob, cache: torch.Tensor) -> None:
        """Capability ``layerwise``: start sending ``job``'s layers of ``cache``; returns at once. Jobs of one
        request go out in order, before its ``start_save`` (``SaveJob.streamed``), which reports a failure
        of any of them. A block may be sent again (a block the next chunk of the prompt fills further): the
        last copy wins."""
        raise NotImplementedError(f"{type(self).__name__} does not save layer by layer")

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
