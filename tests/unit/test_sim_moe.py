"""MoE and expert parallelism in the performance model: tokens conserved, all-to-all bytes, MLA."""
import pytest

from pdserve.sim import moe
from pdserve.sim.hardware import get_hardware
from pdserve.sim.models import get_model
from pdserve.sim.perf_model import AnalyticPerfModel, BatchShape, instance_kv_blocks


def _decode(b, ctx):
    return BatchShape(num_decode=b, decode_ctx=b * ctx, num_samples=b)


@pytest.mark.parametrize("name", ["qwen3-235b-a22b", "deepseek-v3"])
@pytest.mark.parametrize("imbalance", [1.0, 1.3, 2.0])
def test_routed_tokens_are_conserved_across_ranks_and_experts(name, imbalance):
    m = get_model(name)
    for n in (1, 7, 128, 4096):
        for ep in (1, 8, 32):
            loads = moe.rank_loads(n, m, ep, imbalance)
            assert len(loads) == ep and sum(loads) == pytest.approx(n * m.num_experts_per_token)
            assert loads[0] == max(loads)
            busiest = moe.busiest_rank(n, m, ep, imbalance)
            assert busiest.assignments == loads[0]
            assert busiest.touched * busiest.tokens_per_expert == pytest.approx(busiest.assignments)
            assert busiest.touched <= m.num_experts / ep + 1e-9
    loads = moe.rank_loads(4096, m, 8, 1.5)
    assert loads[0] == pytest.approx(1.5 * 4096 * m.num_experts_per_token / 8)


def test_simulated_ep_step_computes_every_routed_copy():
    m = get_model("deepseek-v3")
    pm = AnalyticPerfModel(m, get_hardware("h800"), tp=32, precision="fp8", parallelism="ep")
    shape = _decode(32 * 64, 4000)  # 64 requests per card
    load = moe.busiest_rank(shape.num_tokens, m, 32)
    assert load.assignments == pytest.approx(shape.num_tokens * m.num_experts_per_token / 32)
    experts = next(op for op in pm.trace(shape) if op.group == "gemm experts")
    up = pm.timer.gemm(load.tokens_per_expert, 2 * m.moe_intermediate_size, m.hidden_size, "fp8").seconds
    down = pm.timer.gemm(load.tokens_per_expert, m.hidden_size, m.moe_intermediate_size, "fp8").seconds
    assert experts.seconds == pytest.approx(m.num_moe_layers * load.touched * (up + down))


def test_all_to_all_bytes_match_the_formula():
    m = get_model("deepseek-v3")
    dispatch, combine = moe.all_to_all_bytes(128, m)
    assert dispatch == 128 * 8 * 7168 * 1.0  # FP8 out: DeepEP's 128-token low-latency case
    assert combine == 128 * 8 * 7168 * 2.0  # BF16 back
    pm = AnalyticPerfModel(m, get_hardware("h800"), tp=32, precision="fp8", parallelism="ep")
    ops = {op.group: op for op in pm.trace(_decode(32 * 128, 1000))}  # 128 tokens per rank
    assert ops["all-to-all dispatch"].kind == "table" and "DeepEP" in ops["all-to-all dispatch"].source
    assert ops["all-to-all dispatch"].seconds == pytest.approx(58 * 155e-6)  # 58 MoE layers x the measured 155 us
    assert ops["all-to-all combine"].seconds == pytest.approx(58 * 273e-6)


def test_imbalance_slows_the_step_and_ep_spreads_the_experts():
    m, hw = get_model("qwen3-235b-a22b"), get_hardware("h100-sxm")
    even = AnalyticPerfModel(m, hw, tp=8, precision="fp8", parallelism="ep")
    skewed = AnalyticPerfModel(m, hw, tp=8, precision="fp8", parallelism="ep", moe_imbalance=1.5)
    shape = BatchShape(8192, 8192 * 1024.5, 8192, 0, 0, 8, 0, 8)  # 8 prompts of 1024
    assert skewed.step_time_s(shape) > even.step_time_s(shape)
    with pytest.raises(ValueError, match="moe_imbalance"):
        AnalyticPerfModel(m, hw, tp=8, parallelism="ep", moe_imbalance=0.9)
    assert moe.ep_options(m, 64) == [2, 4, 8, 16, 32, 64]


