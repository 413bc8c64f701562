"""``pdserve profile --live``: fit a live cluster's overheads from its traces (``pdserve up --trace-dir``).

Inputs: the trace directory of a calibration run, the ``pdserve bench`` result(s) of that run (client
send and first-chunk times; their clock origin and duration select the traced window), and a step
model profiled on the same machine (``pdserve profile``). Output: that step model with
``Overheads`` (``sim/overheads.py``). Every term is a mean over the calibration run, so that mean
latencies add up in the simulator:

- ``admission_s``: mean(frontend submit - client send) + mean(worker add - frontend submit), the latter
  over requests that reached a worker idle all along (a busy worker reads messages only between steps,
  which the simulator models on its own);
- ``return_s``: mean(client first chunk - the worker's first-token send);
- ``reservation_s``: mean(prefill worker takes a reservation - decode worker sends it), over reservations
  during whose flight the prefill worker ran no step (else the wait for its step to end would count);
  with none such (the prefill worker is usually computing that very prompt), two frontend -> worker
  hops (the reservation goes decode -> frontend -> prefill);
- ``kv_fixed_s``, ``kv_per_token_s``: non-negative least squares of the KV copy times on tokens copied
  (one prompt length: all of it per token);
- steps: live time ~ ``scale[role]`` x profiled time x (1 + ``contention`` if another worker of the
  host was in a step when it started). ``contention`` is one figure for the host (workers on separate
  cores share memory bandwidth and caches), chosen on a grid to minimise the squared error over every
  step of every role; for each candidate, ``scale[role]`` keeps the role's total live time (ratio of
  sums). With one worker, ``contention`` is 0. ``scale_contended`` = ``scale`` x (1 + ``contention``).
  Where a role's steps tell them apart from the scale, two more terms join it, by non-negative least
  squares: ``fixed_s`` per step (the steps' profiled times, 10th to 90th percentile, span
  ``FIXED_MIN_SPAN``: a prefill worker serving prompts of many lengths) and ``cold_s`` per step that
  starts ``overheads.COLD_IDLE_S`` or more after the worker's previous step (cold and warm steps each
  at least ``COLD_MIN_SHARE`` of them; a step in which a request takes its first decode is not counted
  cold: ``join_s`` has that case, as the simulator applies it).
  A role whose steps mix prefill and decode work (``both``), each at least ``MIN_PART`` of the profiled
  time, gets two scales instead, by least squares: ``prefill_scale`` for the prefill part of a step
  (``PerfModel.prefill_part_s``) and ``scale`` for the rest (a colocated worker's two threads are
  slowed differently in compute-bound prefill and memory-bound decode work);
- ``join_s`` per role: the extra time of a step per request taking its first decode in it (its first
  token went to the frontend just before the step: a ``first`` event between the previous step's end
  and this step's start), by least squares (with an intercept) of the steps' residuals on that count,
  >= 0; the scales are then refitted to the steps' time without it, and ``join_s`` once more;
- ``gap_s``, ``gap_per_output_s`` per role: non-negative least squares of the loop time between two
  back-to-back steps (one step's end to the next one's start, when work remained) on the outputs of
  the first;
- ``jitter`` per role: the standard deviation of log(live / modelled) over the steps, each worker
  window's mean taken out (drift between runs is the scales' business, not a step's spread); and its
  memory, ``jitter_corr_share`` and ``jitter_corr_s``: the residuals' autocorrelation over the time
  between two steps of one worker, fitted as share x exp(-dt / time constant) (``fit_memory``).

The fit also returns the measured breakdown (``LiveFit.stats``) that ``pdserve profile --live`` prints. The
estimators themselves are ``sim/live_estimators.py``. These terms describe the host a calibration ran on: an
add-on for reproducing that host (the accuracy benchmark), not part of planning GPU clusters.
"""
from __future__ import annotations

import json
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pdserve.sim.calibrated import CalibratedPerfModel
from pdserve.sim.live_estimators import (CONTENTION_GRID, fit_gap, fit_jitter, fit_join, fit_kv, fit_scales, mean, ms,
                                         step_shape)
