import json

import yaml

from pdserve.sim import cli
from pdserve.sim.cluster import load_cluster
from pdserve.sim.planner import _ratios


def test_ratios_near_target():
    assert _ratios(2.0)[0] == (1, 2)
    assert _ratios(0.5)[0] == (2, 1)
    assert all(x + y <= 12 for x, y in _ratios(7.3))


def test_plan_writes_ranked_pareto_and_cluster(tmp_path, capsys):
    out = tmp_path / "plan"
    rc = cli.main(["plan", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--modes", "colocated,disaggregated",
                   "--cards", "16", "--slo-ttft", "2", "--slo-tpot", "0.1", "--input-len", "512", "--output-len", "32",
                   "--precision", "bf16",
                   "--num-requests", "100", "--probe-requests", "60", "--max-probe-requests", "150",
                   "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    ranked = json.loads((out / "ranked.json").read_text())["ranked"]
    assert ranked and ranked[0]["rank"] == 1
    assert ranked == sorted(ranked, key=lambda r: -r["goodput_rps"])
    assert all(r["cards"] <= 16 for r in ranked)
    assert {"cached_input_per_mtok", "uncached_input_per_mtok", "output_per_mtok"} <= set(ranked[0]["cost_per_mtok"])
    assert (out / "pareto.png").stat().st_size > 1000
    spec = load_cluster(out / "best-cluster.yaml")
    assert spec.num_cards == ranked[0]["cards"]
    assert yaml.safe_load((out / "best-cluster.yaml").read_text())["predicted"]["planned_by"] == "pdserve plan"
    printed = capsys.readouterr().out
    assert "goodput" in printed and "cached in" in printed and "attainment" in printed
    for r in ranked:  # the headroom brackets the goodput from above
        assert r["attainment"] >= 0.9
        assert r["misses_at_rps"] is None or r["misses_at_rps"] > r["goodput_rps"]
    assert any(r["misses_at_rps"] is not None for r in ranked)


def test_probe_requests_are_distinct_prompts():
    # A workload of 5 requests resampled into a probe of 60: the copies must not hit each other's
    # prefix cache (regression: copies kept their index, so "random" prompts repeated).
    from pdserve.sim.planner import Planner, PlanOptions
    from pdserve.sim.workload import work_items, workload_config
    items = work_items(workload_config(num_requests=5, input_len=512, output_len=8))
    planner = Planner("llama-3.1-8b", ["h100-sxm"], items,
                      PlanOptions((2.0, 0.1), probe_requests=60, max_probe_requests=60))
    from pdserve.sim.cluster import ClusterSpec, PoolSpec
    r = planner.simulate(ClusterSpec("llama-3.1-8b", colocated=PoolSpec("h100-sxm")), 5.0)
    assert r["total_cached_input_tokens"] == 0


def test_plan_bad_arguments(tmp_path, capsys):
    base = ["plan", "--model", "llama-3.1-8b", "--slo-ttft", "1", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(base) == 2  # neither --cards nor --budget-per-hour
    assert cli.main(base + ["--cards", "8", "--hardware", "nope"]) == 2
    assert "error" in capsys.readouterr().err


def test_plan_searches_precisions_the_cards_support():
    from pdserve.sim.planner import Planner, PlanOptions
    from pdserve.sim.workload import work_items, workload_config
    items = work_items(workload_config(num_requests=20, input_len=512, output_len=32))
    planner = Planner("llama-3.1-8b", ["h100-sxm", "a100-80gb"], items,
                      PlanOptions((2.0, 0.1), precision="auto", probe_requests=40, max_probe_requests=80))
    assert planner.precisions == ["bf16", "fp8"]
    assert planner._layouts("h100-sxm", "fp8") == [(1, "tp", 1)]
    assert planner._layouts("a100-80gb", "fp8") == []  # no fp8 rate in the catalogue: not searched
    units = planner._colocated_units("fp8")
    assert units and all(u.spec.precision == "fp8" and u.spec.colocated.hardware == "h100-sxm" for u in units)
    calibrated = Planner("llama-3.1-8b", ["h100-sxm"], items,
                         PlanOptions((2.0, 0.1), precision="auto", perf_model="pm.json"))
    assert calibrated.precisions == ["bf16"]  # a profile measured one precision


def test_plan_searches_expert_parallelism_for_moe_models():
    import pytest

    from pdserve.sim.planner import Planner, PlanOptions
    from pdserve.sim.workload import work_items, workload_config
    items = work_items(workload_config(num_requests=20, input_len=512, output_len=32))
    moe = Planner("qwen3-235b-a22b", ["h200"], items, PlanOptions((2.0, 0.1), precision="bf16", parallelism="auto"))
    layouts = moe._layouts("h200", "bf16")
    assert {p for _, p, _ in layouts} == {"tp", "ep"} and all(t >= 2 for t, p, _ in layouts if p == "ep")
    # ep: every attention TP that fits at the smallest card count (TP x EP x DP), one unit kept per count
    ep = [(t, a) for t, p, a in layouts if p == "ep"]
    assert len({t for t, _ in ep}) == 1 and len(ep) > 1 and all(t % a == 0 for t, a in ep)
    units = moe._colocated_units("bf16")
    assert {u.spec.colocated.parallelism for u in units} == {"tp", "ep"}
    kept = {u.spec.colocated.attn_tp for u in units if u.spec.colocated.parallelism == "ep"}
    assert len(kept) == 1 and kept <= {a for _, a in ep}
    overlapped = Planner("qwen3-235b-a22b", ["h200"], items, PlanOptions((2.0, 0.1), precision="bf16", parallelism="ep",
                                                                          moe_imbalance=1.2, ep_overlap=True))
    pools = [u.spec.colocated for u in overlapped._colocated_units("bf16")]
    assert pools and all(p.moe_imbalance == 1.2 and p.ep_overlap for p in pools)
    with pytest.raises(ValueError, match="imbalance"):
        Planner("qwen3-235b-a22b", ["h200"], items, PlanOptions((2.0, 0.1), moe_imbalance=0.5))
    dense = Planner("llama-3.1-8b", ["h100-sxm"], items, PlanOptions((2.0, 0.1), parallelism="auto"))
    assert dense.parallelisms == ["tp"]
    with pytest.raises(ValueError, match="MoE"):
        Planner("llama-3.1-8b", ["h100-sxm"], items, PlanOptions((2.0, 0.1), parallelism="ep"))
    with pytest.raises(ValueError, match="precision"):
        Planner("llama-3.1-8b", ["h100-sxm"], items, PlanOptions((2.0, 0.1), precision="fp9"))


def test_plan_ranks_fp8_units_beside_bf16(tmp_path):
    out = tmp_path / "plan"
    rc = cli.main(["plan", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--modes", "colocated",
                   "--cards", "8", "--slo-ttft", "2", "--slo-tpot", "0.1", "--input-len", "512", "--output-len", "32",
                   "--num-requests", "50", "--probe-requests", "40", "--max-probe-requests", "100",
                   "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    ranked = json.loads((out / "ranked.json").read_text())
    assert ranked["precisions"] == ["bf16", "fp8"]
    assert {r["precision"] for r in ranked["ranked"]} == {"bf16", "fp8"}
    best = load_cluster(out / "best-cluster.yaml")
    assert best.precision == ranked["ranked"][0]["precision"]


def test_best_attn_tp_keeps_the_best_scoring_layout_per_card_count():
    from pdserve.sim.planner import _best_attn_tp
    layouts = [(1, "tp", 1), (8, "ep", 1), (8, "ep", 2), (8, "ep", 4), (16, "ep", 1), (16, "ep", 8)]
    score = {(1, "tp", 1): 1.0, (8, "ep", 1): 3.0, (8, "ep", 2): 5.0, (8, "ep", 4): 4.0,
             (16, "ep", 1): 2.0, (16, "ep", 8): 2.0}
    assert _best_attn_tp(layouts, score) == [(1, "tp", 1), (8, "ep", 2), (16, "ep", 1)]  # a tie: the first


def test_planner_keeps_the_attention_tp_with_the_best_rate():
    """Of the TP x EP x DP layouts at one card count, a colocated unit keeps the attention TP with the best
    analytic rate, a disaggregated unit the best simulated prefill rate and the best decode rate (here
    neither the first nor the last layout listed wins everywhere, so an order-based pick would fail)."""
    from pdserve.sim.planner import Planner, PlanOptions
    from pdserve.sim.workload import work_items, workload_config
    items = work_items(workload_config(num_requests=20, input_len=512, output_len=32))
    ds = Planner("deepseek-v3", ["h200"], items, PlanOptions((2.0, 0.1), precision="fp8", parallelism="ep"))
    layouts = ds._layouts("h200", "fp8")
    assert [a for _, _, a in layouts] == [1, 2, 4, 8] and {t for t, _, _ in layouts} == {8}
    guess = {lay: ds._rate_guess(ds._colocated("h200", "fp8", lay, 2048, 256)) for lay in layouts}
    assert max(guess.values()) > 1.1 * min(guess.values())  # the choice matters
    best = max(layouts, key=guess.get)
    assert best not in (layouts[0], layouts[-1])
    units = ds._colocated_units("fp8")
    assert len(units) == 3 and {u.spec.colocated.attn_tp for u in units} == {best[2]}

    qwen = Planner("qwen3-235b-a22b", ["h200"], items, PlanOptions((2.0, 0.1), precision="bf16", parallelism="ep",
                                                                   probe_requests=40, max_probe_requests=80,
                                                                   moe_imbalance=1.2))
    layouts = qwen._layouts("h200", "bf16")
    assert len(layouts) > 1
    prefill = {lay: qwen.max_rate(qwen._colocated("h200", "bf16", lay, 8192, 64), 1.0, slo=(2.0, None),
                                  output_len=1)[0] for lay in layouts}
    decode = {lay: qwen._decode_rate(qwen._pool("h200", 1, lay, 2048, 512), "bf16") for lay in layouts}
    best_p, best_d = max(layouts, key=prefill.get), max(layouts, key=decode.get)
    assert best_p != best_d  # prefill and decode pools want different attention TPs here
    units = qwen._disaggregated_units("bf16")
    assert units
    for u in units:
        assert (u.spec.prefill.attn_tp, u.spec.decode.attn_tp) == (best_p[2], best_d[2])
        assert u.spec.prefill.moe_imbalance == u.spec.decode.moe_imbalance == 1.2


def test_plan_for_a_moe_model_writes_its_layout_and_the_simulator_runs_it(tmp_path):
    """`pdserve plan` on a MoE model: the ranked layouts are expert-parallel with the chosen attention TP,
    imbalance and overlap; best-cluster.yaml carries them, and `pdserve sim --cluster` runs that file with
    the same performance model."""
    out = tmp_path / "plan"
    rc = cli.main(["plan", "--model", "qwen3-235b-a22b", "--hardware", "h200,h100-sxm", "--modes", "colocated",
                   "--parallelism", "ep", "--moe-imbalance", "1.2", "--ep-overlap", "--precision", "bf16",
                   "--cards", "32", "--slo-ttft", "2", "--slo-tpot", "0.1", "--input-len", "512", "--output-len", "32",
                   "--num-requests", "20", "--probe-requests", "30", "--max-probe-requests", "60",
                   "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    ranked = json.loads((out / "ranked.json").read_text())["ranked"]
    assert ranked and {r["unit"]["planning"]["parallelism"] for r in ranked} == {"ep"}
    for r in ranked:
        assert sum(r["cards_by_kind"].values()) == r["cards"] <= 32
        assert set(r["cards_by_kind"]) == {r["unit"]["planning"]["hardware"]}
    best = load_cluster(out / "best-cluster.yaml")
    pool = best.colocated
    top = ranked[0]["unit"]["planning"]
    assert (pool.parallelism, pool.attn_tp, pool.moe_imbalance, pool.ep_overlap) == \
        ("ep", top.get("attn_tp", 1), 1.2, True)
    assert pool.instances == ranked[0]["units"] and best.num_cards == ranked[0]["cards"]
    result = tmp_path / "sim.json"
    rc = cli.main(["sim", "--cluster", str(out / "best-cluster.yaml"), "--num-requests", "20", "--input-len", "512",
                   "--output-len", "8", "--rate", "4", "--out", str(result), "--no-progress"])
    assert rc == 0
    r = json.loads(result.read_text())
    described = r["sim"]["pools"]["colocated"]["perf_model"]
    assert r["completed"] == 20
    assert (described["parallelism"], described["attn_tp"], described["moe_imbalance"], described["ep_overlap"]) == \
        ("ep", pool.attn_tp, 1.2, True)
