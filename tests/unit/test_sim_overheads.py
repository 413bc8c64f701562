"""Live overheads: applied by the simulator exactly where the real cluster spends them, stored in the
calibration file, and fitted from traces of a live run (``pdserve profile --live``)."""
import json
import random

import numpy as np
import pytest

from pdserve.sim.calibrated import CalibratedPerfModel
from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.live import _Worker, fit_live, step_speed
from pdserve.sim.live_estimators import fit_scales as _fit_scales
from pdserve.sim.overheads import Overheads, StepNoise, StepOverhead
from pdserve.sim.simulator import SimOptions, Simulator, WorkItem
from pdserve.sim.workload import work_items, workload_config

MODEL = "smollm2-135m"
STEP_S = 0.010  # every step of the test models: a constant 10 ms


def _model_file(tmp_path, overheads=None, coef=(STEP_S, 0, 0, 0, 0)):
    return str(CalibratedPerfModel(list(coef), {"model": MODEL}, overheads).save(tmp_path / "pm.json"))


def _colocated():
    return ClusterSpec(MODEL, "colocated", colocated=PoolSpec("cpu-this-machine", 1))


def _disagg():
    pool = PoolSpec("cpu-this-machine", 1)
    return ClusterSpec(MODEL, "disaggregated", prefill=pool, decode=pool, kv_link="intra")


def _by_index(result):
    return {r["index"]: r for r in result["requests"]}


def test_colocated_step_admission_and_return_terms_are_exact(tmp_path):
    # admission 5 ms, steps 2 x 10 ms + 1 ms + 0.5 ms per output, return 2 ms.
    oh = Overheads(admission_s=0.005, return_s=0.002, steps={"both": StepOverhead(scale=2.0, gap_s=0.001,
                                                                                     gap_per_output_s=0.0005)})
    path = _model_file(tmp_path, oh)
    step = 2 * STEP_S + 0.001 + 0.0005
    for fast_forward in (False, True):
        r = Simulator(_colocated(), [WorkItem(0, 0.0, 16, 4)],
                      SimOptions(perf_model=path, num_blocks=64, fast_forward=fast_forward)).run()
        req = r["requests"][0]
        assert req["send_s"] == 0.0
        assert req["ttft_s"] == pytest.approx(0.005 + step + 0.002, abs=1e-12)
        assert req["e2e_s"] == pytest.approx(0.005 + 4 * step + 0.002, abs=1e-12)
        assert req["tpot_s"] == pytest.approx(step, abs=1e-12)
        assert r["itl_s"]["max"] == pytest.approx(step, abs=1e-12)
        assert r["duration_s"] == pytest.approx(0.005 + 4 * step + 0.002, abs=1e-12)


def test_closed_loop_client_waits_for_the_return_path(tmp_path):
    oh = Overheads(admission_s=0.003, return_s=0.002)
    path = _model_file(tmp_path, oh)
    items = [WorkItem(i, None, 16, 2) for i in range(3)]
    r = Simulator(_colocated(), items, SimOptions(perf_model=path, num_blocks=64), concurrency=1).run()
    sends = [q["send_s"] for q in sorted(r["requests"], key=lambda q: q["index"])]
    one = 0.003 + 2 * STEP_S + 0.002  # send -> the client sees the end
    assert sends == pytest.approx([0.0, one, 2 * one], abs=1e-12)


def test_disaggregated_flow_messages_wait_for_step_boundaries_and_contention(tmp_path):
    # Steps: 10 ms alone, 15 ms while the other instance is in a step. KV copy 1 ms + 0 per token.
    contended = {"prefill": StepOverhead(scale=1.0, scale_contended=1.5),
                 "decode": StepOverhead(scale=1.0, scale_contended=1.5)}
    oh = Overheads(kv_fixed_s=0.001, kv_per_token_s=0.0, steps=contended)
    path = _model_file(tmp_path, oh)
    items = [WorkItem(0, 0.0, 16, 3), WorkItem(1, 0.015, 16, 2)]
    r = _by_index(Simulator(_disagg(), items, SimOptions(perf_model=path, num_blocks=64)).run())
    # r0: prefill 0-10 (alone; the reservation, made by an empty decode step at 0, waits in the prefill's
    # inbox until 10), KV lands at 11 on an idle decode instance: first token at 11. Decodes 11-21
    # (alone), 21-36 (r1's prefill runs 15-30): done at 36.
    assert r[0]["ttft_s"] == pytest.approx(0.011, abs=1e-12)
    assert r[0]["e2e_s"] == pytest.approx(0.036, abs=1e-12)
    # r1 at 15: prefill 15-30 (contended: a decode step runs 11-21). Its reservation is made at the
    # decode step starting at 21 and leaves when that step ends (36); the KV copy runs 36-37; the decode
    # instance, idle since 36 (r0 done), takes it at 37; one decode 37-47 (alone).
    assert r[1]["ttft_s"] == pytest.approx(0.037 - 0.015, abs=1e-12)
    assert r[1]["e2e_s"] == pytest.approx(0.047 - 0.015, abs=1e-12)