from pdserve.sim.overheads import COLD_IDLE_S, ROLES, Overheads, StepOverhead
from pdserve.tracing import read_trace

MATCH_WINDOW_S = 1.0  # a client send and its frontend submit are at most this far apart


@dataclass
class LiveFit:
    overheads: Overheads
    stats: dict = field(default_factory=dict)  # measured figures behind every term (means, counts)


@dataclass
class _Worker:
    role: str
    steps: list[dict]
    events: list[dict]
    starts: list[float] = field(default_factory=list)  # iteration starts, for idle checks
    cluster: int = 0  # which trace directory: workers contend only with their own cluster's
    process: str = ""  # its trace file: one process may give several _Workers (one per window)

    def shares_host_with(self, other: _Worker) -> bool:
        """Whether ``other`` is another worker process of the same cluster."""
        return other.cluster == self.cluster and other.process != self.process

    def is_idle_between(self, a: float, b: float) -> bool:
        """Whether a message sent at ``a`` and read at ``b`` waited for no engine step: none ran at any
        time in (a, b) (the step of the iteration that read it starts at ``b`` or after)."""
        i = bisect_left(self.starts, b) - 1  # the last iteration started before b
        while i >= 0 and self.steps[i]["e"] > a:
            if self.steps[i]["s"] < b:
                return False
            i -= 1
        return True

    def is_stepping_at(self, t: float) -> bool:
        """Whether an engine step was running at ``t``."""
        i = bisect_right(self.starts, t) - 1
        return i >= 0 and self.steps[i]["s"] <= t < self.steps[i]["e"]


TraceDirs = str | Path | list[str | Path]


