"""A worker: one EngineCore in a busy loop behind ZMQ.

The loop (``Worker.run``): poll the control and KV sockets (without waiting while the engine has work,
else up to ``idle_poll_ms``), apply what arrived (add / abort requests, reservations, transfer notices),
run one engine step, send its outputs. A bad message gets an ``ErrorMsg`` back and never stops the loop.

Roles: ``both`` computes prompts and tokens; ``prefill`` computes prompts with ``hold_kv`` and sends the
KV to the decode worker whose reservation the frontend forwards; ``decode`` reserves blocks for a remote
prefill (``remote_kv``), waits for the KV, then generates. See kv/transfer.py for the safety rules.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import msgspec
import zmq

from pdserve.engine.core import EngineCore
from pdserve.engine.outputs import EngineOutput, TokenLogprobs
from pdserve.errors import PdserveError
from pdserve.kv.transfer import IncomingTransfer, KVReceiver, KVSender, bind_socket, block_digest, \
    make_receiver, make_sender
from pdserve.sampling_params import SamplingParams
from pdserve.worker import protocol as p
from pdserve.worker.busy import BusyMeter, device_info
from pdserve.worker.trace import Tracer

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class WorkerOptions:
    role: str = "both"
    host: str = "127.0.0.1"
    port: int = 0  # control socket; 0: the OS picks
    kv_backend: str = "shm"  # decode/both: how prefill workers reach this worker's cache
    kv_port: int = 0
    worker_id: str = ""  # default: role@host:port
    transfer_timeout_s: float = 30.0  # decode: a reservation not filled by then falls back to local prefill
    hold_timeout_s: float = 120.0  # prefill: KV held this long without a reservation is released
    stats_interval_s: float = 0.5  # Stats messages (also the heartbeat)
    log_stats_interval_s: float = 10.0  # the INFO stats line
    idle_poll_ms: int = 100
    trace_path: str | None = None  # write an event trace here (worker/trace.py; `pdserve profile --live`)

    def __post_init__(self) -> None:
        if self.role not in p.ROLES:
            raise ValueError(f"role must be one of {p.ROLES}, got {self.role!r}")
        if self.kv_backend not in ("shm", "tcp"):
            raise ValueError(f"kv_backend must be shm or tcp, got {self.kv_backend!r}")
        if self.transfer_timeout_s <= 0 or self.hold_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")


@dataclass
class _Held:
    """Prefill role: a request whose prompt is computed (or computing) and whose KV waits to be sent."""

    output: EngineOutput | None = None
    reservation: p.KVReservationMsg | None = None
    finished_at: float = 0.0


@dataclass
class _Remote:
    """Decode role: a request whose prompt KV comes from a prefill worker."""

    reservation: p.KVReservationMsg | None = None
    aborted: bool = False  # the abort waits for the notice or the deadline (shm writes are remote)
    fail_on_reserve: bool = False


@dataclass
class _Counters:
    num_transfers: int = 0
    num_failed_transfers: int = 0
    kv_bytes: int = 0
    transfer_s: float = 0.0
    last_log_s: float = field(default_factory=time.monotonic)
    last_prompt_tokens: int = 0
    last_generation_tokens: int = 0


class Worker:
    def __init__(self, core: EngineCore | None, options: WorkerOptions, *, engine_factory=None,
                 context: zmq.Context | None = None) -> None:
        """``engine_factory(kv_cache_allocator) -> EngineCore`` builds the engine once the KV receiver
        exists (decode/both roles place their cache with it); pass ``core`` directly otherwise."""
        self.options = options
        self.context = context or zmq.Context.instance()
        self.control = self.context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.SNDHWM, 0)
        self.control.setsockopt(zmq.RCVHWM, 0)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.address = bind_socket(self.control, options.host, options.port)
        self.worker_id = options.worker_id or f"{options.role}@{self.address.removeprefix('tcp://')}"
        self.receiver: KVReceiver | None = None
        if options.role in ("decode", "both"):
            self.receiver = make_receiver(options.kv_backend, self.context, self.worker_id, options.host,
                                          options.kv_port)
        if core is None:
            assert engine_factory is not None
            try:
                core = engine_factory(self.receiver.allocate_cache if self.receiver else None)
            except BaseException:
                if self.receiver is not None:
                    self.receiver.close()  # removes the shared-memory cache file
                self.control.close(0)
                raise
        self.core = core
        self.kv_target = self.receiver.target() if self.receiver and self.receiver.cache is not None else None
        self.device = device_info(core.device)
        self._busy = BusyMeter.for_engine(core.arch, core.dtype, self.device.hardware)
        self._start_s = time.monotonic()
        self._senders: dict[str, KVSender] = {}
        self._peers: set[bytes] = set()
        self._owner: dict[str, bytes] = {}  # request id -> frontend identity
        self._held: dict[str, _Held] = {}
        self._remote: dict[str, _Remote] = {}
        self._counters = _Counters()
        self._last_stats_s = 0.0
        self._stop = False
        self._trace = Tracer(options.trace_path, self.worker_id, role=options.role)
        self._scheduled: list = []  # chunks of the last step, kept only when tracing
        self._pending_step: tuple | None = None
        self._first_sent: set[str] = set()
        self._loop_start = 0.0
        if self._trace.enabled:
            self._trace_schedules()
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        if self.receiver is not None:
            self.poller.register(self.receiver.socket, zmq.POLLIN)

    # -- public --------------------------------------------------------------------------------------
    def info(self) -> p.WorkerInfo:
        return p.WorkerInfo(self.worker_id, self.options.role, self.core.config.model.model, os.getpid(),
                            socket.gethostname(), self.core.block_size, self.core.num_blocks,
                            self.core.max_model_len, self.receiver.backend if self.receiver else "",
                            list(self.core.arch.eos_token_ids), self.device.device_type, self.device.device_name,
                            self.device.num_cores, self.device.hardware)

    def ready_record(self) -> dict:
        """What the launcher reads: where to reach this worker."""
        return {"event": "worker_ready", "worker_id": self.worker_id, "role": self.options.role,
                "address": self.address, "kv_address": self.receiver.address if self.receiver else None,
                "pid": os.getpid(), "num_blocks": self.core.num_blocks}

    def run(self) -> None:
        """The busy loop, until ``stop()`` (from a signal handler) or a Shutdown message."""
        logger.info("worker %s (%s) serving on %s", self.worker_id, self.options.role, self.address)
        while not self._stop:
            busy = self.core.has_unfinished_requests()
            events = dict(self.poller.poll(0 if busy else self.options.idle_poll_ms))
            self._loop_start = time.monotonic()
            if self.control in events:
                self._drain_control()
            if self.receiver is not None and self.receiver.socket in events:
                self._drain_kv()
            self._expire()
            outputs = self._step()
            self._send_reservations()
            self._route_outputs(outputs)
            self._trace_step_end()
            self._maybe_send_stats()

    def stop(self) -> None:
        self._stop = True

    # -- the step, timed when tracing ------------------------------------------------------------------
    def _step(self) -> list[EngineOutput]:
        if not self.core.has_unfinished_requests():
            return []
        s = time.monotonic()
        outputs = self.core.step()
        e = time.monotonic()
        self._busy.record(self.core.last_chunks, e - s)
        if self._trace.enabled and self._scheduled:
            self._pending_step = (s, e, self._scheduled, len(outputs))
            self._scheduled = []
        return outputs

    def _trace_schedules(self) -> None:
        """Keep each step's chunks (start, tokens, samples) for the trace; the schedule is unchanged."""
        scheduler = self.core.scheduler
        schedule = scheduler.schedule

        def traced():
            out = schedule()
            self._scheduled = [[c.start, c.num_tokens, int(c.samples)] for c in out.chunks]
            return out
        scheduler.schedule = traced

    def _trace_step_end(self) -> None:
        if self._pending_step is None:
            return
        s, e, chunks, n_out = self._pending_step
        self._pending_step = None
        self._trace.emit("step", t=round(self._loop_start, 6), s=round(s, 6), e=round(e, 6),
                         x=round(time.monotonic(), 6), busy=self.core.has_unfinished_requests(), chunks=chunks,
                         n_out=n_out)

    def close(self) -> None:
        self._trace.close()
        for sender in self._senders.values():
            sender.close()
        if self.receiver is not None:
            self.receiver.close()
        self.control.close(0)

    # -- control channel -----------------------------------------------------------------------------
    def _drain_control(self) -> None:
        while True:
            try:
                identity, payload = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames
                continue
            try:
                msg = p.decode_to_worker(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self._send(identity, p.ErrorMsg(None, "invalid_request_error", f"malformed message: {e}"))
                continue
            try:
                self._handle(identity, msg)
            except PdserveError as e:  # nothing was registered: _add_request records a request last
                rid = getattr(msg, "request_id", None)
                self._send(identity, p.ErrorMsg(rid, e.error_type, str(e), getattr(e, "param", None),
                                                e.http_status))
            except (ValueError, TypeError, KeyError) as e:
                rid = getattr(msg, "request_id", None)
                logger.warning("request %s refused: %s", rid, e)
                self._send(identity, p.ErrorMsg(rid, "invalid_request_error", str(e)))

    def _handle(self, identity: bytes, msg) -> None:
        if isinstance(msg, p.AddRequest):
            self._add_request(identity, msg)
        elif isinstance(msg, p.Abort):
            self._abort(msg.request_ids)
        elif isinstance(msg, p.ForwardReservation):
            self._on_reservation(msg.reservation)
        elif isinstance(msg, p.FailRemoteKV):
            self._fail_remote(msg.request_id)
        elif isinstance(msg, p.Hello):
            self._peers.add(identity)
            self._send(identity, self.info())
            self._last_stats_s = 0.0
        elif isinstance(msg, p.KVDigestRequest):
            self._send(identity, p.KVDigestReply(self.worker_id, msg.query_id, self._digests(msg.block_hashes)))
        elif isinstance(msg, p.Shutdown):
            self._stop = True

    def _add_request(self, identity: bytes, msg: p.AddRequest) -> None:
        rid = msg.request_id
        if rid in self._owner:
            raise ValueError(f"duplicate request id {rid!r}")
        if msg.remote_kv and self.receiver is None:
            raise ValueError("remote_kv needs a decode worker")
        if msg.hold_kv and self.options.role == "decode":
            raise ValueError("hold_kv needs a prefill worker")
        params = SamplingParams(**msgspec.structs.asdict(msg.params))
        self.core.add_request(rid, msg.prompt_token_ids, params, remote_kv=msg.remote_kv, hold_kv=msg.hold_kv)
        self._owner[rid] = identity
        self._trace.emit("add", rid=rid, t=round(time.monotonic(), 6), remote_kv=msg.remote_kv, hold_kv=msg.hold_kv)
        if msg.hold_kv:
            self._held[rid] = _Held()
        if msg.remote_kv:
            self._remote[rid] = _Remote()

    def _abort(self, request_ids: list[str]) -> None:
        now_ids = []
        for rid in request_ids:
            remote = self._remote.get(rid)
            if remote is not None and remote.reservation is not None and self._writes_remotely():
                remote.aborted = True  # blocks stay reserved until the sender is done or the deadline
                continue
            self._remote.pop(rid, None)
            held = self._held.pop(rid, None)
            if held is not None and held.reservation is not None and held.output is None:
                self._notify_failure(held.reservation, "aborted on the prefill worker")
            now_ids.append(rid)
        for out in self.core.abort_requests(now_ids):
            logger.debug("aborted %s", out.request_id)
        for rid in now_ids:
            self._owner.pop(rid, None)
            self._first_sent.discard(rid)

    # -- prefill side --------------------------------------------------------------------------------
    def _on_reservation(self, reservation: p.KVReservationMsg) -> None:
        held = self._held.get(reservation.request_id)
        if held is None:  # aborted, timed out or unknown: the decode worker must not wait for us
            self._notify_failure(reservation, "the prefill worker no longer holds this request")
            return
        held.reservation = reservation
        self._trace.emit("reservation", rid=reservation.request_id, t=round(time.monotonic(), 6),
                         done=held.output is not None)
        if held.output is not None:
            self._transfer(reservation.request_id, held)

    def _transfer(self, rid: str, held: _Held) -> None:
        out, reservation = held.output, held.reservation
        assert out is not None and reservation is not None
        sender = self._senders.get(reservation.target.backend)
        if sender is None:
            sender = self._senders[reservation.target.backend] = make_sender(reservation.target.backend,
                                                                              self.context)
        record = sender.send(rid, self.core.kv_cache, out.kv_block_ids or [], reservation,
                             out.new_token_ids[0], _logprobs_to_wire(out.new_logprobs))
        self.core.release_kv(rid)
        del self._held[rid]
        c = self._counters
        c.num_transfers += record.ok
        c.num_failed_transfers += not record.ok
        c.kv_bytes += record.kv_bytes
        c.transfer_s += record.seconds
        if self._trace.enabled:
            now = time.monotonic()
            self._trace.emit("kv_send", rid=rid, s=round(now - record.seconds, 6), e=round(now, 6),
                             bytes=record.kv_bytes, tokens=record.num_blocks * self.core.block_size,
                             ok=record.ok)
        logger.debug("request %s: %d blocks, %d bytes to %s in %.2f ms (%s)", rid, record.num_blocks,
                     record.kv_bytes, reservation.target.worker_id, record.seconds * 1e3, record.backend)
        owner = self._owner.pop(rid, None)
        if owner is not None:
            self._send(owner, p.PrefillDone(rid, record.ok, out.new_token_ids[0], out.num_cached_tokens,
                                            record.kv_bytes, record.seconds, record.error))

    def _notify_failure(self, reservation: p.KVReservationMsg, reason: str) -> None:
        sender = self._senders.get(reservation.target.backend)
        if sender is None:
            sender = self._senders[reservation.target.backend] = make_sender(reservation.target.backend,
                                                                              self.context)
        try:
            sender._notify(reservation.target.address, p.KVTransferDone(reservation.request_id, False,
                                                                        error=reason), [])
        except zmq.ZMQError as e:
            logger.warning("cannot notify %s: %s", reservation.target.worker_id, e)

    # -- decode side ---------------------------------------------------------------------------------
    def _send_reservations(self) -> None:
        for r in self.core.take_reservations():
            remote = self._remote.get(r.request_id)
            owner = self._owner.get(r.request_id)
            if remote is None or owner is None:
                continue
            if remote.fail_on_reserve:
                self._remote.pop(r.request_id)
                self.core.fail_remote_kv(r.request_id)
                continue
            assert self.kv_target is not None
            remote.reservation = p.KVReservationMsg(r.request_id, list(r.block_ids), r.num_cached_tokens,
                                                    self.kv_target, time.time() + self.options.transfer_timeout_s)
            self._send(owner, remote.reservation)
            self._trace.emit("reserve", rid=r.request_id, t=round(time.monotonic(), 6))

    def _drain_kv(self) -> None:
        assert self.receiver is not None
        for incoming in self.receiver.poll():
            self._on_transfer(incoming)

    def _on_transfer(self, incoming: IncomingTransfer) -> None:
        notice = incoming.notice
        rid = notice.request_id
        remote = self._remote.get(rid)
        if remote is None or remote.reservation is None:
            logger.debug("late or unknown KV notice for %s dropped", rid)
            return
        if remote.aborted:
            self._remote.pop(rid)
            self.core.abort_requests([rid])
            self._owner.pop(rid, None)
            return
        skip = remote.reservation.num_cached_tokens // self.core.block_size
        if notice.ok and notice.dst_block_ids != remote.reservation.block_ids[skip:]:
            logger.warning("request %s: KV notice for blocks other than reserved; computing locally", rid)
            notice.ok = False
        if notice.ok:
            try:
                incoming.write_into(self.core.kv_cache)
            except (ValueError, RuntimeError) as e:
                logger.warning("request %s: bad KV data (%s); computing locally", rid, e)
                notice.ok = False
        del self._remote[rid]
        if not notice.ok:
            logger.info("request %s: remote prefill failed (%s); computing the prompt here", rid, notice.error)
            self.core.fail_remote_kv(rid)
            return
        first_logprobs = _logprobs_from_wire(notice.first_logprobs[0]) if notice.first_logprobs else None
        out = self.core.complete_remote_kv(rid, notice.first_token_id, first_logprobs)
        self._trace.emit("kv_recv", rid=rid, t=round(time.monotonic(), 6))
        if out is not None:
            self._route_outputs([out])

    def _fail_remote(self, rid: str) -> None:
        remote = self._remote.get(rid)
        if remote is None:
            return
        if remote.reservation is None:
            remote.fail_on_reserve = True
            return
        del self._remote[rid]
        if remote.aborted:
            self.core.abort_requests([rid])
            self._owner.pop(rid, None)
        else:
            self.core.fail_remote_kv(rid)

    def _expire(self) -> None:
        now = time.time()
        grace = 2.0 if self._writes_remotely() else 0.0
        for rid, remote in list(self._remote.items()):
            r = remote.reservation
            if r is not None and now > r.deadline_unix_s + grace:
                logger.warning("request %s: KV did not arrive within %.0fs", rid, self.options.transfer_timeout_s)
                self._fail_remote(rid)
        if self._held:
            mono = time.monotonic()
            for rid, held in list(self._held.items()):
                if held.output is not None and held.reservation is None and \
                        mono - held.finished_at > self.options.hold_timeout_s:
                    logger.warning("request %s: no reservation within %.0fs; KV released", rid,
                                   self.options.hold_timeout_s)
                    self.core.release_kv(rid)
                    del self._held[rid]
                    owner = self._owner.pop(rid, None)
                    if owner is not None:
                        self._send(owner, p.PrefillDone(rid, False, error="no reservation arrived"))

    def _writes_remotely(self) -> bool:
        return self.receiver is not None and self.receiver.backend == "shm"

    # -- outputs -------------------------------------------------------------------------------------
    def _route_outputs(self, outputs: list[EngineOutput]) -> None:
        batches: dict[bytes, list[p.TokenOutput]] = {}
        for out in outputs:
            rid = out.request_id
            held = self._held.get(rid)
            if held is not None:  # prefill role: the token goes to the decode worker with the KV
                if out.finish_reason == "abort" or not out.new_token_ids:
                    del self._held[rid]
                    self._owner.pop(rid, None)
                    continue
                held.output = out
                held.finished_at = time.monotonic()
                if held.reservation is not None:
                    self._transfer(rid, held)
                continue
            owner = self._owner.get(rid)
            if owner is None:
                continue
            batches.setdefault(owner, []).append(_output_to_wire(out))
            if self._trace.enabled and rid not in self._first_sent:
                self._first_sent.add(rid)
                self._trace.emit("first", rid=rid, t=round(time.monotonic(), 6))
            if out.finished:
                del self._owner[rid]
                self._first_sent.discard(rid)
        for owner, batch in batches.items():
            self._send(owner, p.Outputs(batch))

    def _maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats_s < self.options.stats_interval_s:
            return
        self._last_stats_s = now
        s = self.core.stats()
        stats = p.Stats(self.worker_id, self.options.role, time.time(), s.num_running, s.num_waiting,
                        s.num_awaiting_kv, s.kv_usage, s.num_blocks, s.num_free_blocks, s.prefix_query_tokens,
                        s.prefix_hit_tokens, s.num_preemptions, s.num_prompt_tokens, s.num_generation_tokens,
                        len(self._held), self._counters.num_transfers, self._counters.num_failed_transfers,
                        self._counters.kv_bytes, self._counters.transfer_s, self._busy.busy_s,
                        self._busy.prefill_busy_s, now - self._start_s)
        stored, evicted = self.core.take_kv_events()
        for peer in self._peers:
            self._send(peer, stats)
            if stored or evicted:
                self._send(peer, p.KVEvents(self.worker_id, stored, evicted))
        self._maybe_log(s, now)

    def _maybe_log(self, s, now: float) -> None:
        c = self._counters
        elapsed = now - c.last_log_s
        if elapsed < self.options.log_stats_interval_s:
            return
        hit = s.prefix_hit_tokens / s.prefix_query_tokens if s.prefix_query_tokens else 0.0
        logger.info("%s: running %d, waiting %d, awaiting KV %d, held KV %d, KV use %.1f%%, prefix hits %.1f%%, "
                    "prompt %.1f tok/s, generation %.1f tok/s, transfers %d (%d failed, %.1f MB, %.3f s)",
                    self.worker_id, s.num_running, s.num_waiting, s.num_awaiting_kv, len(self._held),
                    100 * s.kv_usage, 100 * hit, (s.num_prompt_tokens - c.last_prompt_tokens) / elapsed,
                    (s.num_generation_tokens - c.last_generation_tokens) / elapsed, c.num_transfers,
                    c.num_failed_transfers, c.kv_bytes / 1e6, c.transfer_s)
        c.last_log_s, c.last_prompt_tokens, c.last_generation_tokens = now, s.num_prompt_tokens, \
            s.num_generation_tokens

    def _digests(self, block_hashes: list[int]) -> list[str]:
        digests = []
        for h in block_hashes:
            block = self.core.kv.pool.get_cached_block(h)
            digests.append("" if block is None else block_digest(self.core.kv_cache, block.block_id))
        return digests

    def _send(self, identity: bytes, msg) -> None:
        try:
            self.control.send_multipart([identity, p.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("cannot send %s: %s", type(msg).__name__, e)


# ---- conversions between engine outputs and wire messages ---------------------------------------------


def _output_to_wire(out: EngineOutput) -> p.TokenOutput:
    return p.TokenOutput(out.request_id, list(out.new_token_ids), out.finish_reason, out.stop_reason,
                         out.num_prompt_tokens, out.num_cached_tokens, _logprobs_to_wire(out.new_logprobs))


def _logprobs_to_wire(logprobs: list[TokenLogprobs] | None) -> list[p.LogprobEntry] | None:
    if logprobs is None:
        return None
    return [p.LogprobEntry(lp.token_id, lp.logprob, lp.rank, [t for t, _ in lp.top], [v for _, v in lp.top])
            for lp in logprobs]


def _logprobs_from_wire(e: p.LogprobEntry) -> TokenLogprobs:
    return TokenLogprobs(e.token_id, e.logprob, e.rank, list(zip(e.top_ids, e.top_logprobs)))
