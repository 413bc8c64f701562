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
    assert "goodput" in capsys.readouterr().out


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
    assert planner._layouts("h100-sxm", "fp8") == [(1, "tp")]
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
    assert {p for _, p in layouts} == {"tp", "ep"} and all(t >= 2 for t, p in layouts if p == "ep")
    units = moe._colocated_units("bf16")
    assert {u.spec.colocated.parallelism for u in units} == {"tp", "ep"}
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
