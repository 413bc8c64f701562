"""A worker's event trace (``pdserve.tracing``): its steps, through the engine's ``schedule_observer`` hook,
requests' first tokens, and the hand-off's events."""
from __future__ import annotations

import time
from pathlib import Path

from pdserve.tracing import Tracer


class WorkerTracer(Tracer):
    """A worker's events: its steps (through the engine's ``schedule_observer`` hook), requests' first
    tokens, and the rest by ``emit``. Every method is a no-op when tracing is off."""

    def __init__(self, path: str | Path | None, worker_id: str, role: str) -> None:
        super().__init__(path, worker_id, role=role)
        self._loop_start = 0.0
        self._step: tuple[float, list] | None = None  # (start, chunks) of the step under way
        self._ended: tuple[float, float, list] | None = None
        self._first_sent: set[str] = set()

    def attach(self, core) -> None:
        """Observe ``core``'s schedules (start and chunks of each step); the schedule is unchanged."""
        if self.enabled:
            core.schedule_observer = self._on_schedule

    def loop_start(self) -> None:
        if self.enabled:
            self._loop_start = time.monotonic()

    def step_end(self) -> None:
        if self.enabled and self._step is not None:
            start, chunks = self._step
            self._step = None
            if chunks:
                self._ended = (start, time.monotonic(), chunks)

    def iteration_end(self, num_outputs: int, is_busy: bool) -> None:
        if not self.enabled or self._ended is None:
            return
        s, e, chunks = self._ended
        self._ended = None
        self.emit("step", t=round(self._loop_start, 6), s=round(s, 6), e=round(e, 6),
                  x=round(time.monotonic(), 6), busy=is_busy, chunks=chunks, n_out=num_outputs)

    def first_token(self, request_id: str) -> None:
        if self.enabled and request_id not in self._first_sent:
            self._first_sent.add(request_id)
            self.emit("first", rid=request_id, t=round(time.monotonic(), 6))

    def forget(self, request_id: str) -> None:
        self._first_sent.discard(request_id)

    def _on_schedule(self, sched) -> None:
        self._step = (time.monotonic(), [[c.start, c.num_tokens, int(c.samples)] for c in sched.chunks])
