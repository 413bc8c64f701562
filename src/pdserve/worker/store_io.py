"""A worker's KV store (kv/store/, docs/kv_store.md): the store connector, its scheduler side in the engine,
and the store's loads and saves carried out. ``flow/store.py`` decides what each load's or save's end means
(continue the prefill, compute the prompt, abort, release); this module acts on it for the worker."""
from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Callable

from pdserve import protocol as p
from pdserve.config import KVStoreConfig, ModelConfig
from pdserve.flow import store as fs
from pdserve.flow.store import StoreLoads
from pdserve.kv.connector import ConnectorConfig, LoadJob, SaveJob
from pdserve.kv.registry import make_connector
from pdserve.kv.store.scheduler_side import StoreExternal

if TYPE_CHECKING:
    from pdserve.engine.core import EngineCore, EngineOutput
    from pdserve.worker.stats import WorkerStats
    from pdserve.worker.trace import WorkerTracer

logger = logging.getLogger(__name__)


class WorkerStore:
    """Opens the store tiers of ``config`` beside ``core``'s cache; ``route_outputs`` takes a load's first
    outputs, ``abort_engine(rid)`` ends a request whose load was aborted."""

    def __init__(self, core: EngineCore, config: KVStoreConfig, worker_id: str, host: str,
                 route_outputs: Callable[[list[EngineOutput]], None], abort_engine: Callable[[str], None]) -> None:
        self.core, self.config, self.worker_id = core, config, worker_id
        self._route_outputs, self._abort_engine = route_outputs, abort_engine
        self.connector = make_connector("store", ConnectorConfig(worker_id, host, store=config,
                                                                 model=model_identity(core.config.model)))
        self.connector.register_cache(core.kv_cache)
        self.side = StoreExternal(core.block_size, self.connector.lookup, self.connector.num_savable)
        core.add_external("store", self.side)
        self.flow = StoreLoads()
        observer = core.schedule_observer  # loads start as soon as the step is scheduled, before it runs

        def on_schedule(sched) -> None:
            if observer is not None:
                observer(sched)
            self.start_io()

        core.schedule_observer = on_schedule

    def __contains__(self, request_id: str) -> bool:
        """Whether a store load may still write into the request's blocks."""
        return request_id in self.flow

    def abort(self, request_id: str) -> None:
        """Abort a request with a load in flight (its end waits for the load's report)."""
        self._execute(self.flow.abort(request_id))

    def start_io(self) -> None:
        """Start the loads the scheduler asked for and the saves of requests that finished."""
        cache = self.core.kv_cache
        for load in self.side.take_loads():
            self.flow.started(load.request_id)
            self.connector.start_load(LoadJob(load.request_id, load.block_ids, load.block_hashes), cache)
        for save in self.side.take_saves():
            self.flow.saving(save.request_id)
            self.connector.start_save(SaveJob(save.request_id, save.block_ids, None,
                                              block_hashes=save.block_hashes), cache)

    def poll(self, stats: WorkerStats, trace: WorkerTracer) -> None:
        """Carry out the loads and saves that ended since the last call."""
        for load in self.connector.poll_loads():
            stats.on_store_load(load)
            trace.emit("kv_load", rid=load.request_id, e=round(load.finished_at, 6), bytes=load.kv_bytes,
                       tokens=load.num_tokens, ok=load.ok)
            self._execute(self.flow.loaded(load))
        for done in self.connector.poll_saves():
            self._execute(self.flow.saved(done))

    def kv_events(self) -> list[p.KVEvents]:
        """What the tiers stored and evicted since the last call, for the router's store index."""
        host = socket.gethostname()
        return [p.KVEvents(self.worker_id, e.stored, e.evicted, e.tier,
                           self.config.remote if e.tier == "remote" else host)
                for e in self.connector.take_events()]

    def close(self) -> None:
        self.connector.close()

    def _execute(self, actions: list[fs.StoreAction]) -> None:
        for a in actions:
            if isinstance(a, fs.Continue):
                out = self.core.finish_load(a.request_id, num_loaded_tokens=a.num_tokens)
                if out is not None:
                    self._route_outputs([out])
            elif isinstance(a, fs.ComputeLocally):
                logger.info("request %s: computing its prompt (%s)", a.request_id, a.reason)
                self.core.fail_load(a.request_id)
            elif isinstance(a, fs.AbortNow):
                self._abort_engine(a.request_id)
            elif isinstance(a, fs.Release):
                self.core.release_kv(a.request_id, "store")


def model_identity(model: ModelConfig) -> str:
    """What makes a worker's KV: the checkpoint (or known name), how it is loaded, and a dummy model's seed."""
    seed = f"|seed={model.seed}" if model.load_format == "dummy" else ""
    return f"{model.model}|{model.load_format}{seed}"
