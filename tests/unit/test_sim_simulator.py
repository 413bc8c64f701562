import json

import numpy as np
import pytest

from pdserve.bench.metrics import summarize
from pdserve.sim.cluster import ClusterSpec, PoolSpec, load_cluster
from pdserve.sim.requests import SimRequest
from pdserve.sim.results import weighted_summary
from pdserve.sim.simulator import SimOptions, Simulator, WorkItem
from pdserve.sim.workload import work_items, workload_config

MODEL = "llama-3.1-8b"


def _colocated(n=2, routing="round_robin", **pool):
    return ClusterSpec(MODEL, "colocated", colocated=PoolSpec("h100-sxm", n, **pool), routing=routing)


def _disagg(p=1, d=2, **kw):
    return ClusterSpec(MODEL, "disaggregated", prefill=PoolSpec("h100-sxm", p, max_num_batched_tokens=4096),
                       decode=PoolSpec("h200", d, max_num_seqs=64), **kw)


def _items(n=120, rate=20.0, inp=512, out=64, seed=0):
    return work_items(workload_config(num_requests=n, input_len=inp, output_len=out, rate=rate, seed=seed))


def _run(spec, items, **opts):
    return Simulator(spec, items, SimOptions(**opts), slo=(0.5, 0.05)).run()


def test_disaggregated_conserves_requests_and_kv():
    sim = Simulator(_disagg(), _items(), SimOptions(check_integrity=True))
    result = sim.run()
    assert result["completed"] == result["num_sent"] == 120 and result["failed"] == 0
    assert result["total_output_tokens"] == 120 * 64
    for inst in sim.instances:  # every block back in the free queue, nothing held
        inst.scheduler.check_integrity()
        assert inst.kv.usage == 0.0 and not inst.scheduler.held and not inst.scheduler.awaiting_kv
    assert result["sim"]["kv_transfer_bytes"] == pytest.approx(120 * 512 * 128 * 1024)


def test_colocated_with_preemption_conserves_requests():
    # A tiny KV cache (800 blocks of 16 tokens) forces preemptions by recompute.
    spec = _colocated(1, max_num_seqs=64)
    sim = Simulator(spec, _items(60, rate=1000.0, inp=2000, out=200), SimOptions(check_integrity=True, num_blocks=800))
    result = sim.run()
    assert result["completed"] == 60
    assert result["sim"]["pools"]["colocated"]["preemptions"] > 0
    assert result["total_output_tokens"] == 60 * 200


def test_fast_forward_is_exact_with_round_robin():
    items = _items(150, rate=15.0, out=128)
    for spec in (_colocated(2), _disagg(decode_routing="round_robin")):
        a = _run(spec, items, fast_forward=False)
        b = _run(spec, items, fast_forward=True)
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "duration_s", "goodput"):
            assert a[key] == b[key], key
        assert a["requests"] == b["requests"]


def test_fast_forward_after_chunked_prefill():
    # Prompts one token longer than the budget: their last prompt token runs alone, like a decode.
    items = _items(40, rate=4.0, inp=2049, out=64)
    spec = _colocated(1, max_num_batched_tokens=2048)
    a = _run(spec, items, fast_forward=False)
    b = _run(spec, items, fast_forward=True)
    assert a["itl_s"] == b["itl_s"] and a["ttft_s"] == b["ttft_s"]
    assert b["itl_s"]["mean"] == b["itl_s"]["mean"]  # not NaN


def test_same_seed_same_json():
    items = _items(80)
    a = json.dumps(_run(_disagg(routing="prefix_aware"), items), sort_keys=True)
    b = json.dumps(_run(_disagg(routing="prefix_aware"), _items(80)), sort_keys=True)
    assert a == b
    c = json.dumps(_run(_disagg(routing="prefix_aware"), _items(80, seed=1)), sort_keys=True)
    assert a != c


def test_prefix_cache_hits_from_trace_hash_ids(tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": i * 200, "input_length": 2048, "output_length": 16, "hash_ids": [7, 8, 9, 100 + i]}
            for i in range(40)]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    items = work_items(workload_config(dataset=f"mooncake:{trace}"))
    spec = _colocated(1)
    on = _run(spec, items)
    off = _run(ClusterSpec(MODEL, "colocated", colocated=PoolSpec("h100-sxm", 1), enable_prefix_caching=False), items)
    assert on["total_cached_input_tokens"] == 39 * 3 * 512
    assert off["total_cached_input_tokens"] == 0
    assert on["ttft_s"]["mean"] < off["ttft_s"]["mean"]


def test_sim_request_block_hashes_follow_hash_ids():
    a = SimRequest("a", 0, 1100, 4, 0.0, (1, 2, 3), 512)
    b = SimRequest("b", 1, 1100, 4, 0.0, (1, 2, 4), 512)
    c = SimRequest("c", 2, 1100, 4, 0.0, (), 512)
    ha, hb, hc = (r.update_block_hashes(16) for r in (a, b, c))
    assert len(ha) == 1100 // 16
    assert ha[:64] == hb[:64] and ha[64] != hb[64]  # shared up to token 1024
    assert not set(hc) & set(ha)
    a.append_output_token(0)
    assert a.num_tokens == 1101


