"""A worker: one EngineCore in a busy loop behind ZMQ, carrying out the hand-off's actions.

The loop (``Worker.run``): poll the control socket and the KV connector (without waiting while the engine
has work), apply what arrived, run one engine step, send its outputs. The hand-off itself is decided by the
pure state machines of ``pdserve.flow`` (``DecodeSide`` for requests whose prompt comes from a prefill
worker, ``PrefillSide`` for requests this worker computes for a decode worker); this module only carries out
their actions: messages to the frontend, connector loads and saves, engine calls. A bad message gets an
``ErrorMsg`` back and never stops the loop.

Roles: ``both`` computes prompts and tokens; ``prefill`` computes prompts and sends their KV to the decode
worker whose reservation the frontend forwards; ``decode`` reserves blocks for a remote prefill, waits for the
KV, then generates (a request without ``remote_kv`` it computes itself).

(Over 400 lines: the loop and the executors of the hand-off's actions share the engine, the control socket
and the connectors; the KV store, heartbeats, stats, tracing and wire formats are store_io.py, heartbeat.py,
stats.py, trace.py and wire.py.)
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import msgspec
import zmq

from pdserve import protocol as p
from pdserve import security
from pdserve.engine.core import EngineCore
from pdserve.engine.outputs import EngineOutput
from pdserve.errors import InvalidRequestError, PdserveError
from pdserve.flow import decode as fd
from pdserve.flow import prefill as fp
from pdserve.flow.decode import DecodeSide
from pdserve.flow.prefill import PrefillSide
from pdserve.config import KVStoreConfig
from pdserve.kv.blocks import block_digest
from pdserve.kv.connector import ConnectorConfig, KVConnector, SaveJob
from pdserve.kv.layerwise import LayerwiseSaves
from pdserve.kv.registry import make_connector
from pdserve.runtime import move_to_cores
from pdserve.sampling_params import SamplingParams
from pdserve.worker.busy import BusyMeter, device_info
from pdserve.worker.heartbeat import Heartbeats
from pdserve.worker.stats import WorkerStats
from pdserve.worker.store_io import WorkerStore
from pdserve.worker.trace import WorkerTracer
from pdserve.worker.wire import logprobs_from_wire, logprobs_to_wire, output_to_wire

logger = logging.getLogger(__name__)

PENDING_POLL_MS = 2  # the longest wait while a load is pending on a connector with no handle to watch


@dataclass(frozen=True)
class WorkerOptions:
    role: str = "both"
    host: str = "127.0.0.1"
    port: int = 0  # control socket; 0: the OS picks
    kv_connector: str = "shm"  # decode/both: how prefill workers reach this worker's cache (kv/registry.py)
    kv_port: int = 0
    kv_layerwise: bool = True  # prefill: stream a prompt's KV layer by layer as computed (else whole, at the end)
    worker_id: str = ""  # default: role@host:port
    transfer_timeout_s: float = 30.0  # decode: a reservation not filled by then falls back to local prefill
    hold_timeout_s: float = 120.0  # prefill: KV held this long without a reservation is released
    stats_interval_s: float = 0.5  # Stats messages (also the heartbeat)
    log_stats_interval_s: float = 10.0  # the INFO stats line
    idle_poll_ms: int = 100
    trace_path: str | None = None  # write an event trace here (worker/trace.py; `pdserve profile --live`)
    cpus: tuple[int, ...] | None = None  # the cores the launcher pinned it to (None: not pinned)
    kv_store: KVStoreConfig | None = None  # the KV store tiers beside the engine's cache (kv/store/)

    def __post_init__(self) -> None:
        if self.role not in p.ROLES:
            raise ValueError(f"role must be one of {p.ROLES}, got {self.role!r}")
        if self.transfer_timeout_s <= 0 or self.hold_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")


class Worker:
    def __init__(self, core: EngineCore | None, options: WorkerOptions, *, engine_factory=None) -> None:
        """``engine_factory(kv_cache_allocator) -> EngineCore`` builds the engine once the KV connector
        exists (a connector that places caches allocates it); pass ``core`` directly otherwise."""
        self.options = options
        self.context = zmq.Context.instance()
        self.control = self.context.socket(zmq.ROUTER)
        for opt in (zmq.LINGER, zmq.SNDHWM, zmq.RCVHWM, zmq.ROUTER_MANDATORY):
            self.control.setsockopt(opt, 0)
        self.address = security.bind(self.control, options.host, options.port)
        self.worker_id = options.worker_id or f"{options.role}@{self.address.removeprefix('tcp://')}"
        self.connector = make_connector(options.kv_connector,
                                        ConnectorConfig(self.worker_id, options.host, options.kv_port))
        # Every worker that can be a KV target is one, whatever its role: a role is what the router sends
        # it, and the elastic controller may change it at any time (Configure).
        self.is_target = self.connector.capabilities.is_target
        self.role = options.role
        self.cpus = list(options.cpus) if options.cpus is not None else None
        self._costs_cores = len(self.cpus or ())  # the cores its step costs were learned on (0: unknown)
        try:
            if self.is_target:
                self.connector.listen()
            if core is None:
                assert engine_factory is not None
                places = self.is_target and self.connector.capabilities.places_cache
                core = engine_factory(self.connector.allocate_cache if places else None)
        except BaseException:
            self.connector.close()  # removes a placed cache's shared-memory file
            self.control.close(0)
            raise
        self.core = core
        self.device = device_info(core.backend, core.device)
        self.busy = BusyMeter.for_engine(core.arch, core.dtype, self.device.hardware, self._num_cores())
        self.connector.register_cache(core.kv_cache)
        self.kv_target = self.connector.target() if self.is_target else None
        self.decode = DecodeSide(options.transfer_timeout_s, self.connector.capabilities.writes_remotely)
        self.prefill = PrefillSide(options.hold_timeout_s, stream=options.kv_layerwise)
        self.layer_saves = LayerwiseSaves(core.kv_cache)
        if options.kv_layerwise:
            core.layer_saves = self.layer_saves
            self.layer_saves.between_layers = self._reservations_mid_step
        self._deferred: list[tuple[bytes, bytes]] = []  # messages read inside a step, for after it
        self._deferred_rids: set[str] = set()  # ... and the requests they concern
        self._sources: dict[str, KVConnector] = {self.connector.name: self.connector}
        self._peers: set[bytes] = set()
        self.heartbeats = Heartbeats(self.worker_id)
        self._owner: dict[str, bytes] = {}  # request id -> frontend identity
        self._stop = False
        self.stats = WorkerStats(self.worker_id, options.role, options.log_stats_interval_s)
        self._last_stats_s = 0.0
        self._trace = WorkerTracer(options.trace_path, self.worker_id, options.role)
        self._trace.attach(core)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self._watch(self.connector)
        self.store: WorkerStore | None = None  # the KV store tiers beside the cache, when configured
        if options.kv_store is not None and options.kv_store.enabled:
            self.store = WorkerStore(core, options.kv_store, self.worker_id, options.host, self._route_outputs,
                                     self._abort_engine)
            self._watch(self.store.connector)

    # -- public --------------------------------------------------------------------------------------
    def info(self) -> p.WorkerInfo:
        return p.WorkerInfo(self.worker_id, self.role, self.core.config.model.model, os.getpid(),
                            socket.gethostname(), self.core.block_size, self.core.num_blocks,
                            self.core.max_model_len, self.connector.name if self.is_target else "",
                            list(self.core.arch.eos_token_ids), self.cpus, self.core.prefill_budget.target_step_s,
                            self.device.device_type, self.device.device_name, self.device.num_cores,
                            self.device.hardware, str(self.core.kv_dtype).removeprefix("torch."))

    def ready_record(self) -> dict:
        """What the launcher reads: where to reach this worker."""
        return {"event": "worker_ready", "worker_id": self.worker_id, "role": self.role,
                "address": self.address, "kv_address": self.kv_target.address if self.kv_target else None,
                "pid": os.getpid(), "num_blocks": self.core.num_blocks}

    def run(self) -> None:
        """The busy loop, until ``stop()`` (from a signal handler) or a Shutdown message."""
        logger.info("worker %s (%s) serving on %s", self.worker_id, self.role, self.address)
        while not self._stop:
            events = dict(self.poller.poll(self._poll_timeout_ms()))
            self._trace.loop_start()
            if self._deferred or self.control in events:
                self._drain_control()
            self._poll_connectors()
            self._expire()
            outputs = self._step()
            if self.store is not None:
                self.store.start_io()  # the saves of requests this step finished
            self._trace.step_end()
            self._send_reservations()
            self._route_outputs(outputs)
            self._trace.iteration_end(len(outputs), self.core.has_unfinished_requests())
            self._maybe_send_stats()

    def stop(self) -> None:
        self._stop = True

    def _step(self) -> list[EngineOutput]:
        if not self.core.has_unfinished_requests():
            return []
        start = time.monotonic()
        outputs = self.core.step()
        self.busy.record(self.core.last_chunks, time.monotonic() - start, self.role)
        return outputs

    def _num_cores(self) -> int:
        """The cores this worker runs on now (none parked; unpinned: every core it may use; 0: accelerator)."""
        return len(self.cpus) if self.cpus is not None and self.device.device_type == "cpu" else \
            self.device.num_cores

    def close(self) -> None:
        self.heartbeats.close()
        self._trace.close()
        if self.store is not None:
            self.store.close()
        for connector in self._sources.values():
            connector.close()
        if self.connector.name not in self._sources:
            self.connector.close()
        self.control.close(0)

    # -- control channel -----------------------------------------------------------------------------
    def _drain_control(self) -> None:
        deferred, self._deferred = self._deferred, []  # first what arrived during the last step, in order
        self._deferred_rids.clear()
        for identity, payload in deferred:
            self._dispatch(identity, payload)
        while True:
            try:
                identity, payload = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames
                continue
            self._dispatch(identity, payload)

    def _reservations_mid_step(self) -> None:
        """Between two layers of a step that computes held prompts: a forwarded reservation that only starts
        a stream is taken now, so the layers after this one go as they are computed; every other message
        (and one for a request a deferred message concerns) waits for the step's end, in order."""
        while True:
            try:
                identity, payload = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames
                continue
            try:
                msg = p.decode_to_worker(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                msg = None  # answered after the step
            if isinstance(msg, p.ForwardReservation) and msg.reservation.request_id not in self._deferred_rids \
                    and self.prefill.streams_on_reservation(msg.reservation.request_id):
                self._execute_prefill(self.prefill.reservation(msg.reservation))  # StartStream only
                continue
            self._deferred.append((identity, payload))
            self._deferred_rids.update(_request_ids(msg))

    def _dispatch(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = p.decode_to_worker(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self._send(identity, p.ErrorMsg(None, "invalid_request_error", f"malformed message: {e}"))
            return
        try:
            self._handle(identity, msg)
        except PdserveError as e:  # the request's own problem: nothing was registered for it
            rid = getattr(msg, "request_id", None)
            self._send(identity, p.ErrorMsg(rid, e.error_type, str(e), getattr(e, "param", None), e.http_status))

    def _handle(self, identity: bytes, msg) -> None:
        if isinstance(msg, p.AddRequest):
            self._add_request(identity, msg)
        elif isinstance(msg, p.Abort):
            self._abort(msg.request_ids)
        elif isinstance(msg, p.ForwardReservation):
            self._execute_prefill(self.prefill.reservation(msg.reservation))
        elif isinstance(msg, p.FailRemoteKV):
            self._execute_decode(self.decode.prefill_failed(msg.request_id, msg.reason))
        elif isinstance(msg, p.Hello):
            self._peers.add(identity)
            self.heartbeats.add(msg.heartbeat_address)
            self._send(identity, self.info())
            self._last_stats_s = 0.0
        elif isinstance(msg, p.KVDigestRequest):
            self._send(identity, p.KVDigestReply(self.worker_id, msg.query_id, self._digests(msg.block_hashes)))
        elif isinstance(msg, p.CheckIntegrity):
            try:
                self.core.scheduler.check_integrity()
                error = ""
            except AssertionError as e:  # the report is the point: the worker goes on
                error = f"AssertionError: {e}"
            self._send(identity, p.IntegrityReply(self.worker_id, msg.query_id, error))
        elif isinstance(msg, p.Configure):
            self._configure(msg)
            self._send(identity, self.info())
        elif isinstance(msg, p.Shutdown):
            self._stop = True

    def _rescale_step_costs(self, num_cores: int) -> None:
        """Its steps take other times on ``num_cores`` cores: what it learned on the cores it had when it
        last stepped is scaled by their ratio (compute scales with cores), then relearned."""
        learned_on = self._costs_cores
        if learned_on:
            self.core.step_costs.rescale(learned_on / num_cores)
        else:
            self.core.step_costs.reset()
        self._costs_cores = num_cores

    def _configure(self, msg: p.Configure) -> None:
        """The elastic controller's decision: a role (what the router sends here from now on: the requests
        running here finish here), cores, a step target. Each applies between two steps."""
        if msg.role is not None:
            if msg.role not in p.ROLES:
                raise InvalidRequestError(f"role must be one of {p.ROLES}, got {msg.role!r}")
            logger.info("worker %s: role %s -> %s", self.worker_id, self.role, msg.role)
            self.role = msg.role
        if msg.cpus is not None:
            if msg.cpus:
                move_to_cores(msg.cpus)
                self._rescale_step_costs(len(msg.cpus))
            logger.info("worker %s: cores %s -> %s", self.worker_id, self.cpus, msg.cpus or "none (parked)")
            self.cpus = list(msg.cpus)
            self.busy.set_cores(self._num_cores())
        if msg.set_step_target:
            self.core.set_step_target(msg.step_target_s)
            logger.info("worker %s: step target %s", self.worker_id,
                        "none" if msg.step_target_s is None else f"{msg.step_target_s * 1e3:.1f} ms")

    def _add_request(self, identity: bytes, msg: p.AddRequest) -> None:
        """Validates, then registers the request last (a refusal leaves nothing behind)."""
        rid = msg.request_id
        if rid in self._owner:
            raise InvalidRequestError(f"duplicate request id {rid!r}")
        if msg.remote_kv and not self.is_target:
            raise InvalidRequestError(f"remote_kv needs a KV connector that can receive; {self.worker_id}'s "
                                      f"({self.connector.name}) cannot")
        if msg.remote_kv and msg.hold_kv:
            raise InvalidRequestError("a request is either held for a send (hold_kv) or received (remote_kv)")
        params = SamplingParams(**msgspec.structs.asdict(msg.params))  # InvalidRequestError naming the field
        self.core.add_request(rid, msg.prompt_token_ids, params, remote_kv=msg.remote_kv, hold_kv=msg.hold_kv)
        self._owner[rid] = identity
        self._trace.emit("add", rid=rid, t=round(time.monotonic(), 6), remote_kv=msg.remote_kv, hold_kv=msg.hold_kv)
        if msg.hold_kv:
            self.prefill.add(rid)
            if self.options.kv_layerwise:
                self.layer_saves.track(rid)
        if msg.remote_kv:
            self.decode.add(rid)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if rid in self.decode:
                self._execute_decode(self.decode.abort(rid))
            elif rid in self.prefill:
                self._execute_prefill(self.prefill.abort(rid))
            else:
                self._abort_engine(rid)

    def _abort_engine(self, rid: str) -> None:
        self.layer_saves.forget(rid)
        if self.store is not None and rid in self.store:  # its load may still write into its blocks: abort
            self.store.abort(rid)                            # when it reports
            return
        self.core.abort_requests([rid])
        self._owner.pop(rid, None)
        self._trace.forget(rid)

    # -- the KV connector ----------------------------------------------------------------------------
    def _poll_connectors(self) -> None:
        if self.is_target:
            for load in self.connector.poll_loads():
                self._execute_decode(self.decode.loaded(load))
        if self.store is not None:
            self.store.poll(self.stats, self._trace)
        for connector in self._sources.values():
            for done in connector.poll_saves():
                self.stats.on_save(done)
                self._trace.emit("kv_send", rid=done.request_id, s=round(done.finished_at - done.seconds, 6),
                                 e=round(done.finished_at, 6), bytes=done.kv_bytes,
                                 tokens=done.num_blocks * self.core.block_size, ok=done.ok)
                self._execute_prefill(self.prefill.saved(done))

    def _source(self, name: str) -> KVConnector:
        """The connector that sends to targets advertising ``name`` (created on first use)."""
        connector = self._sources.get(name)
        if connector is None:
            connector = make_connector(name, ConnectorConfig(self.worker_id, self.options.host))
            connector.register_cache(self.core.kv_cache)
            self._sources[name] = connector
        return connector

    def _watch(self, connector: KVConnector) -> None:
        """Have the poller watch the connector's handles (it may open more on its first save)."""
        for handle in connector.wait_handles():
            try:
                self.poller.modify(handle, zmq.POLLIN)
            except KeyError:
                self.poller.register(handle, zmq.POLLIN)

    def _poll_timeout_ms(self) -> int:  # the store's loads and saves wake the poller (their handles)
        if self.core.has_unfinished_requests():
            return 0
        if len(self.decode) and not self.connector.wait_handles():
            return PENDING_POLL_MS
        return self.options.idle_poll_ms

    # -- carrying out the hand-off's actions -----------------------------------------------------------
    def _execute_decode(self, actions: list[fd.DecodeAction]) -> None:
        for a in actions:
            if isinstance(a, fd.SendReservation):
                rid = a.reservation.request_id
                self.connector.expect(a.reservation)
                self._send_owner(rid, a.reservation)
                self._trace.emit("reserve", rid=rid, t=round(time.monotonic(), 6))
            elif isinstance(a, fd.JoinBatch):
                logprobs = logprobs_from_wire(a.first_logprobs[0]) if a.first_logprobs else None
                out = self.core.finish_load(a.request_id, a.first_token_id, logprobs)
                self._trace.emit("kv_recv", rid=a.request_id, t=round(time.monotonic(), 6))
                if out is not None:
                    self._route_outputs([out])
            elif isinstance(a, fd.ComputeLocally):
                logger.info("request %s: computing the prompt here (%s)", a.request_id, a.reason)
                self.connector.cancel(a.request_id)
                self.core.fail_load(a.request_id)
            elif isinstance(a, fd.AbortNow):
                self.connector.cancel(a.request_id)
                self._abort_engine(a.request_id)

    def _execute_prefill(self, actions: list[fp.PrefillAction]) -> None:
        for a in actions:
            if isinstance(a, fp.StartSave):
                self._trace.emit("reservation", rid=a.request_id, t=round(time.monotonic(), 6), done=True)
                connector = self._source(a.reservation.target.connector)
                streamed = self.layer_saves.finish(a.request_id, a.block_ids)
                connector.start_save(SaveJob(a.request_id, a.block_ids, a.reservation, a.first_token_id,
                                             a.first_logprobs, streamed=streamed), self.core.kv_cache)
                self._watch(connector)
            elif isinstance(a, fp.StartStream):
                self._trace.emit("stream", rid=a.request_id, t=round(time.monotonic(), 6))
                connector = self._source(a.reservation.target.connector)
                if connector.capabilities.layerwise:
                    self.layer_saves.open(a.request_id, connector, a.reservation)
                    self._watch(connector)
            elif isinstance(a, fp.Refuse):
                self._source(a.reservation.target.connector).refuse(a.reservation, a.reason)
            elif isinstance(a, fp.ReleaseBlocks):
                self.layer_saves.forget(a.request_id)
                self.core.release_kv(a.request_id)
            elif isinstance(a, fp.ReportDone):
                owner = self._owner.pop(a.request_id, None)
                if owner is not None:
                    self._send(owner, p.PrefillDone(a.request_id, a.ok, a.first_token_id, a.num_cached_tokens,
                                                    a.kv_bytes, a.seconds, a.error))
            elif isinstance(a, fp.AbortNow):
                self._abort_engine(a.request_id)

    def _send_reservations(self) -> None:
        now = time.time()
        for r in self.core.take_reservations():  # a store load's reservation is the store's (_start_store_io)
            if self.kv_target is not None and r.request_id in self.decode:
                self._execute_decode(self.decode.reserved(r, self.kv_target, now))

    def _expire(self) -> None:
        if len(self.decode):
            self._execute_decode(self.decode.expire(time.time()))
        if len(self.prefill):
            self._execute_prefill(self.prefill.expire(time.monotonic()))

    # -- outputs -------------------------------------------------------------------------------------
    def _route_outputs(self, outputs: list[EngineOutput]) -> None:
        batches: dict[bytes, list[p.TokenOutput]] = {}
        for out in outputs:
            rid = out.request_id
            if rid in self.prefill:  # the first token goes to the decode worker with the KV
                if out.finish_reason == "abort" or not out.new_token_ids:
                    self.prefill.ended_without_output(rid)
                    self.layer_saves.forget(rid)
                    self._owner.pop(rid, None)
                    continue
                self._execute_prefill(self.prefill.computed(
                    rid, out.kv_block_ids or [], out.new_token_ids[0], logprobs_to_wire(out.new_logprobs),
                    out.num_cached_tokens, time.monotonic()))
                continue
            owner = self._owner.get(rid)
            if owner is None:
                continue
            batches.setdefault(owner, []).append(output_to_wire(out))
            self._trace.first_token(rid)
            if out.finished:
                del self._owner[rid]
                self._trace.forget(rid)
        for owner, batch in batches.items():
            self._send(owner, p.Outputs(batch))

    def _maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats_s < self.options.stats_interval_s:
            return
        self._last_stats_s = now
        s = self.core.stats()
        stats = self.stats.message(s, len(self.prefill), self.role, self.cpus, self.busy,
                                   self.store.connector if self.store is not None else None)
        stored, evicted = self.core.take_kv_events()
        events = [p.KVEvents(self.worker_id, stored, evicted)] if stored or evicted else []
        if self.store is not None:
            events += self.store.kv_events()
        for peer in self._peers:
            self._send(peer, stats)
            for event in events:
                self._send(peer, event)
        self.stats.maybe_log(s, len(self.prefill), now)

    def _digests(self, block_hashes: list[int]) -> list[str]:
        digests = []
        for h in block_hashes:
            block = self.core.kv.pool.get_cached_block(h)
            digests.append("" if block is None else block_digest(self.core.kv_cache, block.block_id))
        return digests

    def _send_owner(self, rid: str, msg) -> None:
        owner = self._owner.get(rid)
        if owner is not None:
            self._send(owner, msg)

    def _send(self, identity: bytes, msg) -> None:
        try:
            self.control.send_multipart([identity, p.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("cannot send %s: %s", type(msg).__name__, e)


def _request_ids(msg) -> list[str]:
    """The requests a control message concerns."""
    if isinstance(msg, p.Abort):
        return list(msg.request_ids)
    if isinstance(msg, p.ForwardReservation):
        return [msg.reservation.request_id]
    rid = getattr(msg, "request_id", None)
    return [rid] if rid else []