def test_no_overheads_means_the_plain_profile(tmp_path):
    items = work_items(workload_config(num_requests=30, input_len=128, output_len=16, rate=5.0))
    plain = Simulator(_disagg(), items, SimOptions(perf_model=_model_file(tmp_path), num_blocks=256)).run()
    zero = Overheads(steps={"prefill": StepOverhead(), "decode": StepOverhead()})
    (tmp_path / "z").mkdir()
    same = Simulator(_disagg(), items, SimOptions(perf_model=_model_file(tmp_path / "z", zero), num_blocks=256)).run()
    for key in ("ttft_s", "tpot_s", "e2e_s", "itl_s", "duration_s"):
        assert plain[key] == same[key], key


def test_live_calibration_is_deterministic(tmp_path):
    oh = Overheads(admission_s=0.004, return_s=0.003, reservation_s=0.001, kv_fixed_s=0.0, kv_per_token_s=2e-5,
                   steps={"prefill": StepOverhead(scale=1.05, scale_contended=1.2),
                          "decode": StepOverhead(scale=0.95, gap_s=9e-4, gap_per_output_s=1e-5, scale_contended=1.1)})
    path = _model_file(tmp_path, oh, coef=(0.05, 2.4e-3, 1e-6, 2.8e-3, 1.7e-5))

    def run(seed):
        items = work_items(workload_config(num_requests=40, input_len=256, output_len=32, rate=1.0, seed=seed))
        return json.dumps(Simulator(_disagg(), items, SimOptions(perf_model=path, num_blocks=1024)).run(),
                          sort_keys=True)
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_calibration_file_round_trip_and_versions(tmp_path):
    oh = Overheads(admission_s=0.004, return_s=0.003, kv_fixed_s=0.001, kv_per_token_s=2e-5,
                   steps={"decode": StepOverhead(scale=1.1, gap_s=0.001, gap_per_output_s=1e-5,
                                                 scale_contended=1.3)})
    path = _model_file(tmp_path, oh)
    data = json.loads(open(path).read())
    assert data["version"] == 2 and data["overheads"]["steps"]["decode"]["scale_contended"] == 1.3
    loaded = CalibratedPerfModel.load(path)
    assert loaded.overheads == oh and loaded.coef == [STEP_S, 0, 0, 0, 0, 0]
    # Version 1 (no version key, five features, no overheads) still loads; a newer version is refused.
    v1 = {k: v for k, v in data.items() if k not in ("version", "overheads")}
    v1.update(features=data["features"][:5], coef=[STEP_S, 1e-3, 0, 0, 0])
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    old = CalibratedPerfModel.load(tmp_path / "v1.json")
    assert old.overheads is None and old.coef == [STEP_S, 1e-3, 0, 0, 0, 0]
    (tmp_path / "v3.json").write_text(json.dumps({**data, "version": 3}))
    with pytest.raises(ValueError, match="version 3"):
        CalibratedPerfModel.load(tmp_path / "v3.json")
    with pytest.raises(ValueError):
        Overheads.from_dict({"admission_s": 0.1, "typo_s": 1})
    with pytest.raises(ValueError):
        StepOverhead(scale=0.0)


def test_fit_scales_recovers_contention():
    rng = np.random.default_rng(0)
    samples = {}
    for role, scale in (("prefill", 1.2), ("decode", 0.9)):
        pred = rng.uniform(0.01, 0.5, 200)
        contended = (rng.random(200) < 0.5).astype(float)
        live = scale * pred * (1 + 0.3 * contended)
        samples[role] = (live, pred, contended, pred * (role == "prefill"), np.zeros(200), False)
    c, scales = _fit_scales(samples)
    assert c == pytest.approx(0.3, abs=0.005)
    assert scales["prefill"] == (pytest.approx(1.2, rel=0.01), None, pytest.approx(0.0, abs=1e-6), 0.0)
    assert scales["decode"] == (pytest.approx(0.9, rel=0.01), None, pytest.approx(0.0, abs=1e-6), 0.0)


