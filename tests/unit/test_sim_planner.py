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
    from pdserve.sim.planner import Planner
    from pdserve.sim.workload import work_items, workload_config
    items = work_items(workload_config(num_requests=5, input_len=512, output_len=8))
    planner = Planner("llama-3.1-8b", ["h100-sxm"], items, (2.0, 0.1), probe_requests=60, max_probe_requests=60)
    from pdserve.sim.cluster import ClusterSpec, PoolSpec
    r = planner.simulate(ClusterSpec("llama-3.1-8b", colocated=PoolSpec("h100-sxm")), 5.0)
    assert r["total_cached_input_tokens"] == 0


def test_plan_bad_arguments(tmp_path, capsys):
    base = ["plan", "--model", "llama-3.1-8b", "--slo-ttft", "1", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(base) == 2  # neither --cards nor --budget-per-hour
    assert cli.main(base + ["--cards", "8", "--hardware", "nope"]) == 2
    assert "error" in capsys.readouterr().err
