import pytest

from pdserve.sim.hardware import get_hardware
from pdserve.sim.models import get_model
from pdserve.sim.perf_model import (AnalyticPerfModel, BatchShape, instance_kv_blocks, kv_transfer_s, min_tp)


def _decode(b, ctx):
    return BatchShape(num_decode=b, decode_ctx=b * ctx, num_samples=b)


def test_llama8b_h100_batch1_decode_is_memory_bound():
    hw = get_hardware("h100-sxm")
    pm = AnalyticPerfModel(get_model("llama-3.1-8b"), hw)
    t = pm.step_time_s(_decode(1, 1024))
    ideal = 16.06e9 / 3.35e12  # weights / bandwidth: 4.8 ms
    assert ideal < t < ideal / hw.efficiency.memory + hw.step_overhead_ms * 1e-3 + 1e-3


def test_prefill_is_compute_bound():
    hw = get_hardware("h100-sxm")
    pm = AnalyticPerfModel(get_model("llama-3.1-8b"), hw)
    n = 8192
    t = pm.step_time_s(BatchShape(n, n * (n + 1) / 2, n, 0, 0, 1))
    gemm = 2 * n * 8.03e9 / 989e12  # at peak: the measured tables reach 60-75% of it
    assert gemm / 0.8 < t < 2 * gemm / hw.efficiency.compute


def test_monotone_and_tp_helps():
    m, hw = get_model("llama-3.1-70b"), get_hardware("h100-sxm")
    pm2, pm4 = AnalyticPerfModel(m, hw, tp=2), AnalyticPerfModel(m, hw, tp=4)
    assert pm2.step_time_s(_decode(64, 2000)) > pm2.step_time_s(_decode(8, 2000)) > pm2.step_time_s(_decode(8, 100))
    assert pm4.step_time_s(_decode(8, 1000)) < pm2.step_time_s(_decode(8, 1000))
    assert pm2.step_time_s(BatchShape()) == 0.0


def test_fp8_and_moe():
    hw = get_hardware("h100-sxm")
    m = get_model("deepseek-v3")
    fp8 = AnalyticPerfModel(m, hw, tp=8, precision="fp8")
    bf16 = AnalyticPerfModel(m, hw, tp=16, precision="bf16")
    assert fp8.step_time_s(_decode(1, 1000)) > 0
    # Small batches touch few experts: far cheaper than reading every expert.
    assert fp8.step_time_s(_decode(1, 1000)) < fp8.step_time_s(_decode(256, 1000))
    assert bf16.step_time_s(_decode(1, 1000)) > 0


def test_kv_capacity_and_fit():
    m, hw = get_model("llama-3.1-8b"), get_hardware("h100-sxm")
    blocks = instance_kv_blocks(m, hw, 1, "bf16", 16)
    tokens = blocks * 16
    expected = (80e9 * 0.9 - 16.06e9 - 1.5e9) / (128 * 1024)
    assert tokens == pytest.approx(expected, rel=0.02)
    assert instance_kv_blocks(m, hw, 2, "bf16", 16) > 2 * blocks  # KV sharded, weights halved
    assert min_tp(get_model("llama-3.1-70b"), hw, "bf16") == 4  # 70.6 GB per card at TP2 leaves no KV
    assert min_tp(get_model("deepseek-v3"), get_hardware("h200"), "fp8") == 8
    with pytest.raises(ValueError, match="does not fit"):
        instance_kv_blocks(get_model("llama-3.1-70b"), get_hardware("l40s"), 1, "bf16", 16)


def test_kv_transfer_time():
    m, hw = get_model("llama-3.1-8b"), get_hardware("h100-sxm")
    t = kv_transfer_s(10000, m, hw, 1, inter_node=True)
    nbytes = 10000 * 128 * 1024
    assert t == pytest.approx(20e-6 + nbytes / (50e9 * hw.efficiency.network))
    assert kv_transfer_s(10000, m, hw, 1, inter_node=False) < t
    assert kv_transfer_s(0, m, hw, 1, True) == 0.0


def test_shape_from_chunks():
    class C:
        def __init__(self, start, n, samples):
            self.start, self.num_tokens, self.samples = start, n, samples
    s = BatchShape.from_chunks([C(0, 4, True), C(10, 1, True), C(20, 1, True), C(8, 3, False)])
    assert (s.num_prefill_tokens, s.num_decode, s.decode_ctx, s.num_samples) == (7, 2, 32, 3)
    assert s.prefill_attn == 4 * 5 / 2 + 3 * 8 + 3 * 4 / 2
