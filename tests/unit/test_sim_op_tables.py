"""Measured operator tables: exact at measured points, monotone between them, the roofline outside."""
import numpy as np
import pytest
import yaml

from pdserve.sim.hardware import get_hardware
from pdserve.sim.models import get_model
from pdserve.sim.op_tables import OP_DATA_DIR, Curve, load_op_tables, lookup
from pdserve.sim.op_timer import OpTimer, Peaks, gemm_roofline
from pdserve.sim.perf_model import AnalyticPerfModel, BatchShape

FILES = sorted(p.name for p in OP_DATA_DIR.glob("*.yaml"))


def _between(values, lo, hi):
    return all(min(lo, hi) - 1e-15 <= v <= max(lo, hi) + 1e-15 for v in values)


@pytest.mark.parametrize("name", FILES)
def test_every_table_has_a_source_and_is_exact_and_monotone(name):
    tables = load_op_tables(name)
    assert tables.sources() and all(tables.sources().values())
    peaks = Peaks.of_table(tables)
    for dtype, table in {**tables.gemm, **{f"ew-{k}": v for k, v in tables.elementwise.items()}}.items():
        assert table.source.url and table.source.date
        for shape, curve in table.curves.items():
            def roof(x, sh):
                return gemm_roofline(peaks, x, sh[0], sh[1], "bf16")
            for m, t in zip(curve.xs, curve.ts):
                timing = table.time(m, shape, roof, "x")
                assert timing.kind == "table" and timing.seconds == pytest.approx(t, rel=1e-12)
            for (m0, t0), (m1, t1) in zip(zip(curve.xs, curve.ts), zip(curve.xs[1:], curve.ts[1:])):
                grid = np.linspace(m0, m1, 7)
                vals = [table.time(m, shape, roof, "x").seconds for m in grid]
                assert _between(vals, t0, t1)
                assert all(b >= a - 1e-15 for a, b in zip(vals, vals[1:]))
    curves = [c for _, c, _ in tables.attention_decode.values()] + [c for _, c in tables.all_reduce.values()]
    for curve in curves:
        for x, t in zip(curve.xs, curve.ts):
            assert lookup(curve, x, lambda v: v, "").seconds == t
        xs = np.linspace(curve.xs[0], curve.xs[-1], 200)
        vals = [lookup(curve, x, lambda v: v, "").seconds for x in xs]
        assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_curve_rejects_unordered_or_decreasing_points():
    with pytest.raises(ValueError, match="increase strictly"):
        Curve((1.0, 1.0), (1.0, 2.0))
    with pytest.raises(ValueError, match="non-decreasing"):
        Curve((1.0, 2.0), (2.0, 1.0))


def test_lookup_clamps_below_and_follows_the_roofline_at_the_edge_efficiency_above():
    curve = Curve((10.0, 20.0), (5.0, 8.0))
    roof = lambda x: x / 10.0  # noqa: E731
    assert lookup(curve, 15.0, roof, "s").kind == "table"
    below = lookup(curve, 1.0, roof, "s")
    assert below.kind == "table-clamped" and below.seconds == 5.0
    above = lookup(curve, 40.0, roof, "s")
    assert above.kind == "table-edge" and above.seconds == pytest.approx(8.0 * 4.0 / 2.0)
    assert lookup(curve, 20.0 + 1e-9, roof, "s").seconds == pytest.approx(8.0)  # continuous at the edge


