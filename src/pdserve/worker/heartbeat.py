"""A worker's heartbeats: pushed from a thread of their own, so a long engine step does not delay them (the
frontend tells a slow worker from a dead one), while a stopped or dead process sends none."""
from __future__ import annotations

import logging
import threading
import time

import zmq

from pdserve import protocol as p
from pdserve import security

logger = logging.getLogger(__name__)


class Heartbeats:
    def __init__(self, worker_id: str, interval_s: float = p.HEARTBEAT_S) -> None:
        self.worker_id = worker_id
        self.interval_s = interval_s
        self._addresses: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, address: str) -> None:
        """Beat to this frontend's heartbeat address too (from its Hello); starts the thread on first use."""
        if not address:
            return
        with self._lock:
            self._addresses.add(address)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        context = zmq.Context.instance()
        sockets: dict[str, zmq.Socket] = {}
        try:
            while not self._stop.wait(self.interval_s):
                with self._lock:
                    addresses = list(self._addresses)
                beat = p.encode(p.Heartbeat(self.worker_id, time.time()))
                for address in addresses:
                    sock = sockets.get(address)
                    if sock is None:
                        sock = sockets[address] = context.socket(zmq.PUSH)
                        sock.setsockopt(zmq.LINGER, 0)
                        sock.setsockopt(zmq.SNDHWM, 2)  # a stale beat is worthless: never queue many
                        sock.setsockopt(zmq.IMMEDIATE, 1)
                        security.connect(sock, address)
                    try:
                        sock.send(beat, zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # that frontend is not there right now
        finally:
            for sock in sockets.values():
                sock.close(0)