def test_colocated_steps_get_a_scale_for_their_prefill_part():
    rng = np.random.default_rng(1)
    rest = rng.uniform(0.03, 0.08, 300)
    prefill = np.where(rng.random(300) < 0.3, rng.uniform(0.05, 1.0, 300), 0.0)
    live = 0.9 * rest + 1.15 * prefill
    c, scales = _fit_scales({"both": (live, rest + prefill, np.zeros(300), prefill, np.zeros(300), True)}, [0.0])
    assert c == 0.0 and scales["both"] == (pytest.approx(0.9), pytest.approx(1.15), 0.0, 0.0)
    step = StepOverhead(scale=0.9, gap_s=0.001, gap_per_output_s=0.0, prefill_scale=1.15)
    assert step.time_s(0.5, 1, prefill_part_s=0.3) == pytest.approx(0.9 * 0.2 + 1.15 * 0.3 + 0.001)


def _synthetic_trace(trace_dir, t0: float = 100.0) -> dict:
    """Two requests through a prefill and a decode worker, every time known; returns the bench result."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    events = {"frontend": [{"ev": "start", "role": "frontend", "t": t0}],
              "prefill": [{"ev": "start", "role": "prefill", "t": t0}],
              "decode": [{"ev": "start", "role": "decode", "t": t0}]}
    requests = []
    for i, (send, n) in enumerate(((0.0, 16), (1.0, 48))):
        rid = f"{trace_dir.name}-r{i}"  # request ids are unique across clusters (uuids in pdserve)
        sub = t0 + send + 0.004  # client -> frontend 4 ms
        events["frontend"].append({"ev": "submit", "rid": rid, "t": sub, "n": n})
        events["prefill"].append({"ev": "add", "rid": rid, "t": sub + 0.0005})  # frontend -> worker 0.5 ms
        s = sub + 0.001
        e = s + 0.012  # 1.2 x the 10 ms profile, decode idle
        events["prefill"].append({"ev": "step", "t": s, "s": s, "e": e, "x": e, "busy": False,
                                  "chunks": [[0, n, 1]], "n_out": 1})
        kv = 0.001 + 2e-5 * n  # KV copy: 1 ms + 20 us per token
        events["prefill"].append({"ev": "kv_send", "rid": rid, "s": e, "e": e + kv, "tokens": n, "bytes": 1, "ok": True})
        first = e + kv
        events["decode"].append({"ev": "kv_recv", "rid": rid, "t": first})
        events["decode"].append({"ev": "first", "rid": rid, "t": first})
        ts = first
        for j in range(3):  # three back-to-back decode steps of 9 ms (the first 4 ms more: the request's
            # join) with 1 ms between them
            dt = 0.009 + (0.004 if j == 0 else 0.0)
            events["decode"].append({"ev": "step", "t": ts, "s": ts, "e": ts + dt, "x": ts + 0.0005 + dt,
                                     "busy": j < 2, "chunks": [[n + j, 1, 1]], "n_out": 1})
            ts += dt + 0.001
        requests.append({"send_s": send, "ttft_s": first + 0.003 - (t0 + send), "input_len": n})  # return 3 ms
    for name, evs in events.items():
        (trace_dir / f"{name}.jsonl").write_text("\n".join(json.dumps(e) for e in evs) + "\n")
    return {"clock_origin_s": t0, "duration_s": 2.0, "requests": requests}


def test_fit_live_from_a_synthetic_trace(tmp_path):
    """The fitted terms are the ones the trace was written with."""
    bench = _synthetic_trace(tmp_path)
    base = CalibratedPerfModel([STEP_S, 0, 0, 0, 0])
    fit = fit_live(tmp_path, [bench], base)
    o = fit.overheads
    assert fit.stats["requests_matched"] == 2
    assert o.admission_s == pytest.approx(0.0045, abs=1e-9)
    assert o.return_s == pytest.approx(0.003, abs=1e-9)
    assert o.kv_fixed_s == pytest.approx(0.001, abs=1e-9) and o.kv_per_token_s == pytest.approx(2e-5, rel=1e-6)
    assert o.steps["prefill"].scale == pytest.approx(1.2, rel=1e-6)
    assert o.steps["decode"].scale == pytest.approx(0.9, rel=1e-6)
    assert o.steps["decode"].join_s == pytest.approx(0.004, abs=1e-9) and o.steps["prefill"].join_s == 0.0
    assert fit.stats["decode_steps"]["num_joins"] == 2
    speed = step_speed(tmp_path, [bench], base)  # live over profiled, nothing fitted
    assert speed["prefill"] == pytest.approx(1.2) and speed["decode"] == pytest.approx((6 * 9 + 2 * 4) / 60)
    assert o.steps["decode"].gap_s + o.steps["decode"].gap_per_output_s == pytest.approx(0.001, abs=1e-9)


def test_fast_forward_is_exact_with_padded_decode_attention(tmp_path):
    # The padded term depends on the longest context, which grows by one per fast-forwarded step.
    oh = Overheads(return_s=0.002, steps={"both": StepOverhead(scale=1.1, gap_s=5e-4, gap_per_output_s=1e-5)})
    path = _model_file(tmp_path, oh, coef=(0.01, 2e-4, 1e-8, 1e-3, 1e-6, 4e-6))
    items = work_items(workload_config(num_requests=60, input_len_range=(8, 600), output_len_range=(4, 80),
                                       rate=4.0, seed=3))
    runs = [Simulator(_colocated(), items, SimOptions(perf_model=path, num_blocks=2048, fast_forward=ff)).run()
            for ff in (False, True)]
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "duration_s"):
        assert runs[0][key] == runs[1][key], key


def test_prefill_scale_applies_to_the_prefill_part_only(tmp_path):
    oh = Overheads(steps={"both": StepOverhead(scale=2.0, gap_s=0.001, gap_per_output_s=0.0005, prefill_scale=3.0)})
    path = _model_file(tmp_path, oh, coef=(STEP_S, 1e-4, 0, 0, 0, 0))  # + 0.1 ms per prefill token
    r = Simulator(_colocated(), [WorkItem(0, 0.0, 16, 3)], SimOptions(perf_model=path, num_blocks=64)).run()
    first = 2 * STEP_S + 3 * 16e-4 + 0.0015  # the prompt's step: its 1.6 ms prefill part x3
    decode = 2 * STEP_S + 0.0015
    assert r["requests"][0]["ttft_s"] == pytest.approx(first, abs=1e-12)
    assert r["requests"][0]["e2e_s"] == pytest.approx(first + 2 * decode, abs=1e-12)


@pytest.mark.parametrize("cluster", [_colocated, _disagg])
def test_a_request_first_decode_step_costs_its_join(tmp_path, cluster):
    """``join_s`` lands once per request, on the step of its first decode, in either layout, with and
    without fast-forward; every other time is unchanged."""
    items = [WorkItem(0, 0.0, 16, 5), WorkItem(1, 0.5, 16, 5)]
    role = "both" if cluster is _colocated else "decode"
    runs = {}
    for join in (0.0, 0.003):
        steps = {role: StepOverhead(scale=1.0, join_s=join)}
        if role == "decode":
            steps["prefill"] = StepOverhead(scale=1.0)
        path = _model_file(tmp_path, Overheads(steps=steps))
        for ff in (False, True):
            runs[join, ff] = _by_index(Simulator(cluster(), items, SimOptions(perf_model=path, num_blocks=64,
                                                                               fast_forward=ff)).run())
    for ff in (False, True):
        for i in (0, 1):
            plain, joined = runs[0.0, ff][i], runs[0.003, ff][i]
            assert joined["ttft_s"] == pytest.approx(plain["ttft_s"], abs=1e-12)
            assert joined["e2e_s"] == pytest.approx(plain["e2e_s"] + 0.003, abs=1e-12)
    assert runs[0.003, True] == runs[0.003, False]
    with pytest.raises(ValueError, match="join, jitter, fixed and cold >= 0"):
        StepOverhead(scale=1.0, join_s=-1e-3)


def test_fit_live_pools_calibration_runs_of_several_clusters(tmp_path):
    """Two clusters traced at different times into two directories: the pooled fit has the same terms
    (the same trace twice) and counts both runs' requests and steps."""
    benches = [_synthetic_trace(tmp_path / "a", 100.0), _synthetic_trace(tmp_path / "b", 500.0)]
    base = CalibratedPerfModel([STEP_S, 0, 0, 0, 0])
    one = fit_live(tmp_path / "a", benches[:1], base)
    both = fit_live([tmp_path / "a", tmp_path / "b"], benches, base)
    assert both.stats["requests_matched"] == 4 and both.stats["decode_steps"]["count"] == 12
    assert both.stats["contention"] == one.stats["contention"]
    for role in ("prefill", "decode"):
        for key, value in vars(one.overheads.steps[role]).items():
            pooled = getattr(both.overheads.steps[role], key)
            assert pooled == value if value is None else pooled == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert both.overheads.admission_s == pytest.approx(one.overheads.admission_s, abs=1e-9)