def test_closed_loop_and_too_long_requests():
    items = work_items(workload_config(num_requests=30, input_len=256, output_len=32, concurrency=4))
    items.append(WorkItem(30, None, 200_000, 8))
    result = Simulator(_colocated(1), items, SimOptions(), concurrency=4).run()
    assert result["completed"] == 30 and result["failed"] == 1
    assert list(result["errors"].values()) == [1]


def test_sampling_scales_throughput():
    items = _items(400, rate=40.0)
    full = _run(_colocated(8), items)
    sampled = _run(_colocated(8), items, sample_instances=2)
    assert sampled["sim"]["scale"] == 4.0 and sampled["num_sent"] == 100
    assert sampled["request_throughput"] == pytest.approx(full["request_throughput"], rel=0.1)
    assert sampled["tpot_s"]["mean"] == pytest.approx(full["tpot_s"]["mean"], rel=0.1)


def test_weighted_summary_equals_expanded():
    rng = np.random.default_rng(0)
    v = rng.random(50)
    w = rng.integers(0, 5, 50)
    assert weighted_summary(v, w) == pytest.approx(summarize(np.repeat(v, w).tolist()))


def test_cluster_file_round_trip(tmp_path):
    spec = _disagg(3, 5)
    path = spec.dump(tmp_path / "c.yaml")
    assert load_cluster(path) == spec
    (tmp_path / "bad.yaml").write_text("model: x\nserving: {mode: colocated, colocated: 2}\n"
                                       "planning: {hardware: h100-sxm, gpus: 3}\n")
    with pytest.raises(ValueError, match="gpus"):
        load_cluster(tmp_path / "bad.yaml")
    (tmp_path / "nohw.yaml").write_text("model: x\nserving: {mode: colocated, colocated: 2}\n")
    with pytest.raises(ValueError, match="planning.hardware"):
        load_cluster(tmp_path / "nohw.yaml")
    # The same file is a `pdserve up --config` file: its serving section is the launcher's.
    from pdserve import cluster_file
    serving = cluster_file.load(path).serving
    assert (serving.mode, serving.prefill, serving.decode) == ("disaggregated", 3, 5)


def test_auto_mode_runs_the_elastic_controller_and_path_choice():
    """The simulator runs the live frontend's path choice and elastic controller (mode auto): a prompt-heavy
    load on one prefill and three decode instances starves prefill: the decode instances' step targets widen
    (until the decodes' TPOT has no room left for wider steps; then roles change) and prompts go both ways (nothing lost, every block back); deterministic. (Role changes in simulation:
    test_auto_mode_changes_roles_when_time_cannot_help.)"""
    spec = ClusterSpec(MODEL, "auto", prefill=PoolSpec("h100-sxm", 1), decode=PoolSpec("h100-sxm", 3))
    items = _items(n=900, rate=60.0, inp=4096, out=16)

    def run():
        sim = Simulator(spec, items, SimOptions(elastic_tick_s=0.5, elastic_cooldown_s=1.0), slo=(0.4, 0.05))
        return sim, sim.run()
    sim, result = run()
    assert result["completed"] == 900 and result["failed"] == 0
    widened = [d for _, d in sim.controller.history
               if d.reason.startswith("prefill starves") and type(d).__name__ == "SetStepTarget"]
    assert widened and all(d.step_target_s > 0.045 for d in widened)
    assert sim.path_counts["remote"] > 0 and sim.path_counts["local"] > 0  # both paths taken
    assert all(d.step_target_s == pytest.approx(0.045) for _, d in sim.controller.history[:3]
               if type(d).__name__ == "SetStepTarget")  # the initial targets: 0.9 x TPOT
    for inst in sim.instances:
        inst.scheduler.check_integrity()
        assert inst.kv.usage == 0.0 and not inst.scheduler.held and not inst.scheduler.awaiting_kv
    again = run()[1]
    assert json.dumps(result, sort_keys=True) == json.dumps(again, sort_keys=True)


def test_auto_mode_changes_roles_when_time_cannot_help():
    """No step target to widen (no TPOT objective): a starving prefill pool takes a decode instance."""
    spec = ClusterSpec(MODEL, "auto", prefill=PoolSpec("h100-sxm", 1), decode=PoolSpec("h100-sxm", 3))
    items = _items(n=900, rate=60.0, inp=4096, out=16)
    sim = Simulator(spec, items, SimOptions(elastic_tick_s=0.5, elastic_cooldown_s=1.0), slo=(0.4, None))
    result = sim.run()
    assert result["completed"] == 900 and result["failed"] == 0
    roles = [i.role for i in sim.instances]
    assert roles.count("prefill") >= 2, roles
    for inst in sim.instances:
        inst.scheduler.check_integrity()
        assert inst.kv.usage == 0.0 and not inst.scheduler.held and not inst.scheduler.awaiting_kv