def fit_live(trace_dirs: TraceDirs, bench_results: list[dict], base: CalibratedPerfModel) -> LiveFit:
    """Fit the overheads of the run(s) ``bench_results`` traced in ``trace_dirs`` (one directory, or
    several: calibration runs on different clusters at different times, pooled; see the module doc)."""
    windows = [_window(r) for r in bench_results]
    frontend, workers = _load(trace_dirs, windows)
    stats: dict = {"windows": [[round(a, 3), round(b, 3)] for a, b in windows]}
    submits = {e["rid"]: e for e in frontend if e["ev"] == "submit"}
    matched = _match(bench_results, [e for e in frontend if e["ev"] == "submit"])
    stats["requests_matched"] = len(matched)
    if not matched:
        raise ValueError("no client request matched a frontend submit: was the bench run traced "
                         "(pdserve up --trace-dir) on this host?")

    # Admission: client -> frontend -> worker.
    to_frontend = [sub["t"] - send for send, _, sub in matched]
    to_worker = []
    for w in workers:
        for e in w.events:
            if e["ev"] == "add" and e["rid"] in submits and w.is_idle_between(submits[e["rid"]]["t"], e["t"]):
                to_worker.append(e["t"] - submits[e["rid"]]["t"])
    admission = mean(to_frontend) + mean(to_worker)
    stats["client_to_frontend_ms"] = ms(to_frontend)
    stats["frontend_to_idle_worker_ms"] = ms(to_worker)

    # Return: the worker's first-token send -> the client's first chunk.
    first_sent = {e["rid"]: e["t"] for w in workers if w.role in ("decode", "both") for e in w.events
                  if e["ev"] == "first"}
    back = [first - first_sent[sub["rid"]] for _, first, sub in matched if sub["rid"] in first_sent]
    stats["worker_to_client_ms"] = ms(back)

    # Disaggregation: reservation forwarding, KV copies, the decode worker picking the KV up.
    reserve_sent = {e["rid"]: e["t"] for w in workers if w.role == "decode" for e in w.events if e["ev"] == "reserve"}
    forward = []
    sends = []
    for w in workers:
        if w.role != "prefill":
            continue
        for e in w.events:
            if e["ev"] == "reservation" and e["rid"] in reserve_sent and \
                    w.is_idle_between(reserve_sent[e["rid"]], e["t"]):
                forward.append(e["t"] - reserve_sent[e["rid"]])
            elif e["ev"] == "kv_send" and e.get("ok", True):
                sends.append(e)
    stats["reservation_forward_ms"] = ms(forward)
    kv_fixed = kv_per_token = None
    if sends:
        kv_fixed, kv_per_token = fit_kv([e["tokens"] for e in sends], [e["e"] - e["s"] for e in sends])
        stats["kv_copy_ms"] = ms([e["e"] - e["s"] for e in sends])
        stats["kv_tokens_mean"] = mean([e["tokens"] for e in sends])
        landed = {e["rid"]: e["t"] for w in workers if w.role == "decode" for e in w.events if e["ev"] == "kv_recv"}
        stats["kv_pickup_wait_ms"] = ms([landed[e["rid"]] - e["e"] for e in sends if e["rid"] in landed])

    # Steps, per role: (live, profiled, contended) of each step, and the loop gaps.
    samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    join_counts: dict[str, np.ndarray] = {}
    segments: dict[str, np.ndarray] = {}  # which worker window each step is from
    step_starts: dict[str, np.ndarray] = {}
    gap_fits: dict[str, tuple[float, float]] = {}
    for role in ROLES:
        ws = [w for w in workers if w.role == role]
        if not any(w.steps for w in ws):
            continue
        live, pred, prefill, contended, cold, gaps, outs, joins, segment, starts = ([] for _ in range(10))
        for k, w in enumerate(ws):
            others = [o for o in workers if w.shares_host_with(o)]
            firsts = sorted(e["t"] for e in w.events if e["ev"] == "first")
            for i, s in enumerate(w.steps):
                shape = step_shape(s)
                live.append(s["e"] - s["s"])
                starts.append(s["s"])
                segment.append(k)
                after = w.steps[i - 1]["e"] if i else -math.inf
                joins.append(bisect_right(firsts, s["s"]) - bisect_left(firsts, after))
                pred.append(base.step_time_s(shape))
                prefill.append(base.prefill_part_s(shape))
                contended.append(any(o.is_stepping_at(s["s"]) for o in others))
                cold.append(s["s"] - after >= COLD_IDLE_S and not joins[-1])  # else join_s has it
                nxt = w.steps[i + 1] if i + 1 < len(w.steps) else None
                if nxt is not None and s.get("busy") and nxt["t"] >= s["x"]:
                    gaps.append(nxt["s"] - s["e"])
                    outs.append(shape.num_samples)
        samples[role] = (np.array(live), np.array(pred), np.array(contended, dtype=float), np.array(prefill),
                         np.array(cold, dtype=float), role == "both")
        join_counts[role] = np.array(joins, dtype=float)
        segments[role] = np.array(segment)
        step_starts[role] = np.array(starts)
        gap_fits[role] = fit_gap(outs, gaps)
        span = sum(w.steps[-1]["x"] - w.steps[0]["t"] for w in ws if w.steps)
        stats[f"{role}_steps"] = {"count": len(live), "live_ms": ms(live), "profiled_ms": ms(pred),
                                  "num_contended": int(sum(contended)), "gap_ms": ms(gaps),
                                  "busy_fraction": sum(live) / span if span else 0.0,
                                  "num_joins": int(sum(joins)), "num_join_steps": sum(1 for j in joins if j),
                                  "num_cold": int(sum(cold))}
    shared = any(w.shares_host_with(o) for w in workers for o in workers)  # a host with 2+ workers
    grid = CONTENTION_GRID if shared else [0.0]
    contention, scales = fit_scales(samples, grid)
    join = {role: fit_join(samples[role], join_counts[role], scales[role], contention) for role in samples}
    adjusted = {role: (v[0] - join[role] * join_counts[role], *v[1:]) for role, v in samples.items()}
    contention, scales = fit_scales(adjusted, grid)
    join = {role: fit_join(samples[role], join_counts[role], scales[role], contention) for role in samples}
    stats["contention"] = contention
    jitter = {role: fit_jitter(samples[role], join_counts[role], segments[role], step_starts[role], scales[role],
                                contention, join[role])
              for role in samples}
    steps = {role: StepOverhead(scale=scales[role].scale, gap_s=gap_fits[role][0],
                                gap_per_output_s=gap_fits[role][1],
                                scale_contended=scales[role].scale * (1 + contention) if shared else None,
                                prefill_scale=scales[role].prefill_scale, join_s=join[role],
                                jitter=jitter[role].sd,
                                jitter_corr_share=jitter[role].corr_share, jitter_corr_s=jitter[role].corr_s,
                                fixed_s=scales[role].fixed, cold_s=scales[role].cold)
             for role in samples}
    reservation = mean(forward) if forward else 2 * mean(to_worker)
    overheads = Overheads(admission_s=admission, return_s=mean(back), reservation_s=reservation,
                          kv_fixed_s=kv_fixed, kv_per_token_s=kv_per_token, steps=steps)
    return LiveFit(overheads, stats)