def test_pooled_colocated_clusters_do_not_contend(tmp_path):
    """One colocated worker per cluster, two clusters pooled: no contention term (each host has one
    worker), whatever the timing."""
    benches = []
    for k, t0 in enumerate((100.0, 100.005)):  # overlapping on purpose: still two separate hosts
        d = tmp_path / f"c{k}"
        d.mkdir()
        steps = [{"ev": "step", "t": t0 + i * 0.02, "s": t0 + i * 0.02, "e": t0 + i * 0.02 + 0.012,
                  "x": t0 + i * 0.02 + 0.012, "busy": True, "chunks": [[16 + i, 1, 1]], "n_out": 1} for i in range(5)]
        (d / "worker.jsonl").write_text("\n".join(json.dumps(e) for e in [{"ev": "start", "role": "both", "t": t0},
                                                                            *steps]) + "\n")
        (d / "frontend.jsonl").write_text(json.dumps({"ev": "start", "role": "frontend", "t": t0}) + "\n"
                                          + json.dumps({"ev": "submit", "rid": f"c{k}", "t": t0, "n": 16}) + "\n")
        benches.append({"clock_origin_s": t0, "duration_s": 0.2,
                        "requests": [{"send_s": 0.0, "ttft_s": 0.01, "input_len": 16}]})
    fit = fit_live([tmp_path / "c0", tmp_path / "c1"], benches, CalibratedPerfModel([STEP_S, 0, 0, 0, 0]))
    both = fit.overheads.steps["both"]
    assert both.scale_contended is None and fit.stats["contention"] == 0.0
    assert both.scale == pytest.approx(1.2)