def test_mla_kv_bytes_and_attention_cost():
    m = get_model("deepseek-v3")
    assert m.kv_bytes_per_token(2.0) == 61 * (512 + 64) * 2  # latent + rope key, every layer
    hw = get_hardware("h800")
    pm = AnalyticPerfModel(m, hw, tp=8, precision="fp8")
    ops = {op.group: op for op in pm.trace(_decode(64, 4096))}
    att = ops["attention decode"]
    assert att.kind == "table" and "FlashMLA" in att.source
    kv = 64 * 4096 * 576 * 2.0  # the latent is replicated on every TP rank
    flops = 64 * 4096 * 2.0 * (128 // 8) * (2 * 512 + 64)
    assert att.seconds == pytest.approx(61 * max(kv / 3000e9, flops / 660e12))
    # EP: each card keeps whole-token latents of its own requests, 8x the blocks of one card
    h200 = get_hardware("h200")
    assert instance_kv_blocks(m, h200, 8, "fp8", 64, parallelism="ep") > instance_kv_blocks(m, h200, 8, "fp8", 64)


def test_tp_ep_dp_layouts_for_the_planner():
    m, hw = get_model("deepseek-v3"), get_hardware("h200")
    found = moe.layouts(m, hw, "fp8", 32)
    assert moe.Layout(8, 1) in found and moe.Layout(16, 8) in found
    assert all(lay.cards % lay.attn_tp == 0 and lay.ep == lay.cards for lay in found)
    assert moe.Layout(2, 1) not in found  # 671 GB of fp8 weights on two cards: no room
    # attention TP shards the dense weights and the heads: fewer dense bytes per card, an all-reduce appears
    dp8 = AnalyticPerfModel(m, hw, tp=8, precision="fp8", parallelism="ep", attn_tp=1)
    tp8 = AnalyticPerfModel(m, hw, tp=8, precision="fp8", parallelism="ep", attn_tp=8)
    shape = _decode(64, 2000)
    groups = {op.group for op in tp8.trace(shape)}
    assert "all-reduce" in groups and "all-reduce" not in {op.group for op in dp8.trace(shape)}
    with pytest.raises(ValueError, match="attn_tp"):
        AnalyticPerfModel(m, hw, tp=8, precision="fp8", parallelism="ep", attn_tp=3)


def test_two_micro_batch_overlap_hides_the_all_to_alls_behind_computation():
    m, hw = get_model("deepseek-v3"), get_hardware("h800")
    shape = _decode(32 * 64, 4000)
    plain = AnalyticPerfModel(m, hw, tp=32, precision="fp8", parallelism="ep")
    overlapped = AnalyticPerfModel(m, hw, tp=32, precision="fp8", parallelism="ep", ep_overlap=True)
    ops = {op.group: op.seconds for op in plain.trace(shape)}
    comm = ops["all-to-all dispatch"] + ops["all-to-all combine"]
    rest = sum(ops.values()) - comm - ops["engine overhead"]
    assert overlapped.step_time_s(shape) == pytest.approx(max(comm, rest) + ops["engine overhead"])
    assert sum(op.seconds for op in overlapped.trace(shape)) == pytest.approx(overlapped.step_time_s(shape))
    assert plain.step_time_s(shape) == pytest.approx(sum(ops.values()))


def test_a_pools_moe_layout_reaches_the_simulated_instances(tmp_path):
    """PoolSpec's attn_tp / moe_imbalance / ep_overlap and engine overheads go through the cluster file to
    the instances' perf model and KV sizing, and the result file names the model's tables."""
    from pdserve.sim.cluster import ClusterSpec, PoolSpec, load_cluster
    from pdserve.sim.simulator import SimOptions, Simulator
    from pdserve.sim.workload import work_items, workload_config
    m, hw = get_model("deepseek-v3"), get_hardware("h200")
    pool = PoolSpec("h200", 1, 8, parallelism="ep", attn_tp=4, moe_imbalance=1.3, ep_overlap=True,
                    step_overhead_ms=2.5, step_overhead_per_seq_us=20.0)
    spec = ClusterSpec("deepseek-v3", "colocated", colocated=pool, precision="fp8")
    assert load_cluster(spec.dump(tmp_path / "c.yaml")) == spec
    plain = ClusterSpec("deepseek-v3", "colocated", colocated=PoolSpec("h200", 1, 8, parallelism="ep"), precision="fp8")
    assert "attn_tp" not in plain.to_dict()["planning"]  # defaults stay out of the file
    items = work_items(workload_config(num_requests=8, input_len=256, output_len=8, rate=4.0))
    sim = Simulator(spec, items, SimOptions())
    inst = sim.pools["colocated"][0]
    pm = inst.perf
    assert (pm.attn_tp, pm.moe_imbalance, pm.ep_overlap) == (4, 1.3, True)
    assert (pm.hardware.step_overhead_ms, pm.hardware.step_overhead_per_seq_us) == (2.5, 20.0)
    assert inst.kv.num_blocks == instance_kv_blocks(m, hw, 8, "fp8", 16, parallelism="ep", attn_tp=4)
    assert inst.kv.num_blocks != instance_kv_blocks(m, hw, 8, "fp8", 16, parallelism="ep", attn_tp=1)
    described = sim.run()["sim"]["pools"]["colocated"]["perf_model"]
    assert described["attn_tp"] == 4 and any(k.startswith("h100-sxm:") for k in described["tables"])
    assert described["op_sources"]["decode 64 x 1024"]["attention decode"].startswith("table")
    with pytest.raises(ValueError, match="attn_tp"):
        PoolSpec("h200", 1, 8, parallelism="tp", attn_tp=2)
    with pytest.raises(ValueError, match="moe_imbalance"):
        PoolSpec("h200", 1, 8, parallelism="ep", moe_imbalance=0.9)


def test_pool_moe_settings_round_trip_through_the_cluster_file(tmp_path):
    """Per-pool MoE layouts and engine overheads: PoolSpec -> the cluster file's planning section (one value
    or {pool: value}, defaults left out) -> PoolSpec, as written by the planner and as a user writes it."""
    import yaml

    from pdserve.sim.cluster import ClusterSpec, PoolSpec, load_cluster
    prefill = PoolSpec("h200", 1, 8, 8192, 64, parallelism="ep", attn_tp=2, moe_imbalance=1.3, ep_overlap=True,
                       step_overhead_ms=2.0)
    decode = PoolSpec("h100-sxm", 3, 8, 2048, 512, parallelism="ep", attn_tp=8, moe_imbalance=1.3,
                      step_overhead_per_seq_us=15.0)
    spec = ClusterSpec("deepseek-v3", "disaggregated", prefill=prefill, decode=decode, precision="fp8")
    path = spec.dump(tmp_path / "c.yaml")
    planning = yaml.safe_load(path.read_text())["planning"]
    assert planning["attn_tp"] == {"prefill": 2, "decode": 8} and planning["moe_imbalance"] == 1.3
    assert planning["ep_overlap"] == {"prefill": True, "decode": False}
    # a pool at the catalogue's overhead is written as null (regression: the file could not hold it)
    assert planning["step_overhead_ms"] == {"prefill": 2.0, "decode": None}
    assert planning["step_overhead_per_seq_us"] == {"prefill": None, "decode": 15.0}
    assert load_cluster(path) == spec
    assert ClusterSpec.from_dict(spec.to_dict()) == spec
    # written by hand: one value for every pool, integers where floats go, a pool's own value
    (tmp_path / "hand.yaml").write_text(
        "model: deepseek-v3\nserving: {mode: disaggregated, prefill: 2, decode: 4}\n"
        "planning: {hardware: h200, tp: {prefill: 16, decode: 8}, parallelism: ep, attn_tp: {prefill: 4, decode: 1},\n"
        "           moe_imbalance: 2, ep_overlap: true, step_overhead_ms: 3, precision: fp8}\n")
    hand = load_cluster(tmp_path / "hand.yaml")
    assert (hand.prefill.tp, hand.prefill.attn_tp, hand.decode.tp, hand.decode.attn_tp) == (16, 4, 8, 1)
    for pool in (hand.prefill, hand.decode):
        assert (pool.moe_imbalance, pool.ep_overlap, pool.step_overhead_ms, pool.step_overhead_per_seq_us) == \
            (2.0, True, 3.0, None)
    assert load_cluster(hand.dump(tmp_path / "again.yaml")) == hand
    # bad values: a clear error naming the file and the setting
    bad = {"attn_tp: 3": "attn_tp", "attn_tp: {prefill: 4}": "attn_tp gives no value for the decode pool",
           "moe_imbalance: 0.5": "moe_imbalance", "step_overhead_ms: -1": "step overheads",
           "attn-tp: 2": "attn-tp"}
    for line, message in bad.items():
        (tmp_path / "bad.yaml").write_text(
            "model: deepseek-v3\nserving: {mode: disaggregated, prefill: 1, decode: 1}\n"
            f"planning: {{hardware: h200, tp: 8, parallelism: ep, precision: fp8, {line}}}\n")
        with pytest.raises(ValueError, match=message) as e:
            load_cluster(tmp_path / "bad.yaml")
        assert "bad.yaml" in str(e.value)


def test_an_ep_simulation_is_deterministic_for_a_seed():
    """The same MoE cluster and workload (op tables, EP all-to-alls, imbalance, overlap) give the same result
    file, and another workload seed another one."""
    import json

    from pdserve.sim.cluster import ClusterSpec, PoolSpec
    from pdserve.sim.simulator import SimOptions, Simulator
    from pdserve.sim.workload import work_items, workload_config
    spec = ClusterSpec("qwen3-235b-a22b", "disaggregated", prefill=PoolSpec("h200", 1, 4, parallelism="ep", attn_tp=2,
                                                                             moe_imbalance=1.2, ep_overlap=True),
                       decode=PoolSpec("h100-sxm", 2, 8, parallelism="ep", attn_tp=4, moe_imbalance=1.2))

    def run(seed):
        items = work_items(workload_config(num_requests=40, input_len=1024, output_len=16, rate=8.0, seed=seed))
        return json.dumps(Simulator(spec, items, SimOptions()).run(), sort_keys=True)
    first = run(0)
    assert run(0) == first and run(1) != first
    assert json.loads(first)["completed"] == 40
