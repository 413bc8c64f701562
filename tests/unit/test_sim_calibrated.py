import subprocess
import sys

import numpy as np
import pytest

from pdserve.sim.calibrated import CalibratedPerfModel, fit
from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.perf_model import BatchShape
from pdserve.sim.profile import median_of_passes
from pdserve.sim.simulator import SimOptions, Simulator
from pdserve.sim.workload import work_items, workload_config


class _Chunk:
    def __init__(self, start, num_tokens, samples):
        self.start, self.num_tokens, self.samples = start, num_tokens, samples


def _shapes():
    out = []
    for n in (16, 64, 256, 1024):
        out.append(BatchShape(n, n * (n + 1) / 2, n, 0, 0, 1))
    for b in (1, 4, 16, 64):
        for ctx in (64, 512):
            out.append(BatchShape(num_decode=b, decode_ctx=b * ctx, num_samples=b))
    for b in (4, 16):  # one long context among short ones: the padded term differs from the sum
        out.append(BatchShape(num_decode=b, decode_ctx=512 + 64 * (b - 1), num_samples=b, decode_max_ctx=512))
    return out


def test_padded_decode_context():
    uneven = BatchShape.from_chunks([_Chunk(511, 1, True), _Chunk(63, 1, True), _Chunk(0, 16, True)])
    assert (uneven.num_decode, uneven.decode_ctx, uneven.decode_max_ctx, uneven.decode_padded_ctx) == (2, 576, 512, 1024)
    assert BatchShape(num_decode=4, decode_ctx=256).decode_padded_ctx == 256  # no maximum given: even contexts


def test_fit_recovers_coefficients():
    true = [2e-3, 1e-5, 1e-9, 2e-4, 1e-7, 3e-7]
    shapes = _shapes()
    rng = np.random.default_rng(0)
    times = [float(np.dot(true, s.features())) * (1 + 0.01 * rng.standard_normal()) for s in shapes]
    model, stats = fit(shapes, times)
    assert stats["mape"] < 0.03 and stats["r2"] > 0.99
    assert all(c >= 0 for c in model.coef)
    assert model.step_time_s(shapes[0]) == pytest.approx(times[0], rel=0.05)


def test_fit_finds_the_decode_knee():
    """Steps whose decodes cost nothing up to 4 per step (weights streamed either way), then linearly:
    the fit picks knee 4 and predicts the flat part; a plain linear model would not."""
    true = [20e-3, 1e-5, 0.0, 2e-3, 1e-7, 0.0]
    shapes = _shapes()
    times = [float(np.dot(true, s.features(4))) for s in shapes]
    model, stats = fit(shapes, times)
    assert model.decode_knee == 4 and stats["decode_knee"] == 4
    for n in (1, 3, 4, 16):
        shape = BatchShape(num_decode=n, decode_ctx=100 * n, num_samples=n)
        assert model.step_time_s(shape) == pytest.approx(float(np.dot(true, shape.features(4))), rel=1e-6)


def test_file_round_trip_and_use_in_sim(tmp_path):
    model = CalibratedPerfModel([5e-3, 1e-5, 0.0, 1e-4, 1e-8], {"model": "smollm2-135m", "hardware": "cpu"})
    path = model.save(tmp_path / "pm.json")
    loaded = CalibratedPerfModel.load(path)
    assert loaded.coef == model.coef and loaded.decode_knee == 0
    assert CalibratedPerfModel.load(CalibratedPerfModel(model.coef, decode_knee=3).save(tmp_path / "k.json")).decode_knee == 3
    spec = ClusterSpec("smollm2-135m", "colocated", colocated=PoolSpec("cpu-this-machine", 1))
    items = work_items(workload_config(num_requests=20, input_len=128, output_len=16, rate=2.0))
    r = Simulator(spec, items, SimOptions(perf_model=str(path))).run()
    assert r["completed"] == 20
    assert r["tpot_s"]["min"] >= 5e-3
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="calibrated"):
        CalibratedPerfModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError):
        CalibratedPerfModel([1.0, -1.0, 0, 0, 0])


def test_median_of_passes_takes_each_step_s_median_and_pools_passes_that_differ():
    a, b = BatchShape(16, 136.0, 16, 0, 0, 1), BatchShape(num_decode=4, decode_ctx=256, num_samples=4)
    shapes, times = median_of_passes([([a, b], [0.10, 0.030]), ([a, b], [0.50, 0.020]), ([a, b], [0.12, 0.025])])
    assert shapes == [a, b] and times == [0.12, 0.025]  # the slow spell of pass 2 moved nothing
    shapes, times = median_of_passes([([a, b], [0.1, 0.03]), ([a], [0.2])])
    assert shapes == [a, b, a] and times == [0.1, 0.03, 0.2]


def test_profile_command_measures_the_engine_in_passes(tmp_path):
    """`pdserve profile` on the default model (dummy weights), the quick grid in two passes: one sample per
    step of the grid (the medians), every shape the grid asks for, a fit that explains them."""
    out = tmp_path / "pm.json"
    run = subprocess.run([sys.executable, "-m", "pdserve.cli", "profile", "--quick", "--passes", "2", "--threads", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    model = CalibratedPerfModel.load(out)
    samples = model.meta["samples"]
    prefills = sorted(s["shape"]["num_prefill_tokens"] for s in samples if not s["shape"]["num_decode"])
    assert prefills == [16, 64, 256]  # the quick grid's lone prompts, once each
    assert {s["shape"]["num_decode"] for s in samples} >= {1, 4, 16}
    assert all(s["time_s"] > 0 for s in samples)
    assert model.meta["fit"]["r2"] > 0.5  # a fit that explains the steps (timings: a loaded host lowers it)
    bad = subprocess.run([sys.executable, "-m", "pdserve.cli", "profile", "--quick", "--passes", "0", "--out",
                          str(tmp_path / "x.json")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "error: argument --passes: must be >= 1, got 0" in bad.stderr
