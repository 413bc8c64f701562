"""The elastic controller: moves capacity between prefill and decode as the load changes. Pure Python.

Every ``tick`` it reads the phases' attainment over the last window (``control.attainment``) and the queue
pressure the router predicts, decides which phase starves, and, once the same phase has starved for
``hysteresis`` ticks in a row and no decision was taken in the last ``cooldown_s``, moves one unit of
capacity toward it, within the operator's bounds:

1. time inside the decode workers' steps: the step target of stall-free chunking (``engine.step_budget``)
   grows (up to no limit) when prefills starve, as long as the window's TPOT p90 grown as much would still
   meet the TPOT objective (a step with a prompt chunk lasts up to the target, so a wider target lengthens
   the decodes' gaps by up to as much: under overload every step has a chunk), and shrinks (down to
   ``min_step_target_share`` of the TPOT objective) when decodes starve: no drain, nothing moves;
2. else cores between workers of one host (a worker's thread count and affinity; a prefill worker may be
   parked at zero cores, its decode neighbour then prefilling locally: colocated). Which way a core goes
   when decodes starve depends on why: when the running decodes alone would fit the TPOT objective
   (``WorkerState.decode_step_s``), the misses come from the prompts prefilled in the same steps, and a core
   goes from the decode worker to its parked prefill neighbour (split: prompts go remote); when they would
   not, the decode worker needs the cores, and a core comes back from the prefill worker (colocated);
3. else the role of a whole worker (prefill <-> decode; on GPUs, where cores do not move, this is the
   unit beyond time); a worker changes role by draining: its running requests finish where they are, new
   ones follow the new role, so nothing is lost and no block leaks.

A move of cores or of a role that is undone within ``undo_window_s`` (the core comes back, the worker changes
back) did not help: the load that asked for it still asks for the reverse (say a split for prefill
interference, after which the decode worker's batch no longer fits one core). That move is then not made
again for ``hold_s``, doubled each time it is undone again (up to ``max_hold_s``), so a load that sits between
two layouts costs a few moves an hour, not one every other cooldown.

The step target starts at ``step_target_margin`` x the TPOT objective on every worker that runs decodes
(and none when there is no TPOT objective). Decisions are deterministic: the same signals give the same
decisions (no randomness; ties broken by worker id).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pdserve.control.attainment import Objectives, PhaseAttainment

PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class Bounds:
    """Operator bounds: workers per role (a parked worker counts for its role) and decode cores per host."""

    min_prefill_workers: int = 0
    max_prefill_workers: int = 1 << 30
    min_decode_workers: int = 1
    max_decode_workers: int = 1 << 30
    min_decode_cores: int = 1

    def __post_init__(self) -> None:
        if self.min_decode_workers < 1 or self.min_decode_cores < 1:
            raise ValueError("a cluster needs at least one decode worker with at least one core")
        if self.min_prefill_workers > self.max_prefill_workers or self.min_decode_workers > self.max_decode_workers:
            raise ValueError(f"bounds: a minimum above its maximum: {self}")


@dataclass(frozen=True)
class WorkerState:
    """A worker as the controller sees it. ``cores`` empty: parked (no work is routed to it); None: not pinned
    to cores (a Ray actor, a GPU worker): its cores do not move, its role may."""

    worker_id: str
    role: str  # prefill | decode (a decode worker also prefills locally: path choice decides)
    host: str
    cores: tuple[int, ...] | None = ()
    step_target_s: float | None = None
    decode_step_s: float = 0.0  # a step of its running decodes alone, predicted (0: none running, or unknown)

    @property
    def is_parked(self) -> bool:
        return self.cores == ()

    @property
    def is_pinned(self) -> bool:
        return self.cores is not None


@dataclass(frozen=True)
class Signals:
    """One tick's view: the window's attainment and the predicted wait of a new prompt for prefill."""

    now: float
    attainment: PhaseAttainment
    prefill_wait_s: float = 0.0  # predicted queueing before a new prompt's prefill starts (best path)


@dataclass(frozen=True)
class MoveCores:
    src: str
    dst: str
    src_cores: tuple[int, ...]  # what each keeps
    dst_cores: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class ChangeRole:
    worker_id: str
    role: str
    reason: str


@dataclass(frozen=True)
class SetStepTarget:
    worker_id: str
    step_target_s: float | None
    reason: str


Decision = MoveCores | ChangeRole | SetStepTarget


@dataclass
class ElasticController:
    objectives: Objectives
    bounds: Bounds = field(default_factory=Bounds)
    hysteresis: int = 3  # ticks the same phase must starve in a row
    cooldown_s: float = 15.0  # at least this long between two decisions
    margin: float = 0.05  # attainment below target - margin starves; above target + margin has slack
    min_samples: int = 8  # requests a window needs before its attainment counts
    step_target_margin: float = 0.9  # the initial step target, as a share of the TPOT objective
    step_target_factor: float = 1.25  # how much one decision widens or narrows it
    # The narrowest step target, as a share of the TPOT objective. Narrower steps do not help: once the
    # decodes alone fill the step, prompts still take their floor of it (engine.step_budget), and small
    # chunks cost more per token (docs/benchmarks.md, "Elastic prefill/decode").
    min_step_target_share: float = 0.8
    undo_window_s: float = 30.0  # a move reversed this soon did not help ...
    hold_s: float = 60.0  # ... and is not made again for this long, doubled at each further undo
    max_hold_s: float = 960.0
    _streak: tuple[str | None, int] = (None, 0)
    _last_decision_s: float = float("-inf")
    _now: float = 0.0
    _holds: dict[tuple, tuple[float, float]] = field(default_factory=dict)  # move -> (held until, hold)
    _moves: list[tuple[float, tuple]] = field(default_factory=list)  # (when, _key) of its own recent moves
    history: list[tuple[float, Decision]] = field(default_factory=list)
    max_history: int = 256

    def initial(self, workers: Sequence[WorkerState]) -> list[Decision]:
        """The step targets every decode worker starts with."""
        target = None if self.objectives.tpot_s is None else self.objectives.tpot_s * self.step_target_margin
        return [SetStepTarget(w.worker_id, target, "initial: the TPOT objective") for w in workers
                if w.role == DECODE and w.step_target_s != target]

    def starving(self, s: Signals) -> str | None:
        """The phase that misses its objective while the other has slack (None: neither, or both)."""
        a, o = s.attainment, self.objectives
        if a.num_requests < self.min_samples:
            if o.ttft_s is not None and s.prefill_wait_s > o.ttft_s:
                return PREFILL  # too few finished requests to judge, but prompts queue past the objective
            return None
        low, high = o.target - self.margin, o.target + self.margin
        ttft_low = a.ttft is not None and a.ttft < low
        tpot_low = (a.tpot is not None and a.tpot < low) or \
            (o.itl_p99_s is not None and a.itl_p99_s is not None and a.itl_p99_s > o.itl_p99_s)
        ttft_slack = a.ttft is None or a.ttft >= high
        tpot_slack = (a.tpot is None or a.tpot >= high) and \
            (o.itl_p99_s is None or a.itl_p99_s is None or a.itl_p99_s <= o.itl_p99_s)
        if ttft_low and tpot_slack:
            return PREFILL
        if tpot_low and ttft_slack:
            return DECODE
        return None

    def tick(self, signals: Signals, workers: Sequence[WorkerState]) -> list[Decision]:
        self._now = signals.now
        phase = self.starving(signals)
        streak_phase, streak = self._streak
        self._streak = (phase, streak + 1 if phase == streak_phase and phase is not None else int(phase is not None))
        if phase is None or self._streak[1] < self.hysteresis:
            return []
        if signals.now - self._last_decision_s < self.cooldown_s:
            return []
        decisions = self._toward(phase, sorted(workers, key=lambda w: w.worker_id), signals.attainment)
        if decisions:
            self._last_decision_s = signals.now
            self._streak = (None, 0)
            self._hold_undone(signals.now, decisions)
            self.record(signals.now, decisions)
        return decisions

    def held(self) -> dict[tuple, float]:
        """The moves held back now (``_key``s: ("cores", src, dst), ("role", worker, role)) and until when."""
        return {m: until for m, (until, _) in self._holds.items() if until > self._now}

    def held_until(self, move: tuple) -> float | None:
        """Until when ``move`` (``_key`` of a decision) is held back for having been undone (None: it is not)."""
        until, _ = self._holds.get(move, (None, 0.0))
        return until if until is not None and until > self._now else None

    def record(self, now: float, decisions: Sequence[Decision]) -> None:
        """Keep decisions (bounded) for whoever shows them (``/v1/cluster``)."""
        self.history.extend((now, d) for d in decisions)
        del self.history[:-self.max_history]

    # -- private -----------------------------------------------------------------------------------------
    def _hold_undone(self, now: float, decisions: Sequence[Decision]) -> None:
        """Hold back each earlier move of the controller's own (not the initial layout) that one of
        ``decisions`` reverses within ``undo_window_s``."""
        for d in decisions:
            reverse = _reverse_key(d)
            if reverse is None:
                continue
            made = next((t for t, m in reversed(self._moves) if m == reverse), None)
            if made is None or now - made > self.undo_window_s:
                continue
            until, hold = self._holds.get(reverse, (float("-inf"), 0.0))
            # held before and undone again soon after the hold ran out: twice as long; else afresh
            hold = min(2 * hold, self.max_hold_s) if now - until < self.max_hold_s else self.hold_s
            self._holds[reverse] = (now + hold, hold)
        for move in [m for m, (until, _) in self._holds.items() if now - until > self.max_hold_s]:
            del self._holds[move]  # calm for long enough: forgotten (bounded by workers x workers)
        self._moves += [(now, _key(d)) for d in decisions if _key(d) is not None]
        self._moves = [(t, m) for t, m in self._moves if now - t <= self.undo_window_s]

    def _toward(self, phase: str, workers: list[WorkerState], attainment: PhaseAttainment) -> list[Decision]:
        """Time first (no drain, no cache lost), then cores, then whole workers."""
        return self._retarget(phase, workers, attainment.tpot_p90_s) or self._split(phase, workers) or \
            self._move_core(phase, workers) or self._change_role(phase, workers)

    def _decodes_fit(self, w: WorkerState) -> bool:
        """Whether ``w``'s running decodes alone would meet the TPOT objective (known only while some run)."""
        tpot = self.objectives.tpot_s
        return tpot is not None and 0 < w.decode_step_s <= self.min_step_target_share * tpot

    def _split(self, phase: str, workers: list[WorkerState]) -> list[Decision]:
        """Decodes starve from the prompts prefilled between them: a core from the decode worker to its
        parked prefill neighbour, so that prompts go remote and the decode steps run decodes alone."""
        if phase != DECODE:
            return []
        for src in workers:
            if src.role != DECODE or len(src.cores or ()) <= self.bounds.min_decode_cores or \
                    not self._decodes_fit(src):
                continue
            dst = next((w for w in workers if w.role == PREFILL and w.is_parked and w.host == src.host), None)
            if dst is None or self.held_until(("cores", src.worker_id, dst.worker_id)) is not None:
                continue
            core = src.cores[-1]
            return [MoveCores(src.worker_id, dst.worker_id, src.cores[:-1], (core,),
                              f"decode starves from prefill interference (decodes alone: "
                              f"{_fmt(src.decode_step_s)}): core {core} from {src.worker_id} to {dst.worker_id}")]
        return []

    def _move_core(self, phase: str, workers: list[WorkerState]) -> list[Decision]:
        """One core from a worker of the other role to one of ``phase``'s, on the same host."""
        other = DECODE if phase == PREFILL else PREFILL
        for dst in workers:
            if dst.role != phase or not dst.is_pinned or (phase == DECODE and self._decodes_fit(dst)):
                continue  # decodes that fit their objective alone starve from interference: more cores won't help
            for src in workers:
                if src.role != other or src.host != dst.host or not src.cores:
                    continue
                if src.role == DECODE and len(src.cores) <= self.bounds.min_decode_cores:
                    continue
                if self.held_until(("cores", src.worker_id, dst.worker_id)) is not None:
                    continue
                core = src.cores[-1]
                return [MoveCores(src.worker_id, dst.worker_id, src.cores[:-1], tuple(sorted((*dst.cores, core))),
                                  f"{phase} starves: core {core} from {src.worker_id} to {dst.worker_id}")]
        return []

    def _change_role(self, phase: str, workers: list[WorkerState]) -> list[Decision]:
        """A whole worker of the other role becomes one of ``phase``'s (the least loaded one: the last)."""
        b = self.bounds
        num = {r: sum(1 for w in workers if w.role == r) for r in (PREFILL, DECODE)}
        if phase == PREFILL and (num[DECODE] <= b.min_decode_workers or num[PREFILL] >= b.max_prefill_workers):
            return []
        if phase == DECODE and (num[PREFILL] <= b.min_prefill_workers or num[DECODE] >= b.max_decode_workers):
            return []
        known = [w for w in workers if w.role == DECODE and w.decode_step_s > 0]
        if phase == DECODE and known and all(self._decodes_fit(w) for w in known):
            return []  # the decodes starve from interference, not from too few workers
        other = DECODE if phase == PREFILL else PREFILL
        candidates = [w for w in workers if w.role == other and not w.is_parked and
                      self.held_until(("role", w.worker_id, phase)) is None]
        if not candidates:
            return []
        w = candidates[-1]
        return [ChangeRole(w.worker_id, phase, f"{phase} starves: {w.worker_id} becomes a {phase} worker")]

    def _retarget(self, phase: str, workers: list[WorkerState], tpot_p90_s: float | None) -> list[Decision]:
        """Widen (prefill starves) or narrow (decode starves) the decode workers' step target. No widening
        when the window's TPOT p90 (``tpot_p90_s``; None: unknown) would miss the objective once as much
        wider: that trades one phase's misses for the other's (then cores or roles move instead)."""
        out: list[Decision] = []
        tpot = self.objectives.tpot_s
        if phase == PREFILL and tpot is not None and tpot_p90_s is not None and \
                tpot_p90_s * self.step_target_factor > tpot:
            return []
        for w in workers:
            if w.role != DECODE:
                continue
            t = w.step_target_s
            if phase == PREFILL:
                if t is None:
                    continue
                new = t * self.step_target_factor
                new = None if tpot is not None and new > 2 * tpot else new
            else:
                base = t if t is not None else (tpot if tpot is not None else None)
                if base is None or tpot is None or base <= self.min_step_target_share * tpot:
                    continue  # no narrower: below this the decodes alone fill the step (cores help instead)
                new = max(base / self.step_target_factor, self.min_step_target_share * tpot)
            out.append(SetStepTarget(w.worker_id, new, f"{phase} starves: step target of {w.worker_id} "
                                                        f"{_fmt(t)} -> {_fmt(new)}"))
        return out