def step_speed(trace_dirs: TraceDirs, bench_results: list[dict], base: CalibratedPerfModel) -> dict[str, float]:
    """Per worker role, the live steps' total time over what ``base`` predicts for the same batches, in
    the window of ``bench_results`` (ratio of sums): how fast the host ran the engine during that run
    (a diagnostic; nothing is fitted)."""
    _, workers = _load(trace_dirs, [_window(r) for r in bench_results])
    out = {}
    for role in ROLES:
        steps = [s for w in workers if w.role == role for s in w.steps]
        predicted = sum(base.step_time_s(step_shape(s)) for s in steps)
        if predicted > 0:
            out[role] = sum(s["e"] - s["s"] for s in steps) / predicted
    return out


def load_bench_results(paths: list[str]) -> list[dict]:
    """``pdserve bench`` result files (single runs, or every run of a sweep)."""
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        runs = data.get("runs", [data]) if data.get("kind") == "sweep" else [data]
        for run in runs:
            if "clock_origin_s" not in run:
                raise ValueError(f"{path}: no clock_origin_s (written by an older pdserve bench)")
            out.append(run)
    return out


def format_fit(fit: LiveFit) -> str:
    """The measured breakdown and the fitted terms, as the CLI prints them."""
    o, st = fit.overheads, fit.stats
    lines = [f"matched {st['requests_matched']} client requests to the frontend trace",
             f"{'term':<34}{'fitted':>12}   measured (mean / p90, count)"]

    def row(name: str, value: str, key: str | None = None) -> None:
        m = st.get(key) if key else None
        extra = f"{m['mean']:.2f} / {m['p90']:.2f} ms, n={m['n']}" if m and m["n"] else ""
        lines.append(f"{name:<34}{value:>12}   {extra}")
    row("admission (client -> worker)", f"{o.admission_s * 1e3:.2f} ms", "client_to_frontend_ms")
    row("  of which frontend -> idle worker", "", "frontend_to_idle_worker_ms")
    row("return (worker -> client)", f"{o.return_s * 1e3:.2f} ms", "worker_to_client_ms")
    row("reservation forward", f"{o.reservation_s * 1e3:.2f} ms", "reservation_forward_ms")
    if o.kv_per_token_s is not None:
        row("KV copy (fixed + per token)", f"{o.kv_fixed_s * 1e3:.2f} ms + {o.kv_per_token_s * 1e6:.2f} us/tok",
            "kv_copy_ms")
        row("  KV landed -> decode picks it up", "(modelled)", "kv_pickup_wait_ms")
    for role, s in o.steps.items():
        r = st[f"{role}_steps"]
        lines.append(f"{role + ' steps':<34}{'x' + format(s.scale, '.3f'):>12}   live {r['live_ms']['mean']:.2f} ms vs "
                     f"profiled {r['profiled_ms']['mean']:.2f} ms, n={r['count']}, busy {r['busy_fraction']:.0%}")
        if s.prefill_scale is not None:
            lines.append(f"{'  their prefill part':<34}{'x' + format(s.prefill_scale, '.3f'):>12}")
        if s.scale_contended is not None:
            lines.append(f"{'  while another worker steps':<34}{'x' + format(s.scale_contended, '.3f'):>12}   "
                         f"n={r['num_contended']} (contention +{st['contention']:.1%})")
        if s.fixed_s:
            lines.append(f"{'  fixed, per step':<34}{s.fixed_s * 1e3:>9.2f} ms")
        if s.cold_s:
            lines.append(f"{'  per step after an idle spell':<34}{s.cold_s * 1e3:>9.2f} ms   "
                         f"{r['num_cold']} cold steps")
        if s.join_s:
            lines.append(f"{'  per request joining (1st decode)':<34}{s.join_s * 1e3:>9.2f} ms   "
                         f"{r['num_joins']} joins in {r['num_join_steps']} steps")
        if s.jitter:
            lines.append(f"{'  jitter (log std. dev.)':<34}{s.jitter:>12.3f}")
        if s.jitter_corr_share:
            lines.append(f"{'  of which persists':<34}{s.jitter_corr_share:>12.0%}   "
                         f"fading over {s.jitter_corr_s * 1e3:.0f} ms")
        row(f"{role} loop gap (+ per output)", f"{s.gap_s * 1e3:.2f}+{s.gap_per_output_s * 1e3:.3f} ms", None)
        m = r["gap_ms"]
        if m["n"]:
            lines[-1] += f"   {m['mean']:.2f} / {m['p90']:.2f} ms, n={m['n']}"
    return "\n".join(lines)


