"""The elastic controller on synthetic signals: it moves toward the starving phase, respects the operator's
bounds, does not flap under noise (hysteresis, cooldown), and decides the same for the same signals."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from pdserve.control.attainment import Attainment, Objectives, PhaseAttainment, Sample
from pdserve.control.controller import (Bounds, ChangeRole, ElasticController, MoveCores, SetStepTarget, Signals,
                                        WorkerState, apply, colocate)

OBJ = Objectives(ttft_s=2.0, tpot_s=0.05)


def _signals(now, ttft, tpot, n=50, wait=0.0, itl=None):
    return Signals(now, PhaseAttainment(n, ttft, tpot, min(ttft, tpot), itl, None, None), wait)


def _host():  # one host, two cores: a decode worker on both, a parked prefill worker (colocated)
    return [WorkerState("d0", "decode", "h", (0, 1), 0.045), WorkerState("p0", "prefill", "h", ())]


def _run(ctrl, workers, signals):
    log = []
    for s in signals:
        decisions = ctrl.tick(s, workers)
        workers = apply(workers, decisions)
        log += [(s.now, d) for d in decisions]
    return workers, log


def test_hysteresis_then_time_then_cores_then_roles():
    ctrl = ElasticController(OBJ, hysteresis=3, cooldown_s=0)
    workers, log = _run(ctrl, _host(), [_signals(t, ttft=0.5, tpot=1.0) for t in range(3)])
    # prompts starve: on the third tick in a row, first more of each step for them
    assert [type(d) for _, d in log] == [SetStepTarget] and log[0][0] == 2
    assert log[0][1].step_target_s == pytest.approx(0.045 * 1.25)
    ctrl = ElasticController(OBJ, hysteresis=1, cooldown_s=0)
    workers, log = _run(ctrl, workers, [_signals(t, ttft=0.5, tpot=1.0) for t in range(3, 10)])
    kinds = [type(d).__name__ for _, d in log]
    # widened past 2x the TPOT objective: no limit at all; then a core goes to the prefill worker; then
    # nothing more (one decode worker with one core is the minimum, no role may change)
    assert kinds == ["SetStepTarget", "SetStepTarget", "SetStepTarget", "MoveCores"], kinds
    assert log[2][1].step_target_s is None
    assert {w.worker_id: w.cores for w in workers} == {"d0": (0,), "p0": (1,)}
    # now decodes starve: narrower steps first (down to 0.8x the TPOT objective), then the core comes back
    # (the prefill worker is parked again: a parked worker's role does not matter)
    workers, log = _run(ctrl, workers, [_signals(20 + t, ttft=1.0, tpot=0.4) for t in range(8)])
    kinds = [type(d).__name__ for _, d in log]
    assert kinds[:1] == ["SetStepTarget"] and log[0][1].step_target_s == pytest.approx(0.04)
    assert kinds[1:] == ["MoveCores"], kinds
    assert {w.worker_id: (w.role, w.cores) for w in workers} == {"d0": ("decode", (0, 1)), "p0": ("prefill", ())}


def test_decodes_that_fit_alone_split_off_the_prompts_and_stay_split():
    # colocated, decodes starve while prompts have slack, and the running decodes alone take 30 ms of a
    # 50 ms objective: the misses come from the prompts prefilled between them
    workers = [WorkerState("d0", "decode", "h", (0, 1), 0.04, decode_step_s=0.03), WorkerState("p0", "prefill", "h", ())]
    ctrl = ElasticController(OBJ, hysteresis=1, cooldown_s=0)
    workers, log = _run(ctrl, workers, [_signals(t, ttft=1.0, tpot=0.4) for t in range(6)])
    assert [type(d) for _, d in log] == [MoveCores]  # the step target is at its floor already: split
    assert {w.worker_id: w.cores for w in workers} == {"d0": (0,), "p0": (1,)}
    assert "interference" in log[0][1].reason
    # still starving, decodes still fit: the core does not come back (no flap), no role changes
    workers = [replace(w, decode_step_s=0.03) if w.role == "decode" else w for w in workers]
    _, log = _run(ctrl, workers, [_signals(10 + t, ttft=1.0, tpot=0.4) for t in range(6)])
    assert log == []
    # decodes that no longer fit alone (a longer batch): now the decode worker needs the core back
    workers = [replace(w, decode_step_s=0.06) if w.role == "decode" else w for w in workers]
    workers, log = _run(ctrl, workers, [_signals(20 + t, ttft=1.0, tpot=0.4) for t in range(2)])
    assert [type(d) for _, d in log] == [MoveCores] and {w.worker_id: w.cores for w in workers}["d0"] == (0, 1)


def test_no_wider_steps_when_the_decodes_tpot_would_miss():
    """Under overload every step carries a prompt chunk, so a step target 1.25x wider makes the decodes'
    gaps up to 1.25x longer: with the window's TPOT p90 at 45 ms of a 50 ms objective, prompts that starve
    get a core instead (the prefill worker unparks), not time the decodes cannot spare."""
    def starving_prompts(t, tpot_p90):
        return Signals(t, PhaseAttainment(50, 0.5, 1.0, 0.5, None, 3.0, tpot_p90))
    ctrl = ElasticController(OBJ, hysteresis=1, cooldown_s=0)
    workers, log = _run(ctrl, _host(), [starving_prompts(0, 0.045)])
    assert [type(d) for _, d in log] == [MoveCores] and {w.worker_id: w.cores for w in workers} == \
        {"d0": (0,), "p0": (1,)}
    _, log = _run(ElasticController(OBJ, hysteresis=1, cooldown_s=0), _host(), [starving_prompts(0, 0.035)])
    assert [type(d) for _, d in log] == [SetStepTarget]  # 35 ms x 1.25 = 44 ms: room to widen


def test_respects_bounds():
    ctrl = ElasticController(OBJ, Bounds(min_decode_cores=2), hysteresis=1, cooldown_s=0)
    host = [WorkerState("d0", "decode", "h", (0, 1), None), WorkerState("p0", "prefill", "h", ())]
    _, log = _run(ctrl, host, [_signals(0, ttft=0.5, tpot=1.0)])
    assert log == []  # no step target to widen, no core may leave, no role may change


def test_changes_whole_roles_across_hosts():
    workers = [WorkerState(f"w{i}", "decode", f"h{i}", (0,), None) for i in range(3)] + \
        [WorkerState("w3", "prefill", "h3", (0,))]
    ctrl = ElasticController(OBJ, Bounds(max_prefill_workers=2), hysteresis=1, cooldown_s=0)
    workers, log = _run(ctrl, workers, [_signals(t, ttft=0.3, tpot=1.0) for t in range(3)])
    roles = [w.role for w in workers]
    assert isinstance(log[0][1], ChangeRole) and roles.count("prefill") == 2  # bounded at 2
    assert all(not isinstance(d, ChangeRole) for _, d in log[1:])


def test_does_not_flap_under_noise_and_is_deterministic():
    def noisy(seed):
        rng = random.Random(seed)
        return [_signals(t, ttft=0.9 + rng.uniform(-0.06, 0.06), tpot=0.9 + rng.uniform(-0.06, 0.06))
                for t in range(200)]
    _, log = _run(ElasticController(OBJ), _host(), noisy(7))
    assert len(log) <= 2  # attainment around the target: (almost) nothing to do
    flapping = [_signals(t, ttft=0.5 if t % 2 else 1.0, tpot=1.0 if t % 2 else 0.5) for t in range(100)]
    _, log = _run(ElasticController(OBJ, hysteresis=3), _host(), flapping)
    assert log == []  # the starving phase alternates every tick: never three in a row
    a = _run(ElasticController(OBJ, cooldown_s=5), _host(), noisy(3) + [_signals(300 + t, 0.2, 1.0) for t in range(30)])
    b = _run(ElasticController(OBJ, cooldown_s=5), _host(), noisy(3) + [_signals(300 + t, 0.2, 1.0) for t in range(30)])
    assert a == b and a[1]
    times = [t for t, _ in a[1]]
    assert all(t2 - t1 >= 5 for t1, t2 in zip(times, times[1:]))  # the cooldown


def test_queue_pressure_counts_before_requests_finish():
    ctrl = ElasticController(OBJ, hysteresis=2, cooldown_s=0)
    _, log = _run(ctrl, _host(), [_signals(t, ttft=1.0, tpot=1.0, n=0, wait=5.0) for t in range(2)])
    assert isinstance(log[0][1], SetStepTarget) and log[0][1].reason.startswith("prefill starves")


def test_initial_step_targets_follow_the_tpot_objective():
    workers = [WorkerState("d0", "decode", "h", (0,)), WorkerState("p0", "prefill", "h", (1,))]
    assert ElasticController(OBJ).initial(workers) == [SetStepTarget("d0", pytest.approx(0.045), "initial: "
                                                                                                   "the TPOT objective")]
    assert ElasticController(Objectives(ttft_s=1.0)).initial(workers) == []


def test_attainment_window():
    a = Attainment(OBJ, window_s=10.0, max_samples=100)
    for i in range(20):
        a.record(Sample(t=float(i), ttft_s=1.0 if i % 4 else 3.0, tpot_s=0.04, max_itl_s=0.06, itls=(0.04, 0.06)))
    w = a.window(now=19.0)  # samples at t >= 9: 11 of them
    assert w.num_requests == 11 and w.tpot == 1.0
    assert w.ttft == pytest.approx(9 / 11) and w.both == pytest.approx(9 / 11)  # 12 and 16 miss
    assert w.itl_p99_s == 0.06 and w.ttft_p90_s == 3.0
    assert a.window(now=100.0).num_requests == 0


def test_workers_not_pinned_to_cores_change_roles_and_never_move_cores():
    # Ray actors (or GPU workers): cores None. Decodes starve and do not fit alone: no core can move, so a
    # whole prefill worker becomes a decode worker; nothing is parked, nothing is colocated at start.
    workers = [WorkerState("d0", "decode", "h", None, None, decode_step_s=0.08), WorkerState("p0", "prefill", "h", None)]
    assert colocate(workers) == []
    assert not any(w.is_parked for w in workers)
    ctrl = ElasticController(OBJ, hysteresis=1, cooldown_s=0)
    workers, log = _run(ctrl, workers, [_signals(t, ttft=1.0, tpot=0.4) for t in range(2)])
    # time first (the step target narrows to its floor), then the role
    assert [type(d) for _, d in log] == [SetStepTarget, ChangeRole] and [w.role for w in workers] == ["decode", "decode"]
    # prompts starve: time first again, then a worker goes back to prefill (one decode worker is kept: the bound)
    workers, log = _run(ctrl, workers, [_signals(10 + t, ttft=0.3, tpot=1.0) for t in range(12)])
    assert MoveCores not in [type(d) for _, d in log] and sorted(w.role for w in workers) == ["decode", "prefill"]


def test_a_move_undone_soon_after_is_held_back_doubling():
    """Decode-heavy at a tight TPOT (measured: docs/benchmarks.md): the decodes fit two cores alone, so
    the controller splits for prefill interference; on one core they no longer fit, and the core comes
    back 16 s later. Without a memory of that, the same split would follow every other cooldown. The
    split is held back for 60 s, then 120 s after it is undone again; a core move that lasts is not."""
    fits, too_long = 0.03, 0.06  # the decodes' step alone on two cores, and on one (objective 50 ms)

    def cycle(ctrl, workers, t0):
        """Decodes starve from t0 on, at 1 s ticks; the decode step follows the decode worker's cores."""
        log = []
        for t in range(t0, t0 + 200):
            step = fits if len({w.worker_id: w for w in workers}["d0"].cores) == 2 else too_long
            workers = [replace(w, decode_step_s=step) if w.role == "decode" else w for w in workers]
            decisions = ctrl.tick(_signals(t, ttft=1.0, tpot=0.4), workers)
            workers = apply(workers, decisions)
            log += [(t, d) for d in decisions if isinstance(d, MoveCores)]
        return workers, log

    workers = [WorkerState("d0", "decode", "h", (0, 1), 0.04), WorkerState("p0", "prefill", "h", ())]
    ctrl = ElasticController(OBJ, hysteresis=3, cooldown_s=15)
    _, log = cycle(ctrl, workers, 0)
    moves = [(t, d.src, d.dst) for t, d in log]
    # split at 2, core back at 17 (the cooldown): undone within 30 s, so no split before 17 + 60; again at
    # 77, back at 92: now held 120 s, so no split before 212
    assert moves == [(2, "d0", "p0"), (17, "p0", "d0"), (77, "d0", "p0"), (92, "p0", "d0")], moves
    assert ctrl.held_until(("cores", "d0", "p0")) == 92 + 120
    # a split that helps (the decodes still fit after it) stays, and holds nothing
    ctrl = ElasticController(OBJ, hysteresis=3, cooldown_s=15)
    workers = [WorkerState("d0", "decode", "h", (0, 1), 0.04, decode_step_s=fits), WorkerState("p0", "prefill", "h", ())]
    workers, log = _run(ctrl, workers, [_signals(t, ttft=1.0, tpot=0.4) for t in range(100)])
    assert [type(d) for _, d in log] == [MoveCores] and ctrl.held() == {}
    # the initial layout is not a move of the controller's to undo: a split soon after it holds nothing
    ctrl = ElasticController(OBJ, hysteresis=1, cooldown_s=0)
    workers = [WorkerState("d0", "decode", "h", (0,), 0.04, decode_step_s=fits), WorkerState("p0", "prefill", "h", (1,))]
    first = colocate(workers)
    ctrl.record(0, first)
    workers, log = _run(ctrl, apply(workers, first), [_signals(t, ttft=1.0, tpot=0.4) for t in range(1, 4)])
    assert [(d.src, d.dst) for _, d in log] == [("d0", "p0")] and ctrl.held() == {}