def colocate(workers: Sequence[WorkerState]) -> list[Decision]:
    """Start colocated: on each host, the prefill workers' cores go to the host's first decode worker (the
    prefill workers are parked until the controller gives them cores back). Workers not pinned to cores
    stay as they are."""
    out: list[Decision] = []
    for host in sorted({w.host for w in workers if w.is_pinned}):
        here = sorted((w for w in workers if w.host == host and w.is_pinned), key=lambda w: w.worker_id)
        decode = next((w for w in here if w.role == DECODE), None)
        if decode is None:
            continue
        cores = set(decode.cores)
        for w in here:
            if w.role == PREFILL and w.cores:
                cores |= set(w.cores)
                out.append(MoveCores(w.worker_id, decode.worker_id, (), tuple(sorted(cores)),
                                     f"initial layout colocated: {w.worker_id}'s cores to {decode.worker_id}"))
    return out


def apply(workers: Sequence[WorkerState], decisions: Sequence[Decision]) -> list[WorkerState]:
    """The workers after ``decisions`` (what the frontend records once the workers confirm)."""
    by_id = {w.worker_id: w for w in workers}
    for d in decisions:
        if isinstance(d, MoveCores):
            by_id[d.src] = replace(by_id[d.src], cores=d.src_cores)
            by_id[d.dst] = replace(by_id[d.dst], cores=d.dst_cores)
        elif isinstance(d, ChangeRole):
            by_id[d.worker_id] = replace(by_id[d.worker_id], role=d.role)
        elif isinstance(d, SetStepTarget):
            by_id[d.worker_id] = replace(by_id[d.worker_id], step_target_s=d.step_target_s)
    return [by_id[w.worker_id] for w in workers]


def _key(d: Decision) -> tuple | None:
    """What a decision moves, for telling a move from its reverse (a step target is time, not a move)."""
    if isinstance(d, MoveCores):
        return ("cores", d.src, d.dst)
    if isinstance(d, ChangeRole):
        return ("role", d.worker_id, d.role)
    return None


def _reverse_key(d: Decision) -> tuple | None:
    """The key of the move ``d`` would undo: a core back the other way; a worker back to its other role."""
    if isinstance(d, MoveCores):
        return ("cores", d.dst, d.src)
    if isinstance(d, ChangeRole):
        return ("role", d.worker_id, DECODE if d.role == PREFILL else PREFILL)
    return None


def _fmt(t: float | None) -> str:
    return "none" if t is None else f"{t * 1e3:.0f} ms"
