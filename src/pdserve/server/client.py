"""The frontend's side of the workers: connections, request streams, liveness.

Runs inside the frontend's asyncio loop. One DEALER socket per worker; one reader task per socket turns
worker messages into events of ``flow.frontend.FrontendFlow`` (the hand-off: routing, reservations, fall
back, retry, migration, deadlines) and carries out its actions; ``server/liveness.py`` tells which workers
are alive, so that no client waits forever.

(Over 400 lines: the reader tasks and the flow's actions share one state, the sockets and the streams; the
hand-off's decisions are flow/frontend.py's, liveness and bookkeeping are liveness.py's and requests.py's.)
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from pdserve import protocol as p
from pdserve import security
from pdserve.control.attainment import Attainment, Sample
from pdserve.control.controller import ElasticController
from pdserve.errors import PdserveError, WorkerDeadError
from pdserve.flow import frontend as ff
from pdserve.flow.frontend import FrontendFlow
from pdserve.hashing import hash_block_tokens
from pdserve.router import InstanceTracker, InstanceView, Router, make_policy
from pdserve.router.admission import Admission
from pdserve.router.path import PathChooser
from pdserve.sampling_params import SamplingParams
from pdserve.server.elastic import ElasticLoop
from pdserve.server.liveness import Liveness
from pdserve.server.requests import (MAX_ITLS, FrontendOptions, RequestEvent, Tracked, WorkerConn, error_from_msg,
                                     prefill_params, wire_params)
from pdserve.tracing import Tracer

logger = logging.getLogger(__name__)

class FrontendClient:
    def __init__(self, options: FrontendOptions, metrics=None, directory=None) -> None:
        """``directory``: where to find workers besides ``options.worker_addresses`` (``poll()`` -> records with
        ``address``, blocking, run on a thread; ``status()``), e.g. ``server.ray_directory.RayDirectory``."""
        self.options = options
        self.metrics = metrics
        self.directory = directory
        self.context = zmq.asyncio.Context.instance()
        self.frontend_id = uuid.uuid4().hex[:8]
        self.tracker = InstanceTracker()
        chooser = PathChooser(itl_bound_s=options.objectives.itl_p99_s) if options.path_choice else None
        self.router = Router(self.tracker, make_policy(options.routing, options.prefix_load_weight),
                             min_remote_prefill_tokens=options.min_remote_prefill_tokens, path_chooser=chooser)
        self.attainment = Attainment(options.objectives, options.attainment_window_s)
        self.elastic = ElasticLoop(self, ElasticController(options.objectives, options.bounds),
                                   options.elastic_tick_s, options.elastic_initial) if options.elastic else None
        slack = options.admission_ttft_slack
        judged = slack is not None  # by the objectives too, not only by requests in flight
        admission = Admission(options.max_inflight, options.max_inflight_per_instance,
                              options.objectives.ttft_s if judged else None, slack or 1.0,
                              options.objectives.tpot_s if judged else None, options.objectives.target)
        self.flow = FrontendFlow(self.router, admission, options.retry_dead_worker, options.migrate)
        self.liveness = Liveness(self)
        self.conns: dict[str, WorkerConn] = {}  # worker id -> connection (after its WorkerInfo)
        self._refused_kv_dtype: set[str] = set()  # workers whose KV dtype differs from the cluster's
        self._pending: list[WorkerConn] = []
        self._tracked: dict[str, Tracked] = {}
        self._digests: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._readers: dict[int, asyncio.Task] = {}  # id(WorkerConn) -> its reader task
        self._ids = itertools.count()
        self._trace = Tracer(options.trace_path, "frontend", role="frontend")

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to every worker and wait (up to connect_timeout_s) until each has introduced itself."""
        self._tasks += self.liveness.start()
        for address in self.options.worker_addresses:
            self._connect(address)
        if self.directory is not None:
            for record in await asyncio.to_thread(self.directory.poll):
                self._connect(record["address"])
            self._tasks.append(asyncio.create_task(self._discover()))
        deadline = time.monotonic() + self.options.connect_timeout_s
        while any(c.info is None for c in self._pending) and time.monotonic() < deadline:
            for conn in self._pending:
                if conn.info is None:
                    self.liveness.hello(conn)
            await asyncio.sleep(0.5)
        missing = [c.address for c in self._pending if c.info is None]
        if missing:
            logger.warning("no answer yet from workers %s; serving with the others", missing)
        if self.elastic is not None:
            self._tasks.append(asyncio.create_task(self.elastic.run()))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._readers.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._readers.values(), return_exceptions=True)  # every task ended
        for conn in self._pending:
            conn.socket.close(0)
        self.liveness.close()
        if self.directory is not None:
            self.directory.close()
        self._trace.close()

    def _connect(self, address: str) -> WorkerConn:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for a worker that is not connected
        security.connect(sock, address)
        conn = WorkerConn(address, sock)
        self._pending.append(conn)
        self._readers[id(conn)] = asyncio.create_task(self._reader(conn))
        return conn

    async def _discover(self) -> None:
        """Follow the directory: connect to workers at addresses not seen yet (new ones, or ones restarted
        elsewhere; their WorkerInfo re-admits them in place of the old connection, ``_on_info``)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                records = await asyncio.to_thread(self.directory.poll)
            except Exception as e:  # noqa: BLE001  the directory's backend (Ray) failing must not end the loop
                logger.warning("cannot read the worker directory: %s", e)
                continue
            known = {c.address for c in self._pending}
            for record in records:
                if record["address"] not in known:
                    logger.info("worker %s found at %s", record.get("worker_id", "?"), record["address"])
                    self.liveness.hello(self._connect(record["address"]))
            for conn in self._pending:
                if conn.info is None:
                    self.liveness.hello(conn)

    def _retire(self, conn: WorkerConn) -> None:
        """A connection to an address its worker left (restarted elsewhere): closed, forgotten."""
        task = self._readers.pop(id(conn), None)
        if task is not None:
            task.cancel()
        if conn in self._pending:
            self._pending.remove(conn)
        conn.socket.close(0)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        if self.elastic is not None:
            return "auto"
        roles = {c.info.role for c in self.conns.values()}
        return "disaggregated" if "decode" in roles else "colocated"

    def model_info(self) -> p.WorkerInfo | None:
        infos = [c.info for c in self.conns.values() if c.info is not None]
        return infos[0] if infos else None

    def can_serve(self) -> bool:
        return any(c.is_alive and c.info.role in ("decode", "both") for c in self.conns.values())

    @property
    def num_inflight(self) -> int:
        return self.flow.num_inflight

    def health(self) -> dict:
        workers = []
        now = time.monotonic()
        for wid, c in self.conns.items():
            s = c.stats
            workers.append({
                "worker_id": wid, "role": c.info.role, "address": c.address, "pid": c.info.pid,
                "host": c.info.host, "alive": c.is_alive, "last_seen_s": round(now - c.last_seen_s, 3),
                "num_inflight": len(self.flow.inflight.get(wid, ())),
                "num_running": s.num_running if s else 0, "num_waiting": s.num_waiting if s else 0,
                "num_awaiting_kv": s.num_awaiting_kv if s else 0, "num_held_kv": s.num_held_kv if s else 0,
                "kv_usage": s.kv_usage if s else 0.0, "num_blocks": c.info.num_blocks,
                "num_free_blocks": s.num_free_blocks if s else c.info.num_blocks,
            })
        for c in self._pending:
            if c.info is None:
                workers.append({"address": c.address, "alive": False, "role": None})
        return {"status": "ok" if self.can_serve() else "unavailable", "mode": self.mode,
                "num_inflight": self.num_inflight, "workers": workers}

    # -- requests ------------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: list[SamplingParams],
                       request_id: str | None = None) -> AsyncIterator[RequestEvent]:
        """Events of ``len(params)`` sub-requests over one prompt, interleaved as they come. Stops after
        every sub-request finished or failed; leaving early (client gone) aborts the rest on every worker."""
        parent = request_id or f"cmpl-{self.frontend_id}-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        tracked = []
        try:
            for i, sp in enumerate(params):
                t = Tracked(f"{parent}-{i}", i, list(prompt_token_ids), wire_params(sp), queue)
                self._submit(t)  # raises for the first sub-request: nothing sent for the rest
                tracked.append(t)
            remaining = len(tracked)
            while remaining:
                event: RequestEvent = await queue.get()
                if event.error is not None or (event.output is not None and event.output.finish_reason):
                    remaining -= 1
                yield event
        finally:
            live = [t.request_id for t in tracked if not t.is_finished]
            for rid in live:
                self._tracked.pop(rid, None)
            if live:
                self.execute(self.flow.end(live))

    def abort_nowait(self, request_ids: list[str]) -> None:
        """Abort sub-requests (e.g. a stop string was seen here): their streams end with no more events."""
        live = [rid for rid in request_ids if self._tracked.pop(rid, None) is not None]
        if live:
            self.execute(self.flow.end(live))

    async def kv_digests(self, block_hashes: list[int], timeout_s: float = 10.0) -> dict[str, list[str]]:
        """Debug: per live worker, a digest of each cached block with these hashes ("" where absent)."""
        return await self._ask_all(lambda qid: p.KVDigestRequest(qid, block_hashes), [], timeout_s)

    async def check_integrity(self, timeout_s: float = 10.0) -> dict[str, str]:
        """Debug: per live worker, its KV bookkeeping check ("" passed, else the failure; "timeout")."""
        return await self._ask_all(p.CheckIntegrity, "timeout", timeout_s)

    async def _ask_all(self, make, on_timeout, timeout_s: float) -> dict:
        futures = {}
        for wid, c in self.conns.items():
            if not c.is_alive:
                continue
            qid = uuid.uuid4().hex
            fut = asyncio.get_running_loop().create_future()
            self._digests[qid] = fut
            futures[wid] = fut
            await c.socket.send(p.encode(make(qid)))
        out = {}
        for wid, fut in futures.items():
            try:
                out[wid] = await asyncio.wait_for(fut, timeout_s)
            except asyncio.TimeoutError:
                out[wid] = on_timeout
        return out

    def configure(self, worker_id: str, msg: p.Configure) -> None:
        """Send a worker a ``Configure`` (the elastic controller's decisions)."""
        self._send(worker_id, msg)

    # -- private: the flow's actions -----------------------------------------------------------------
    def _submit(self, t: Tracked, attempt: int = 0) -> None:
        if not self.can_serve():
            raise WorkerDeadError("no live worker can serve requests")
        info = self.model_info()
        block_size = info.block_size if info else 16
        if attempt == 0:
            t.num_original_prompt = len(t.prompt_token_ids)
            timeout = self.options.request_timeout_s
            t.deadline_s = time.monotonic() + timeout if timeout else None
        actions = self.flow.submit(t.request_id, len(t.prompt_token_ids),
                                   hash_block_tokens(t.prompt_token_ids, block_size), block_size, t.deadline_s,
                                   attempt)
        if attempt:
            self._tracked[t.request_id] = t
            self.execute(actions)
            return
        t.submitted_s = time.monotonic()
        self._trace.emit("submit", rid=t.request_id, t=round(t.submitted_s, 6), n=len(t.prompt_token_ids))
        flight = self.flow.requests[t.request_id]
        t.is_remote = flight.prefill_id is not None
        t.predicted_ttft_s = flight.predicted_ttft_s if flight.predicted_ttft_s is not None else \
            flight.prediction.ttft_s if flight.prediction is not None else None
        self._tracked[t.request_id] = t
        self.execute(actions)

    def execute(self, actions: list) -> None:
        """Carry out the flow's actions in order (sends are queued by ZMQ at once, never awaited)."""
        for a in actions:
            if isinstance(a, ff.AddToWorker):
                t = self._tracked.get(a.request_id)
                if t is None:
                    continue
                params = prefill_params(t.params) if a.hold_kv else t.params
                self._send(a.worker_id, p.AddRequest(a.request_id, t.prompt_token_ids, params,
                                                     remote_kv=a.remote_kv, hold_kv=a.hold_kv))
            elif isinstance(a, ff.Forward):
                self._send(a.worker_id, p.ForwardReservation(a.reservation))
            elif isinstance(a, ff.FailRemote):
                self._send(a.worker_id, p.FailRemoteKV(a.request_id, a.reason))
            elif isinstance(a, ff.AbortOn):
                self._send(a.worker_id, p.Abort(list(a.request_ids)))
            elif isinstance(a, ff.Fail):
                t = self._tracked.pop(a.request_id, None)
                if t is not None:
                    t.is_finished = True
                    t.queue.put_nowait(RequestEvent(t.index, t.request_id, error=a.error))
            elif isinstance(a, ff.Migrate):
                self._migrate(a)

    def _migrate(self, a: ff.Migrate) -> None:
        """Its decode worker died mid-stream: the prompt and the tokens so far go to another decode worker
        for the rest of the output; the stream goes on (greedy: the same text as without the death)."""
        t = self._tracked.get(a.request_id)
        if t is None:
            return
        n = len(t.generated)
        t.prompt_token_ids = t.prompt_token_ids[:t.num_original_prompt] + t.generated
        w = t.params
        t.params = msgspec.structs.replace(w, max_tokens=None if w.max_tokens is None else max(1, w.max_tokens - n),
                                           min_tokens=max(0, w.min_tokens - n))
        logger.info("request %s: moved after %d tokens (attempt %d)", t.request_id, n, a.attempt)
        if self.metrics is not None:
            self.metrics.migrations.inc()
        try:
            self._submit(t, a.attempt)
        except PdserveError as e:
            self._tracked.pop(t.request_id, None)
            t.is_finished = True
            t.queue.put_nowait(RequestEvent(t.index, t.request_id, error=e))

    def _send(self, worker_id: str, msg) -> None:
        conn = self.conns.get(worker_id)
        if conn is not None and conn.is_alive:
            conn.socket.send(p.encode(msg))

    # -- private: receiving --------------------------------------------------------------------------
    async def _reader(self, conn: WorkerConn) -> None:
        while True:
            data = await conn.socket.recv()
            try:
                msg = p.decode_from_worker(data)
            except ValueError as e:
                logger.warning("malformed message from %s: %s", conn.address, e)
                continue
            conn.last_seen_s = time.monotonic()
            try:
                self._dispatch(conn, msg)
            except zmq.ZMQError as e:
                logger.error("cannot handle %s from %s: %s", type(msg).__name__, conn.address, e)

    def _dispatch(self, conn: WorkerConn, msg) -> None:
        wid = conn.info.worker_id if conn.info is not None else ""
        if isinstance(msg, p.Outputs):
            for out in msg.outputs:
                t = self._tracked.get(out.request_id)
                if t is None or not self.flow.on_output(wid, out.request_id, len(out.new_token_ids),
                                                        out.finish_reason is not None):
                    continue
                if out.new_token_ids:
                    self._on_tokens(t, len(out.new_token_ids))
                    t.generated.extend(out.new_token_ids)
                if len(t.prompt_token_ids) != t.num_original_prompt:  # a moved request: its own prompt
                    out.num_prompt_tokens = t.num_original_prompt
                    out.num_cached_tokens = min(out.num_cached_tokens, t.num_original_prompt)
                if out.finish_reason is not None:
                    t.is_finished = True
                    self._tracked.pop(out.request_id, None)
                    self._on_finished(t)
                t.queue.put_nowait(RequestEvent(t.index, t.request_id, output=out))
        elif isinstance(msg, p.Stats):
            conn.stats = msg
            if conn.info is not None:
                self.tracker.update_stats(wid, num_blocks=msg.num_blocks, num_free_blocks=msg.num_free_blocks,
                                          num_running=msg.num_running, num_waiting=msg.num_waiting,
                                          num_awaiting_kv=msg.num_awaiting_kv, role=msg.role,
                                          queued_prefill_tokens=msg.queued_prefill_tokens,
                                          prefill_token_s=msg.prefill_token_s, decode_step_s=msg.decode_step_s,
                                          step_target_s=msg.step_target_s,
                                          cores=None if msg.cpus is None else tuple(msg.cpus))
        elif isinstance(msg, p.KVEvents):
            if msg.tier:  # a KV store tier's events: the cluster-wide store index (router/store_index.py)
                self.tracker.apply_store_events(msg.tier, msg.location, msg.stored, msg.evicted)
            else:
                self.tracker.apply_kv_events(msg.worker_id, msg.stored, msg.evicted)
        elif isinstance(msg, p.KVReservationMsg):
            self.execute(self.flow.on_reservation(wid, msg.request_id, msg))
        elif isinstance(msg, p.PrefillDone):
            if self.metrics is not None and msg.ok:
                self.metrics.observe_transfer("prefill", msg.kv_bytes, msg.transfer_s)
            self.execute(self.flow.on_prefill_done(msg.request_id, msg.ok, msg.error))
        elif isinstance(msg, p.ErrorMsg):
            if msg.request_id is None:
                logger.warning("worker %s: %s", conn.address, msg.message)
            else:
                self.execute(self.flow.on_error(wid, msg.request_id, error_from_msg(msg)))
        elif isinstance(msg, p.WorkerInfo):
            self._on_info(conn, msg)
        elif isinstance(msg, (p.KVDigestReply, p.IntegrityReply)):
            fut = self._digests.pop(msg.query_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.digests if isinstance(msg, p.KVDigestReply) else msg.error)

    def _on_info(self, conn: WorkerConn, info: p.WorkerInfo) -> None:
        clash = self._kv_dtype_clash(info)
        if clash is not None:  # KV blocks move between workers as they are: one KV dtype for the cluster
            if info.worker_id not in self._refused_kv_dtype:
                self._refused_kv_dtype.add(info.worker_id)
                logger.error("worker %s (pid %d on %s) refused: its KV cache is %s, worker %s's is %s; start "
                             "every worker with the same --kv-cache-dtype", info.worker_id, info.pid, info.host,
                             info.kv_dtype, clash.worker_id, clash.kv_dtype)
            return
        self._refused_kv_dtype.discard(info.worker_id)
        old = self.conns.get(info.worker_id)
        if old is not None and old is not conn:  # the worker is back on another address (restarted elsewhere)
            if old.is_alive:
                self.liveness.dead(info.worker_id, old, f"came back at {conn.address}")
            self._retire(old)
            self.liveness.readmit(conn, info)
        elif conn.info is None:
            logger.info("worker %s (%s, pid %d on %s) connected", info.worker_id, info.role, info.pid, info.host)
        elif not conn.is_alive:
            self.liveness.readmit(conn, info)
        conn.info = info
        conn.is_alive = True
        self.conns[info.worker_id] = conn
        if info.worker_id not in self.tracker.instances:
            self.tracker.add(InstanceView(info.worker_id, info.role, num_blocks=info.num_blocks,
                                          num_free_blocks=info.num_blocks, block_size=info.block_size))
        view = self.tracker.instances[info.worker_id]  # a Configure's answer: the worker's current state
        view.role, view.step_target_s, view.host = info.role, info.step_target_s, info.host
        view.cores = None if info.cpus is None else tuple(info.cpus)
        self.flow.on_worker_alive(info.worker_id)

    def _kv_dtype_clash(self, info: p.WorkerInfo) -> p.WorkerInfo | None:
        """A connected worker whose KV cache dtype differs from ``info``'s, or None."""
        for c in self.conns.values():
            other = c.info
            if other is not None and other.worker_id != info.worker_id and c.is_alive and other.kv_dtype \
                    and info.kv_dtype and other.kv_dtype != info.kv_dtype:
                return other
        return None

    def _on_tokens(self, t: Tracked, n: int) -> None:
        now = time.monotonic()
        if not t.has_first_token:
            t.has_first_token, t.first_s = True, now
            self.flow.admission.observe_ttft(t.predicted_ttft_s, now - t.submitted_s)
            self._trace.emit("first", rid=t.request_id, t=round(now, 6))
        elif len(t.itls) < MAX_ITLS:
            t.itls.append(now - t.last_s)
        t.last_s = now
        t.num_tokens += n

    def _on_finished(self, t: Tracked) -> None:
        if not t.has_first_token:
            return
        ttft = t.first_s - t.submitted_s
        tpot = (t.last_s - t.first_s) / (t.num_tokens - 1) if t.num_tokens > 1 else None
        self.attainment.record(Sample(t.last_s, ttft, tpot, max(t.itls, default=0.0), tuple(t.itls)))
        if self.metrics is not None and t.is_remote is not None:
            self.metrics.observe_path("remote" if t.is_remote else "local", ttft, t.predicted_ttft_s)
