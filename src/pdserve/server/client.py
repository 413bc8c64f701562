"""The frontend's side of the workers: connections, routing, request streams, liveness.

Runs inside the frontend's asyncio loop. One DEALER socket per worker; one reader task per socket turns
worker messages into per-request events; a watchdog marks workers dead (process gone on this host, or
silent for ``worker_timeout_s``) and ends or re-routes their requests so no client waits forever.

Disaggregated flow (kv/transfer.py has the data plane):
  1. ``AddRequest(remote_kv)`` to the decode worker and ``AddRequest(hold_kv, max_tokens=1)`` to the
     prefill worker, at once, so the prompt computes while the decode worker reserves blocks;
  2. the decode worker's ``KVReservationMsg`` is forwarded to the prefill worker (``ForwardReservation``);
  3. the prefill worker writes the blocks, notifies the decode worker directly, and reports
     ``PrefillDone`` here (transfer metrics); the decode worker streams every token, the first included.
If the prefill side fails at any point, ``FailRemoteKV`` makes the decode worker compute the prompt.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from pdserve.errors import InvalidRequestError, OverloadedError, PdserveError, WorkerDeadError
from pdserve.hashing import hash_block_tokens
from pdserve.router import InstanceTracker, InstanceView, Router, make_policy
from pdserve.router.admission import Admission
from pdserve.sampling_params import SamplingParams
from pdserve.worker import protocol as p
from pdserve.worker.trace import Tracer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontendOptions:
    worker_addresses: tuple[str, ...]
    routing: str = "prefix_aware"
    prefix_load_weight: float = 1.0
    min_remote_prefill_tokens: int = 0
    worker_timeout_s: float = 30.0  # a worker silent this long is dead (its process is checked sooner)
    connect_timeout_s: float = 600.0  # how long start() waits for every worker's first answer
    max_inflight: int = 1024
    max_inflight_per_instance: int = 256
    retry_dead_worker: bool = True  # re-send a request that has produced no token yet to another worker
    trace_path: str | None = None  # event trace (worker/trace.py): submits and first tokens


@dataclass
class WorkerConn:
    address: str
    socket: zmq.asyncio.Socket
    info: p.WorkerInfo | None = None
    stats: p.Stats | None = None
    last_seen_s: float = 0.0
    is_alive: bool = False
    request_ids: set[str] = field(default_factory=set)


@dataclass
class RequestEvent:
    """A delta for one sub-request (``output``), or its error."""

    index: int
    request_id: str
    output: p.TokenOutput | None = None
    error: PdserveError | None = None


@dataclass
class _Tracked:
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: p.WireSamplingParams
    queue: asyncio.Queue
    decode_id: str = ""
    prefill_id: str | None = None
    num_tokens: int = 0
    finished: bool = False
    prefill_done: bool = False
    arrival_s: float = field(default_factory=time.monotonic)


class FrontendClient:
    def __init__(self, options: FrontendOptions, metrics=None) -> None:
        self.options = options
        self.metrics = metrics
        self.context = zmq.asyncio.Context.instance()
        self.frontend_id = uuid.uuid4().hex[:8]
        self.tracker = InstanceTracker()
        self.router = Router(self.tracker, make_policy(options.routing, options.prefix_load_weight),
                             min_remote_prefill_tokens=options.min_remote_prefill_tokens)
        self.admission = Admission(options.max_inflight, options.max_inflight_per_instance)
        self.conns: dict[str, WorkerConn] = {}  # worker id -> connection (after its WorkerInfo)
        self._pending: list[WorkerConn] = []
        self._requests: dict[str, _Tracked] = {}
        self._digests: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count()
        self._host = socket.gethostname()
        self._trace = Tracer(options.trace_path, "frontend", role="frontend")

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to every worker and wait (up to connect_timeout_s) until each has introduced itself."""
        for address in self.options.worker_addresses:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(address)
            conn = WorkerConn(address, sock)
            self._pending.append(conn)
            self._tasks.append(asyncio.create_task(self._reader(conn)))
        self._tasks.append(asyncio.create_task(self._watchdog()))
        deadline = time.monotonic() + self.options.connect_timeout_s
        while any(c.info is None for c in self._pending) and time.monotonic() < deadline:
            for conn in self._pending:
                if conn.info is None:
                    await conn.socket.send(p.encode(p.Hello(self.frontend_id)))
            await asyncio.sleep(0.5)
        missing = [c.address for c in self._pending if c.info is None]
        if missing:
            logger.warning("no answer yet from workers %s; serving with the others", missing)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # wait until every task has ended
        for conn in self._pending:
            conn.socket.close(0)
        self._trace.close()

    # -- queries -------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        roles = {c.info.role for c in self.conns.values()}
        return "disaggregated" if "decode" in roles else "colocated"

    def model_info(self) -> p.WorkerInfo | None:
        infos = [c.info for c in self.conns.values() if c.info is not None]
        return infos[0] if infos else None

    def can_serve(self) -> bool:
        return any(c.is_alive and c.info.role in ("decode", "both") for c in self.conns.values())

    @property
    def num_inflight(self) -> int:
        return len(self._requests)

    def health(self) -> dict:
        workers = []
        now = time.monotonic()
        for wid, c in self.conns.items():
            s = c.stats
            workers.append({
                "worker_id": wid, "role": c.info.role, "address": c.address, "pid": c.info.pid,
                "host": c.info.host, "alive": c.is_alive, "last_seen_s": round(now - c.last_seen_s, 3),
                "num_inflight": len(c.request_ids),
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
                t = _Tracked(f"{parent}-{i}", i, list(prompt_token_ids), _wire_params(sp), queue)
                self._submit(t)  # raises for the first sub-request: nothing sent for the rest
                tracked.append(t)
            remaining = len(tracked)
            while remaining:
                event: RequestEvent = await queue.get()
                if event.error is not None or (event.output is not None and event.output.finish_reason):
                    remaining -= 1
                yield event
        finally:
            live = [t for t in tracked if not t.finished]
            for t in live:
                self._forget(t)
            if live:
                await self._abort_everywhere(live)

    def abort_nowait(self, request_ids: list[str]) -> None:
        """Abort sub-requests (e.g. a stop string was seen here): their streams end with no more events."""
        items = [self._requests[r] for r in request_ids if r in self._requests]
        for t in items:
            self._forget(t)
        if items:
            asyncio.get_running_loop().create_task(self._abort_everywhere(items))

    async def kv_digests(self, block_hashes: list[int], timeout_s: float = 10.0) -> dict[str, list[str]]:
        """Debug: per live worker, a digest of each cached block with these hashes ("" where absent)."""
        futures = {}
        for wid, c in self.conns.items():
            if not c.is_alive:
                continue
            qid = uuid.uuid4().hex
            fut = asyncio.get_running_loop().create_future()
            self._digests[qid] = fut
            futures[wid] = fut
            await c.socket.send(p.encode(p.KVDigestRequest(qid, block_hashes)))
        out = {}
        for wid, fut in futures.items():
            try:
                out[wid] = await asyncio.wait_for(fut, timeout_s)
            except asyncio.TimeoutError:
                out[wid] = []
        return out

    # -- private: sending ----------------------------------------------------------------------------
    def _submit(self, t: _Tracked) -> None:
        if not self.can_serve():
            raise WorkerDeadError("no live worker can serve requests")
        info = self.model_info()
        block_size = info.block_size if info else 16
        hashes = hash_block_tokens(t.prompt_token_ids, block_size)
        self.admission.check(self.num_inflight)
        route = self.router.route(len(t.prompt_token_ids), hashes, block_size)
        if route is None:
            raise WorkerDeadError("no live worker can serve requests")
        decode = self.conns[route.decode_id]
        self.admission.check(self.num_inflight, len(decode.request_ids))
        t.decode_id, t.prefill_id = route.decode_id, route.prefill_id
        self._trace.emit("submit", rid=t.request_id, t=round(time.monotonic(), 6), n=len(t.prompt_token_ids))
        self._requests[t.request_id] = t
        decode.request_ids.add(t.request_id)
        self.tracker.instances[route.decode_id].num_inflight = len(decode.request_ids)
        decode.socket.send(p.encode(p.AddRequest(t.request_id, t.prompt_token_ids, t.params,
                                                 remote_kv=route.is_disaggregated)))
        if route.prefill_id is not None:
            prefill = self.conns[route.prefill_id]
            prefill.request_ids.add(t.request_id)
            self.tracker.instances[route.prefill_id].num_inflight = len(prefill.request_ids)
            first = _prefill_params(t.params)
            prefill.socket.send(p.encode(p.AddRequest(t.request_id, t.prompt_token_ids, first, hold_kv=True)))

    def _forget(self, t: _Tracked) -> None:
        t.finished = True
        self._requests.pop(t.request_id, None)
        for wid in (t.decode_id, t.prefill_id):
            conn = self.conns.get(wid) if wid else None
            if conn is not None:
                conn.request_ids.discard(t.request_id)
                view = self.tracker.instances.get(wid)
                if view is not None:
                    view.num_inflight = len(conn.request_ids)

    async def _abort_everywhere(self, items: list[_Tracked]) -> None:
        by_worker: dict[str, list[str]] = {}
        for t in items:
            for wid in (t.decode_id, t.prefill_id):
                if wid:
                    by_worker.setdefault(wid, []).append(t.request_id)
        for wid, ids in by_worker.items():
            conn = self.conns.get(wid)
            if conn is not None and conn.is_alive:
                await conn.socket.send(p.encode(p.Abort(ids)))

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
            except (KeyError, ValueError, AssertionError, zmq.ZMQError) as e:
                logger.exception("cannot handle %s from %s: %s", type(msg).__name__, conn.address, e)

    def _dispatch(self, conn: WorkerConn, msg) -> None:
        if isinstance(msg, p.Outputs):
            for out in msg.outputs:
                t = self._requests.get(out.request_id)
                if t is None or t.decode_id != (conn.info.worker_id if conn.info else None):
                    continue
                if t.num_tokens == 0 and out.new_token_ids:
                    self._trace.emit("first", rid=t.request_id, t=round(time.monotonic(), 6))
                t.num_tokens += len(out.new_token_ids)
                if out.finish_reason is not None:
                    self._forget(t)
                t.queue.put_nowait(RequestEvent(t.index, t.request_id, output=out))
        elif isinstance(msg, p.Stats):
            conn.stats = msg
            if conn.info is not None:
                self.tracker.update_stats(conn.info.worker_id, num_blocks=msg.num_blocks,
                                          num_free_blocks=msg.num_free_blocks, num_running=msg.num_running,
                                          num_waiting=msg.num_waiting, num_awaiting_kv=msg.num_awaiting_kv)
        elif isinstance(msg, p.KVEvents):
            self.tracker.apply_kv_events(msg.worker_id, msg.stored, msg.evicted)
        elif isinstance(msg, p.KVReservationMsg):
            self._on_reservation(conn, msg)
        elif isinstance(msg, p.PrefillDone):
            self._on_prefill_done(msg)
        elif isinstance(msg, p.ErrorMsg):
            self._on_error(conn, msg)
        elif isinstance(msg, p.WorkerInfo):
            self._on_info(conn, msg)
        elif isinstance(msg, p.KVDigestReply):
            fut = self._digests.pop(msg.query_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.digests)

    def _on_info(self, conn: WorkerConn, info: p.WorkerInfo) -> None:
        if conn.info is None:
            logger.info("worker %s (%s, pid %d on %s) connected", info.worker_id, info.role, info.pid, info.host)
        conn.info = info
        conn.is_alive = True
        self.conns[info.worker_id] = conn
        if info.worker_id not in self.tracker.instances:
            self.tracker.add(InstanceView(info.worker_id, info.role, num_blocks=info.num_blocks,
                                          num_free_blocks=info.num_blocks, block_size=info.block_size))
        self.tracker.set_alive(info.worker_id, True)

    def _on_reservation(self, conn: WorkerConn, r: p.KVReservationMsg) -> None:
        t = self._requests.get(r.request_id)
        if t is None or t.prefill_id is None:
            # Gone (aborted): the reservation was never forwarded, so nobody will write into its blocks;
            # the decode worker may free them now instead of at the deadline.
            conn.socket.send(p.encode(p.FailRemoteKV(r.request_id, "request ended before its KV was sent")))
            return
        prefill = self.conns.get(t.prefill_id)
        if prefill is None or not prefill.is_alive or t.prefill_done:
            self._fail_remote(t, "the prefill worker is gone")
            return
        prefill.socket.send(p.encode(p.ForwardReservation(r)))

    def _on_prefill_done(self, msg: p.PrefillDone) -> None:
        t = self._requests.get(msg.request_id)
        if self.metrics is not None and msg.ok:
            self.metrics.observe_transfer("prefill", msg.kv_bytes, msg.transfer_s)
        if t is None:
            return
        t.prefill_done = True
        self._release_prefill(t)
        if not msg.ok:
            self._fail_remote(t, msg.error)

    def _on_error(self, conn: WorkerConn, msg: p.ErrorMsg) -> None:
        if msg.request_id is None:
            logger.warning("worker %s: %s", conn.address, msg.message)
            return
        t = self._requests.get(msg.request_id)
        if t is None:
            return
        wid = conn.info.worker_id if conn.info else ""
        if wid == t.prefill_id and wid != t.decode_id:
            logger.info("request %s: prefill worker refused it (%s); decode worker computes the prompt",
                        t.request_id, msg.message)
            t.prefill_done = True
            self._release_prefill(t)
            self._fail_remote(t, msg.message)
            return
        self._forget(t)
        if t.prefill_id:
            asyncio.get_running_loop().create_task(self._abort_everywhere([t]))
        t.queue.put_nowait(RequestEvent(t.index, t.request_id, error=_error_from_msg(msg)))

    def _release_prefill(self, t: _Tracked) -> None:
        conn = self.conns.get(t.prefill_id) if t.prefill_id else None
        if conn is not None:
            conn.request_ids.discard(t.request_id)
            self.tracker.instances[t.prefill_id].num_inflight = len(conn.request_ids)

    def _fail_remote(self, t: _Tracked, reason: str) -> None:
        decode = self.conns.get(t.decode_id)
        if decode is not None and decode.is_alive:
            decode.socket.send(p.encode(p.FailRemoteKV(t.request_id, reason)))

    # -- private: liveness ---------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for wid, conn in list(self.conns.items()):
                if not conn.is_alive:
                    continue
                gone = conn.info.host == self._host and not _pid_running(conn.info.pid)
                silent = now - conn.last_seen_s > self.options.worker_timeout_s
                if gone or silent:
                    self._on_worker_dead(wid, conn, "process exited" if gone else "stopped answering")

    def _on_worker_dead(self, wid: str, conn: WorkerConn, why: str) -> None:
        logger.error("worker %s %s; %d requests affected", wid, why, len(conn.request_ids))
        conn.is_alive = False
        self.tracker.set_alive(wid, False)
        for rid in list(conn.request_ids):
            t = self._requests.get(rid)
            conn.request_ids.discard(rid)
            if t is None:
                continue
            if wid == t.prefill_id and wid != t.decode_id:
                t.prefill_done = True
                self._fail_remote(t, f"prefill worker {wid} died")
                continue
            self._forget(t)
            if t.prefill_id and t.prefill_id != wid:
                asyncio.get_running_loop().create_task(self._abort_everywhere([t]))
            if self.options.retry_dead_worker and t.num_tokens == 0 and self.can_serve():
                t.finished = False
                t.num_tokens = 0
                try:
                    logger.info("request %s: re-sent after worker %s died", rid, wid)
                    self._submit(t)
                    continue
                except PdserveError as e:
                    t.queue.put_nowait(RequestEvent(t.index, t.request_id, error=e))
                    continue
            t.queue.put_nowait(RequestEvent(t.index, t.request_id, error=WorkerDeadError(
                f"worker {wid} died while serving this request")))


def _wire_params(sp: SamplingParams) -> p.WireSamplingParams:
    return p.WireSamplingParams(sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.seed, sp.repetition_penalty,
                                sp.frequency_penalty, sp.presence_penalty, sp.max_tokens, sp.min_tokens,
                                list(sp.stop_token_ids), sp.ignore_eos, sp.logprobs)


def _prefill_params(w: p.WireSamplingParams) -> p.WireSamplingParams:
    """The prefill worker samples only the first token."""
    import msgspec

    return msgspec.structs.replace(w, max_tokens=1, min_tokens=min(w.min_tokens, 1))


def _error_from_msg(msg: p.ErrorMsg) -> PdserveError:
    if msg.http_status == 400:
        return InvalidRequestError(msg.message, msg.param)
    if msg.http_status in (429, 503) and msg.error_type == "overloaded":
        return OverloadedError(msg.message)
    err = PdserveError(msg.message)
    err.http_status = msg.http_status
    err.error_type = msg.error_type
    return err


def _pid_running(pid: int) -> bool:
    """Whether a process of this host still runs (a zombie, killed but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
