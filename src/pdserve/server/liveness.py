"""Which workers are alive, for the frontend: heartbeats, the watchdog, re-admission.

Every worker pushes a heartbeat every ``protocol.HEARTBEAT_S`` from a thread of its own to the frontend's
heartbeat socket (whose address the frontend's Hello carries). The watchdog presumes a worker dead when its
process is gone (on this host) or it has been silent for ``worker_timeout_s``: its requests move or end
(``FrontendFlow.on_worker_dead``) and they are remembered as its orphans. A dead worker is greeted again
every second; when it answers (a restart on the same address, the end of a stall) it is re-admitted and
told to abort its orphans, which went elsewhere. The watchdog also expires requests past their deadline.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time

import zmq

from pdserve import protocol as p
from pdserve import security

logger = logging.getLogger(__name__)

MAX_ORPHANS = 4096  # requests remembered per dead worker, to abort there if it comes back
HELLO_EVERY_S = 1.0


class Liveness:
    def __init__(self, client) -> None:
        self.client = client
        self.orphans: dict[str, list[str]] = {}  # a worker presumed dead -> the requests it had then
        self.heartbeat_address = ""
        self._socket: zmq.Socket | None = None
        self._host = socket.gethostname()

    def start(self) -> list[asyncio.Task]:
        """Bind the heartbeat socket; the tasks that read it and watch the workers."""
        c = self.client
        self._socket = c.context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self.heartbeat_address = security.bind(self._socket, c.options.internal_host)
        return [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._watchdog())]

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)

    def hello(self, conn) -> None:
        """Introduce the frontend (and its heartbeat address); dropped while the worker is not connected."""
        msg = p.Hello(self.client.frontend_id, self.heartbeat_address)
        conn.socket.send(p.encode(msg), zmq.NOBLOCK).add_done_callback(_ignore_not_connected)

    def readmit(self, conn, info: p.WorkerInfo) -> None:
        """A worker presumed dead answered: whatever it still runs of before is aborted there."""
        orphans = self.orphans.pop(info.worker_id, [])
        logger.warning("worker %s (pid %d) is back; re-admitted, %d orphaned requests aborted there",
                       info.worker_id, info.pid, len(orphans))
        if orphans:
            conn.socket.send(p.encode(p.Abort(orphans)))

    def dead(self, wid: str, conn, why: str) -> None:
        c = self.client
        affected = sorted(c.flow.inflight.get(wid, ()))
        logger.error("worker %s %s; %d requests affected", wid, why, len(affected))
        conn.is_alive = False
        conn.stats = None  # /health shows the truth, not its last stats
        self.orphans[wid] = affected[-MAX_ORPHANS:]
        c.execute(c.flow.on_worker_dead(wid))

    async def _watchdog(self) -> None:
        c, last_hello = self.client, 0.0
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            c.execute(c.flow.expire(now))  # deadlines
            for wid, conn in list(c.conns.items()):
                if not conn.is_alive:
                    continue
                gone = conn.info.host == self._host and not _pid_running(conn.info.pid)
                silent = now - conn.last_seen_s > c.options.worker_timeout_s
                if gone or silent:
                    self.dead(wid, conn, "process exited" if gone else "stopped answering")
            if now - last_hello >= HELLO_EVERY_S:
                last_hello = now
                for conn in c.conns.values():
                    if not conn.is_alive:
                        self.hello(conn)

    async def _heartbeats(self) -> None:
        while True:
            data = await self._socket.recv()
            try:
                beat = p.decode_heartbeat(data)
            except ValueError:
                continue
            conn = self.client.conns.get(beat.worker_id)
            if conn is not None:
                conn.last_seen_s = time.monotonic()
                if not conn.is_alive:
                    self.hello(conn)  # it beats again: its WorkerInfo re-admits it


def _ignore_not_connected(sent: asyncio.Future) -> None:
    """A Hello to a worker that is not connected is dropped (zmq.IMMEDIATE): nothing to do."""
    error = None if sent.cancelled() else sent.exception()
    if error is not None and not isinstance(error, zmq.Again):
        logger.warning("cannot send Hello: %s", error)


def _pid_running(pid: int) -> bool:
    """Whether a process of this host still runs (a zombie, killed but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