# ---- private ----------------------------------------------------------------------------------------


def _window(result: dict) -> tuple[float, float]:
    """A bench run's span on the host's monotonic clock: its start to its last response, with half a
    second on either side (a worker's events for a request all come before the client reads its last
    token; runs on one cluster follow each other a second or more apart)."""
    origin = result["clock_origin_s"]
    return origin - 0.5, origin + float(result.get("duration_s") or 0.0) + 0.5


def _in(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def _load(trace_dirs: TraceDirs, windows) -> tuple[list[dict], list[_Worker]]:
    """The frontend events and the workers of every directory (one cluster each), within ``windows``; a
    worker contends only with workers of its own cluster. A worker process traced over several windows
    (runs of one cluster with others between them) gives one ``_Worker`` per window: its steps are
    consecutive only within a window."""
    dirs = [Path(d) for d in (trace_dirs if isinstance(trace_dirs, list) else [trace_dirs])]
    windows = _merged(windows)
    files = []
    for cluster, trace_dir in enumerate(dirs):
        found = sorted(trace_dir.glob("*.jsonl"))
        if not found:
            raise ValueError(f"no trace files (*.jsonl) in {trace_dir}")
        files += [(cluster, path) for path in found]
    frontend: list[dict] = []
    workers = []
    for cluster, path in files:
        events = read_trace(path)
        if not events or events[0].get("ev") != "start":
            continue
        role = events[0].get("role", "")
        if role == "frontend":
            frontend += [e for e in events[1:] if _in(e.get("t", e.get("s", 0.0)), windows)]
        elif role in ROLES:
            for a, b in windows:
                kept = [e for e in events[1:] if a <= e.get("t", e.get("s", 0.0)) <= b]
                if kept:
                    steps = [e for e in kept if e["ev"] == "step"]
                    workers.append(_Worker(role, steps, [e for e in kept if e["ev"] != "step"],
                                           [s["t"] for s in steps], cluster, str(path)))
    return frontend, workers


def _merged(windows) -> list[tuple[float, float]]:
    """The union of the windows, as disjoint sorted intervals (runs of different clusters may overlap)."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(windows):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _match(bench_results: list[dict], submits: list[dict]) -> list[tuple[float, float, dict]]:
    """(client send, client first chunk, frontend submit) per request, in send order: each request takes
    the earliest unused submit of its prompt length after its send (within MATCH_WINDOW_S)."""
    submits = sorted(submits, key=lambda e: e["t"])
    used = [False] * len(submits)
    times = [e["t"] for e in submits]
    out = []
    for result in bench_results:
        origin = result["clock_origin_s"]
        for r in sorted(result.get("requests", []), key=lambda r: r["send_s"]):
            if r.get("ttft_s") is None:
                continue
            send = origin + r["send_s"]
            i = bisect_right(times, send - 0.001)
            while i < len(submits) and submits[i]["t"] - send <= MATCH_WINDOW_S:
                if not used[i] and submits[i].get("n") == r["input_len"]:
                    used[i] = True
                    out.append((send, send + r["ttft_s"], submits[i]))
                    break
                i += 1
    return out
