"""Event traces of a live cluster (``pdserve up --trace-dir DIR``), read by ``pdserve profile --live``.

Each process writes JSON lines to its own file. Times are ``time.monotonic()`` seconds: on Linux that is
CLOCK_MONOTONIC, one clock for every process of the host and the clock of the load generator's
``time.perf_counter()``, so the events of ``pdserve bench``, the frontend and the workers line up.

Events (``"ev"`` key; ``rid`` is the request id the frontend gives the workers):

- ``start`` {process, t, role}: the trace begins (``role``: a worker's role, ``frontend``);
- worker ``step``: one busy-loop iteration that ran an engine step: ``t`` the iteration's start (after
  the poll), ``s``/``e`` the step's start and end, ``x`` the iteration's end (outputs sent), ``busy``
  whether work remained (the next poll does not wait), ``chunks``
  the scheduled chunks as ``[start, num_tokens, samples]`` (``sim.perf_model.BatchShape.from_chunks``
  reads them), ``n_out`` the outputs routed;
- worker ``add`` {rid, t, remote_kv, hold_kv}: a request handed to the engine;
- worker ``kv_send`` {rid, s, e, bytes, tokens}: a prefill worker copied a request's KV (and notified);
- worker ``reserve`` {rid, t}: a decode worker sent a reservation; ``reservation`` {rid, t, done}: a
  prefill worker took one (``done``: the prompt was already computed);
- worker ``first`` {rid, t}: a worker sent a request's first token to the frontend;
- worker ``kv_recv`` {rid, t}: a decode worker took a request's KV and emitted its first token;
- frontend ``submit`` {rid, t, n}: the frontend sent a request (``n`` prompt tokens) to its workers;
- frontend ``first`` {rid, t}: the frontend received the request's first token.

A trace is written in the worker's own loop (a list append per event, one file write per
``FLUSH_EVERY`` events), so tracing costs microseconds per step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

FLUSH_EVERY = 512


class Tracer:
    """Appends events to ``path`` (JSON lines). ``Tracer(None)`` records nothing (every call is cheap)."""

    def __init__(self, path: str | Path | None, process: str = "", **info) -> None:
        self.enabled = path is not None
        self._path = Path(path) if path is not None else None
        self._buffer: list[str] = []
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self.emit("start", process=process, t=time.monotonic(), **info)

    def emit(self, ev: str, **fields) -> None:
        if not self.enabled:
            return
        fields["ev"] = ev
        self._buffer.append(json.dumps(fields, separators=(",", ":")))
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.enabled and self._buffer:
            self._file.write("\n".join(self._buffer) + "\n")
            self._file.flush()
            self._buffer.clear()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._file.close()
            self.enabled = False


def read_trace(path: str | Path) -> list[dict]:
    """The events of one trace file, in file order (a truncated last line is skipped)."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # the process was killed mid-write
    return events