def test_unmeasured_gemm_shape_is_interpolated_between_sizes_monotone_in_tokens():
    timer = OpTimer(get_hardware("h100-sxm"))
    table = load_op_tables("h100-sxm.yaml").gemm["bf16"]
    shape = (28672, 4096)  # Llama-3.1-8B gate+up: not in the table, between measured sizes
    assert shape not in table.curves and table.covers(shape)
    times = [timer.gemm(m, *shape, "bf16").seconds for m in (1, 3, 16, 100, 700, 2500, 4096)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    t1 = timer.gemm(1, *shape, "bf16")
    assert t1.kind == "table" and "Vidur" in t1.source
    weights = 28672 * 4096 * 2
    assert weights / 3.35e12 < t1.seconds < weights / (0.6 * 3.35e12)  # memory-bound, 60-100% of bandwidth


def test_shapes_outside_every_table_fall_back_to_the_roofline_and_say_so():
    l40s = OpTimer(get_hardware("l40s"))  # no tables
    t = l40s.gemm(64, 4096, 4096, "bf16")
    assert t.kind == "roofline" and t.source == ""
    h100 = OpTimer(get_hardware("h100-sxm"))
    edge = h100.gemm(4096, 8192, 8192, "bf16")
    beyond = h100.gemm(16384, 8192, 8192, "bf16")
    assert edge.kind == "table" and beyond.kind == "table-edge"
    assert beyond.seconds == pytest.approx(edge.seconds * 4, rel=0.02)  # compute-bound at the edge efficiency
    assert h100.all_reduce(1e6, 8, inter_node=True).kind == "roofline"  # NVLink tables: one node only
    assert h100.all_reduce(1e6, 16, inter_node=False).kind == "roofline"  # no 16-card table


def test_decode_attention_beyond_the_table_costs_each_further_byte_at_the_measured_ceiling():
    timer = OpTimer(get_hardware("h100-sxm"))
    last = timer.decode_attention(33554432)
    assert last.kind == "table" and last.seconds == pytest.approx(25.1e-6)
    far = timer.decode_attention(33554432 + 3e9)
    assert far.kind == "table-edge" and far.seconds == pytest.approx(25.1e-6 + 1e-3)  # 3 GB at 3000 GB/s
    assert timer.decode_attention(1e6).kind == "table-clamped"


def test_another_cards_tables_are_scaled_by_its_rooflines():
    h100, h200 = OpTimer(get_hardware("h100-sxm")), OpTimer(get_hardware("h200"))
    a, b = h100.gemm(1, 8192, 8192, "bf16"), h200.gemm(1, 8192, 8192, "bf16")
    assert a.kind == "table" and b.kind == "table+scaled"
    assert b.seconds == pytest.approx(a.seconds * 3.35 / 4.8, rel=0.01)  # memory-bound: H200's bandwidth
    c, d = h100.gemm(4096, 8192, 8192, "bf16"), h200.gemm(4096, 8192, 8192, "bf16")
    assert d.seconds == pytest.approx(c.seconds, rel=0.01)  # compute-bound: the same tensor cores
    fp8 = h100.gemm(1024, 4096, 7168, "fp8")
    assert fp8.kind == "table+scaled" and "DeepGEMM" in fp8.source  # measured on H800: same SMs and HBM


def test_perf_model_trace_names_the_source_of_every_group_and_sums_to_the_step():
    pm = AnalyticPerfModel(get_model("llama-3.1-70b"), get_hardware("h100-sxm"), tp=4)
    shape = BatchShape(num_decode=32, decode_ctx=32 * 2000, num_samples=32)
    ops = pm.trace(shape)
    assert sum(op.seconds for op in ops) == pytest.approx(pm.step_time_s(shape))
    kinds = {op.group: op.kind for op in ops}
    assert kinds["gemm gate_up"] == "table" and kinds["all-reduce"] == "table"
    desc = pm.describe()
    assert desc["op_sources"]["decode 64 x 1024"]["attention decode"].startswith("table")
    assert any("Vidur" in s for s in desc["tables"].values())
    yaml.safe_dump(desc)  # JSON/YAML-able


def test_malformed_table_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("measured_on: {card: x, memory_tbs: 1, tflops: {bf16: 1}, nvlink_gbs: 1, network_gbs: 1}\n"
                   "attention_decode: {bf16: {source: {document: d}, kv_bytes: [2, 1], us: [1, 2]}}\n")
    with pytest.raises(ValueError, match="cannot read operator tables"):
        load_op_tables(bad)