def test_runs_of_one_cluster_with_another_run_between_fit_apart(tmp_path):
    """Calibration runs before and after a scored run on one cluster (one trace directory): the fit uses
    the calibration windows only, and a worker's steps are consecutive only within a window (no loop gap
    spans the scored run, even from a step that left work behind)."""
    runs = {name: _synthetic_trace(tmp_path / name, t0) for name, t0 in (("a", 100.0), ("b", 200.0), ("c", 300.0))}
    merged = tmp_path / "cluster"
    merged.mkdir()
    for role in ("frontend", "prefill", "decode"):
        events = []
        for name in ("a", "b", "c"):
            lines = (tmp_path / name / f"{role}.jsonl").read_text().splitlines()
            events += [json.loads(x) for x in (lines if not events else lines[1:])]  # one start event
        if role == "decode":
            last_a = max(i for i, e in enumerate(events) if e["ev"] == "step" and e["s"] < 200.0)
            events[last_a]["busy"] = True  # work remained when run a's window closed
        (merged / f"{role}.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    base = CalibratedPerfModel([STEP_S, 0, 0, 0, 0])
    fit = fit_live(merged, [runs["a"], runs["c"]], base)
    assert fit.stats["requests_matched"] == 4 and fit.stats["decode_steps"]["count"] == 12
    assert fit.stats["decode_steps"]["gap_ms"]["n"] == 8 and fit.stats["decode_steps"]["gap_ms"]["max"] < 1.5
    assert fit.overheads.steps["decode"].scale == pytest.approx(0.9, rel=1e-6)
    assert step_speed(merged, [runs["b"]], base)["prefill"] == pytest.approx(1.2)


def test_a_message_that_waited_for_a_step_is_not_counted_as_idle():
    """A reservation sent just before the worker started a step, read after it: it waited for the step
    (the simulator models that wait), so it is not a sample of the bare forwarding time."""
    w = _Worker("prefill", [{"ev": "step", "t": 1.0, "s": 1.001, "e": 1.5, "x": 1.5}], [], [1.0])
    assert not w.is_idle_between(0.99, 1.501)  # sent before the step, read after it
    assert not w.is_idle_between(1.2, 1.501)  # sent during it
    assert w.is_idle_between(0.5, 0.9) and w.is_idle_between(1.6, 1.7)
    assert w.is_idle_between(0.99, 1.0)  # read by the iteration that then ran the step


def _fit_one_colocated_worker(trace_dir, steps: list[dict], benches: list[dict], role: str = "both",
                              base: CalibratedPerfModel | None = None):
    """``fit_live`` on one worker's ``steps`` (colocated unless ``role`` says otherwise) and a frontend
    with one submit per bench run (at its clock origin), traced into ``trace_dir``."""
    submits = [{"ev": "submit", "rid": f"r{i}", "t": b["clock_origin_s"], "n": 16} for i, b in enumerate(benches)]
    for name, r, events in (("worker", role, steps), ("frontend", "frontend", submits)):
        lines = [{"ev": "start", "role": r, "t": 0.0}, *events]
        (trace_dir / f"{name}.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    return fit_live(trace_dir, benches, base or CalibratedPerfModel([STEP_S, 0, 0, 0, 0]))


def test_one_worker_over_several_windows_does_not_contend_with_itself(tmp_path):
    """A colocated worker traced over two calibration runs: one process, so no contention term."""
    steps, benches = [], []
    for t0 in (100.0, 200.0):
        steps += [{"ev": "step", "t": t0 + i * 0.02, "s": t0 + i * 0.02, "e": t0 + i * 0.02 + 0.012,
                   "x": t0 + i * 0.02 + 0.012, "busy": True, "chunks": [[16 + i, 1, 1]], "n_out": 1} for i in range(5)]
        benches.append({"clock_origin_s": t0, "duration_s": 0.2,
                        "requests": [{"send_s": 0.0, "ttft_s": 0.01, "input_len": 16}]})
    fit = _fit_one_colocated_worker(tmp_path, steps, benches)
    assert fit.overheads.steps["both"].scale_contended is None and fit.stats["contention"] == 0.0
    assert fit.stats["both_steps"]["count"] == 10 and fit.stats["both_steps"]["gap_ms"]["n"] == 8


def test_fit_live_measures_step_jitter_within_each_window(tmp_path):
    """Steps drawn log-normally around 1.1 x the profile (log std. dev. 0.12) in one window and 1.3 x in
    another: the jitter is the draws' spread, not the windows' difference."""
    rng = np.random.default_rng(0)
    steps, benches = [], []
    for t0, speed in ((100.0, 1.1), (200.0, 1.3)):
        t = t0
        for _ in range(800):
            dt = STEP_S * speed * float(np.exp(rng.normal(0.0, 0.12)))
            steps.append({"ev": "step", "t": t, "s": t, "e": t + dt, "x": t + dt, "busy": False,
                          "chunks": [[16, 1, 1]], "n_out": 1})
            t += dt + 0.001
        benches.append({"clock_origin_s": t0, "duration_s": t - t0,
                        "requests": [{"send_s": 0.0, "ttft_s": 0.01, "input_len": 16}]})
    fit = _fit_one_colocated_worker(tmp_path, steps, benches)
    assert fit.overheads.steps["both"].jitter == pytest.approx(0.12, rel=0.08)


def _jittered_steps(rng, t0: float, n: int, jitter: float, share: float, corr_s: float) -> list[dict]:
    """``n`` back-to-back steps from ``t0``, each STEP_S x a log-normal factor (log std. dev. ``jitter``) of
    which ``share`` of the variance persists with time constant ``corr_s`` (drawn here with numpy)."""
    steps, t, persistent = [], t0, 0.0
    for i in range(n):
        keep = float(np.exp(-STEP_S / corr_s)) if i else 0.0
        persistent = persistent * keep + rng.normal(0.0, np.sqrt(share * (1 - keep * keep))) * jitter
        dt = STEP_S * float(np.exp(persistent + rng.normal(0.0, np.sqrt(1 - share)) * jitter))
        steps.append({"ev": "step", "t": t, "s": t, "e": t + dt, "x": t + dt, "busy": False,
                      "chunks": [[16, 1, 1]], "n_out": 1})
        t += dt + 0.001
    return steps


def test_fit_live_measures_the_memory_of_the_jitter(tmp_path):
    """Steps whose jitter keeps 60% of its variance over 0.2 s: the fit finds the spread, the share and
    the time constant; independent draws have no memory."""
    rng = np.random.default_rng(3)
    for share, corr_s in ((0.6, 0.2), (0.0, 0.2)):
        steps = _jittered_steps(rng, 100.0, 3000, 0.15, share, corr_s)
        bench = {"clock_origin_s": 100.0, "duration_s": steps[-1]["x"] - 100.0,
                 "requests": [{"send_s": 0.0, "ttft_s": 0.01, "input_len": 16}]}
        step = _fit_one_colocated_worker(tmp_path, steps, [bench]).overheads.steps["both"]
        assert step.jitter == pytest.approx(0.15, rel=0.1)
        if share:
            assert step.jitter_corr_share == pytest.approx(share, abs=0.12)
            assert step.jitter_corr_s == pytest.approx(corr_s, rel=0.4)
        else:
            assert step.jitter_corr_share == 0.0 and step.jitter_corr_s == 0.0


def test_step_noise_with_memory_keeps_its_mean_spread_and_correlation():
    """``StepNoise``: mean 1 and the log spread asked, with or without memory; the persistent share's
    correlation fades over the time between steps, not their number; seeded; no memory draws exactly
    the plain log-normal factors."""
    def logs(share, corr_s, seed="s", n=40000, dt=0.025):
        noise = StepNoise(StepOverhead(scale=1.0, jitter=0.2, jitter_corr_share=share, jitter_corr_s=corr_s), seed)
        return np.log([noise.factor(i * dt) for i in range(n)])

    def corr(x, lag):
        return float(np.corrcoef(x[:-lag], x[lag:])[0, 1])

    for share, corr_s in ((0.0, 0.0), (0.6, 0.5)):
        x = logs(share, corr_s)
        assert np.exp(x).mean() == pytest.approx(1.0, abs=0.02)
        assert x.std() == pytest.approx(0.2, rel=0.05)
    x = logs(0.6, 0.5)
    assert corr(x, 2) == pytest.approx(0.6 * np.exp(-0.1), abs=0.05)  # 50 ms apart
    assert corr(x, 40) == pytest.approx(0.6 * np.exp(-2.0), abs=0.05)  # 1 s apart
    assert corr(logs(0.6, 0.5, dt=0.05), 20) == pytest.approx(corr(x, 40), abs=0.05)
    assert corr(logs(0.0, 0.0), 1) == pytest.approx(0.0, abs=0.03)
    assert np.array_equal(logs(0.6, 0.5, n=100), logs(0.6, 0.5, n=100))
    assert not np.array_equal(logs(0.6, 0.5, n=100), logs(0.6, 0.5, seed="t", n=100))
    plain = random.Random("s")
    assert np.allclose(logs(0.0, 0.0, n=100), [plain.gauss(0.0, 0.2) - 0.02 for _ in range(100)])
    for bad in ({"jitter_corr_share": 1.5, "jitter_corr_s": 1.0}, {"jitter_corr_share": 0.5},
                {"jitter_corr_s": 1.0}, {"jitter_corr_share": 0.5, "jitter_corr_s": -1.0}):
        with pytest.raises(ValueError, match="jitter_corr"):
            StepOverhead(scale=1.0, jitter=0.1, **bad)


def test_jitter_with_memory_spreads_requests_tpot(tmp_path):
    """The same step spread, with and without memory: each request's TPOT averages its steps' jitter, so
    only jitter that persists over a request's decode spreads the requests' TPOT apart; the mean holds."""
    items = work_items(workload_config(num_requests=300, input_len=64, output_len=32, rate=2.0, seed=1))

    def tpot(share, corr_s):
        step = StepOverhead(scale=1.0, jitter=0.15, jitter_corr_share=share, jitter_corr_s=corr_s)
        path = _model_file(tmp_path, Overheads(steps={"both": step}))
        return Simulator(_colocated(), items, SimOptions(perf_model=path, num_blocks=1024)).run()["tpot_s"]

    fresh, lasting = tpot(0.0, 0.0), tpot(0.6, 0.5)
    assert lasting["mean"] == pytest.approx(fresh["mean"], rel=0.05)
    assert lasting["p90"] / lasting["p50"] > 1.05 > fresh["p90"] / fresh["p50"]


def test_step_jitter_keeps_the_mean_and_is_seeded(tmp_path):
    """Jittered steps: the same seed gives the same run bit for bit, another seed another run; over many
    steps the mean step time is the model's; no jitter is the plain model exactly."""
    items = work_items(workload_config(num_requests=40, input_len=64, output_len=64, rate=2.0, seed=1))

    def run(jitter, seed=0):
        path = _model_file(tmp_path, Overheads(steps={"both": StepOverhead(scale=1.0, jitter=jitter)}))
        return Simulator(_colocated(), items, SimOptions(perf_model=path, num_blocks=1024, seed=seed)).run()

    plain = Simulator(_colocated(), items, SimOptions(perf_model=_model_file(tmp_path), num_blocks=1024)).run()
    assert run(0.0)["tpot_s"] == plain["tpot_s"]
    a, b, c = run(0.2), run(0.2), run(0.2, seed=1)
    assert a == b and a["tpot_s"] != c["tpot_s"]
    assert a["tpot_s"]["mean"] == pytest.approx(plain["tpot_s"]["mean"], rel=0.05)
    assert a["tpot_s"]["max"] > plain["tpot_s"]["max"]
    with pytest.raises(ValueError, match="jitter"):
        StepOverhead(scale=1.0, jitter=-0.1)


def test_fit_scales_separates_a_fixed_and_a_cold_cost_where_the_steps_tell_them_apart():
    """A prefill worker's steps of many sizes, cold and warm, give a scale, a fixed cost per step and a
    cold cost; decode steps of nearly one size cannot tell a fixed cost from the scale: a scale alone
    (the ratio of sums, so their total time is kept)."""
    rng = np.random.default_rng(2)
    pred = rng.uniform(0.04, 2.0, 300)
    cold = (rng.random(300) < 0.6).astype(float)
    prefill = (1.05 * pred + 0.012 + 0.015 * cold, pred, np.zeros(300), pred, cold, False)
    dpred = rng.uniform(0.025, 0.04, 300)
    decode = (1.1 * dpred + 0.005, dpred, np.zeros(300), np.zeros(300), np.zeros(300), False)
    _, fits = _fit_scales({"prefill": prefill, "decode": decode}, [0.0])
    assert fits["prefill"] == pytest.approx((1.05, None, 0.012, 0.015))
    assert fits["decode"] == (pytest.approx(decode[0].sum() / dpred.sum()), None, 0.0, 0.0)


def test_a_step_after_an_idle_spell_costs_cold_and_every_step_its_fixed_cost(tmp_path):
    """``cold_s`` lands on the first step after the worker sat idle (each request's prompt here), not on
    back-to-back steps; ``fixed_s`` on every step; with and without fast-forward."""
    oh = Overheads(steps={"both": StepOverhead(scale=1.0, fixed_s=0.002, cold_s=0.005)})
    path = _model_file(tmp_path, oh)
    items = [WorkItem(0, 0.0, 16, 3), WorkItem(1, 0.5, 16, 3)]
    runs = [_by_index(Simulator(_colocated(), items, SimOptions(perf_model=path, num_blocks=64,
                                                                fast_forward=ff)).run()) for ff in (False, True)]
    assert runs[0] == runs[1]
    for i in (0, 1):
        assert runs[0][i]["ttft_s"] == pytest.approx(STEP_S + 0.002 + 0.005, abs=1e-12)
        assert runs[0][i]["e2e_s"] == pytest.approx(STEP_S + 0.007 + 2 * (STEP_S + 0.002), abs=1e-12)
    step = StepOverhead(scale=1.0, join_s=0.003, cold_s=0.005)
    assert step.time_s(STEP_S, 1, cold=True) == pytest.approx(STEP_S + 0.005)
    assert step.time_s(STEP_S, 1, cold=True, num_joining=1) == pytest.approx(STEP_S + 0.003)  # join_s has it


def test_fit_live_finds_a_prefill_worker_s_fixed_and_cold_step_costs(tmp_path):
    """Prompts of 16-1,000 tokens, every other step after a 1 s idle spell: the trace's steps take
    1.1 x profiled + 8 ms, + 20 ms when cold, and the fit says so."""
    base = CalibratedPerfModel([STEP_S, 1e-4, 0, 0, 0])
    rng = np.random.default_rng(3)
    steps, t = [], 100.0
    for i in range(200):
        n = int(rng.integers(16, 1000))
        cold = i % 2 == 0
        t += 1.0 if cold else 0.001
        dt = 1.1 * (STEP_S + 1e-4 * n) + 0.008 + 0.02 * cold
        steps.append({"ev": "step", "t": t, "s": t, "e": t + dt, "x": t + dt, "busy": not cold,
                      "chunks": [[0, n, 1]], "n_out": 1})
        t += dt
    bench = {"clock_origin_s": 99.0, "duration_s": t - 99.0, "requests": [{"send_s": 0.0, "ttft_s": 0.01,
                                                                           "input_len": 16}]}
    fit = _fit_one_colocated_worker(tmp_path, steps, [bench], role="prefill", base=base)
    step = fit.overheads.steps["prefill"]
    assert (step.scale, step.fixed_s, step.cold_s) == pytest.approx((1.1, 0.008, 0.02))
    assert fit.stats["prefill_steps"]["num_cold"] == 100
