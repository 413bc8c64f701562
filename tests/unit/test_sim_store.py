"""The simulator's KV store tiers (sim/store.py, docs/sim.md "KV store tiers")."""
import json

import pytest

from pdserve import cluster_file
from pdserve.sim import cli
from pdserve.sim.cluster import ClusterSpec, PoolSpec, load_cluster
from pdserve.sim.simulator import SimOptions, Simulator, WorkItem
from pdserve.sim.store import StoreSpec, Tier, TierStats
from pdserve.sim.workload import multi_turn_items, work_items, workload_config

MODEL = "llama-3.1-8b"
HOST = {"kv_host_memory": "8GiB"}


def _colocated(n=2, store=None, planning=None, routing="round_robin"):
    return ClusterSpec(MODEL, colocated=PoolSpec("h100-sxm", n), routing=routing, kv_store=store or {},
                       kv_store_planning=planning or {})


def _shared_prefix_items():
    """A: 1024 prompt tokens (hash ids 1, 2); B, a second later (A's save has landed): the same 1024 tokens
    and 512 of its own."""
    return [WorkItem(0, 0.0, 1024, 16, (1, 2), 512), WorkItem(1, 1.0, 1536, 16, (1, 2, 3), 512)]


def _run(spec, items, concurrency=None, **opts):
    sim = Simulator(spec, items, SimOptions(check_integrity=True, **opts), concurrency=concurrency)
    return sim, sim.run()


def test_tier_lru_holds_its_budget():
    stats = TierStats()
    tier = Tier("host", 3, stats)
    tier.put([1, 2, 3])
    tier.touch([1])  # 1 is now the most recent: 2 goes first
    tier.put([4, 5])
    assert len(tier) == 3 and 1 in tier and 2 not in tier and 3 not in tier
    assert (stats.saved, stats.evicted) == (5, 2)
    tier.put([4])  # held already: not saved again
    assert stats.saved == 5
    assert Tier("x", 0, TierStats()).prefix([1], 0) == 0


def test_budgets_hold_under_a_long_workload():
    """A host tier of 40 blocks per host under a trace that wants more: never over, evictions counted."""
    block_bytes = 128 * 1024 * 16  # llama-3.1-8b bf16: 128 KiB of KV per token, 16-token blocks
    spec = _colocated(4, {"kv_host_memory": 40 * block_bytes, "kv_remote": "redis://r:6379",
                          "kv_remote_memory": 100 * block_bytes}, {"cards_per_host": 2})
    items = work_items(workload_config(num_requests=150, input_len=1024, output_len=32, rate=50.0, seed=3))
    sim, r = _run(spec, items)
    assert r["completed"] == 150
    assert sim.store.block_bytes == block_bytes
    assert len(sim.store.tiers(0)[0]) <= 40 and len(sim.store.tiers(1)[0]) <= 40 and len(sim.store.tiers(0)[1]) <= 100
    assert {i.host for i in sim.instances} == {0, 1}  # 4 one-card instances, 2 cards a host
    tiers = r["sim"]["kv_store"]["tiers"]
    assert tiers["host"]["evicted_blocks"] > 0 and tiers["remote"]["evicted_blocks"] > 0
    assert all(i.save_queued_bytes == 0 for i in sim.instances)


@pytest.mark.parametrize("store, planning, hits", [
    ({}, {}, False),
    (HOST, {}, True),  # both instances on one host (8 cards): its host tier
    (HOST, {"cards_per_host": 1}, False),  # one host each: the other's host tier is out of reach
    ({"kv_remote": "redis"}, {"cards_per_host": 1}, True),  # the remote tier reaches every host
])
def test_prefix_computed_on_one_instance_loads_on_another(store, planning, hits):
    """Round robin sends B to the other instance: only a store it reaches gives it A's prefix."""
    sim, r = _run(_colocated(2, store, planning), _shared_prefix_items())
    cached = [e["cached_tokens"] for e in r["requests"]]
    assert cached == [0, 1024 if hits else 0]
    computed = r["sim"]["pools"]["colocated"]["prompt_tokens_computed"]
    assert computed == 1024 + (512 if hits else 1536)


def test_hit_rate_and_loaded_tokens_on_a_hand_made_workload():
    """A looks up its 63 full blocks before the last token's (none found); B its 95 (the first 64 found, A's
    prompt): the host tier's hit rate 64/158, 1024 tokens loaded, A's 64 prompt blocks saved and B's 96."""
    sim, r = _run(_colocated(2, HOST), _shared_prefix_items())
    s = r["sim"]["kv_store"]
    host = s["tiers"]["host"]
    assert (host["looked_up_blocks"], host["found_blocks"]) == (63 + 95, 64)
    assert host["hit_rate"] == pytest.approx(64 / 158)
    assert host["loaded_blocks"] == 64 and s["loaded_tokens"] == 1024
    assert host["saved_blocks"] == 64 + 96 - 64  # B's first 64 blocks are A's, held already
    assert host["loaded_bytes"] == 64 * s["block_bytes"]


def test_load_takes_its_bytes_over_the_link():
    """B's TTFT grows by its load's time when the host link is 100x slower."""
    fast = _run(_colocated(2, HOST, {"host_gbs": 100.0}), _shared_prefix_items())[1]
    slow = _run(_colocated(2, HOST, {"host_gbs": 1.0}), _shared_prefix_items())[1]
    ttft = [r["requests"][1]["ttft_s"] for r in (fast, slow)]
    load_bytes = fast["sim"]["kv_store"]["tiers"]["host"]["loaded_bytes"]
    assert ttft[1] - ttft[0] == pytest.approx(load_bytes / 1e9 - load_bytes / 100e9, rel=1e-6)


def test_multi_turn_conversations_hit_across_instances():
    """The replay of benchmarks/kv_store.py: with a host tier every reusable token (earlier turns' prompts and
    answers) is loaded or cached, wherever round robin sends the turn."""
    items = multi_turn_items(3, 3, 600, 64, 32)
    reusable = sum((it.input_len - 64 - 1) // 16 * 16 for it in items[3:])
    off = _run(_colocated(2), items, concurrency=1)[1]
    on = _run(_colocated(2, HOST), items, concurrency=1)[1]
    assert off["total_cached_input_tokens"] < reusable
    assert on["total_cached_input_tokens"] == reusable


def test_disaggregated_with_a_store_conserves_blocks():
    """Prefill instances hold a finished prompt's blocks for the hand-off and the store's save: both release.
    The second prefill instance loads the shared prefix that the first saved; then its own cache has it."""
    spec = ClusterSpec(MODEL, "disaggregated", prefill=PoolSpec("h100-sxm", 2), decode=PoolSpec("h100-sxm", 2),
                       routing="round_robin", kv_store=HOST)
    items = [WorkItem(i, 1.0 * i, 2048, 16, (1, 2, 3, 10 + i), 512) for i in range(6)]
    sim, r = _run(spec, items)
    assert r["completed"] == 6
    assert r["sim"]["kv_store"]["loaded_tokens"] == 1536  # the second prefill instance's first prompt
    for inst in sim.instances:
        assert not inst.scheduler.held and inst.kv.pool.num_free_blocks == inst.kv.num_blocks


def test_same_seed_same_result():
    spec = _colocated(4, {"kv_host_memory": "64MiB", "kv_disk": "/tmp/kv:256MiB"}, {"cards_per_host": 2},
                      routing="prefix_aware")
    items = work_items(workload_config(num_requests=80, input_len=1024, output_len=32, rate=40.0, seed=5))
    a, b = (json.dumps(_run(spec, items)[1], sort_keys=True) for _ in range(2))
    assert a == b


def test_cluster_file_round_trips_the_store(tmp_path):
    spec = _colocated(2, {"kv_host_memory": "4GiB", "kv_disk": "/var/cache/kv:100GiB", "kv_remote": "redis",
                          "kv_remote_memory": "8GiB"}, {"host_gbs": 20.0, "cards_per_host": 4})
    path = spec.dump(tmp_path / "c.yaml")
    assert load_cluster(path) == spec
    f = cluster_file.load(path)
    assert f.serving.kv_store_settings()["kv_host_memory"] == 4 * 2**30  # what `pdserve up` reads
    assert spec.store == StoreSpec(4 * 2**30, 100 * 2**30, 8 * 2**30, host_gbs=20.0, cards_per_host=4)
    assert StoreSpec.from_settings({"kv_remote": "redis"}).remote_bytes == 2 * 2**30  # `pdserve up`'s server
    with pytest.raises(ValueError, match="unknown key"):
        _colocated(2, HOST, {"host_bw": 1})
    with pytest.raises(ValueError, match="must be > 0"):
        _colocated(2, HOST, {"host_gbs": 0})


def test_sim_cli_store_flags(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["sim", "--model", MODEL, "--hardware", "h100-sxm", "--instances", "2", "--routing", "round_robin",
                   "--num-requests", "20", "--rate", "10", "--kv-host-memory", "4GiB", "--kv-host-gbs", "20",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["cluster"]["serving"]["kv_store"] == {"kv_host_memory": "4GiB"}
    assert r["cluster"]["planning"]["kv_store"] == {"host_gbs": 20.0}
    assert "host" in r["sim"]["kv_store"]["tiers"]
    assert "KV store: prompt tokens computed" in capsys.readouterr().out


def test_plan_runs_its_candidates_with_the_store(tmp_path):
    """`pdserve plan --kv-host-memory ...`: every simulated unit has the tiers, and best-cluster.yaml keeps them."""
    out = tmp_path / "plan"
    rc = cli.main(["plan", "--model", MODEL, "--hardware", "h100-sxm", "--modes", "colocated", "--precision", "bf16",
                   "--tp-options", "1", "--cards", "2", "--slo-ttft", "2", "--slo-tpot", "0.1",
                   "--input-len", "512", "--output-len", "32",
                   "--num-requests", "40", "--probe-requests", "30", "--max-probe-requests", "60",
                   "--kv-host-memory", "16GiB", "--kv-host-gbs", "20", "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    best = load_cluster(out / "best-cluster.yaml")
    assert best.kv_store == {"kv_host_memory": "16GiB"} and best.kv_store_planning == {"host_gbs": 20.0}
    assert cli.main(["plan", "--model", MODEL, "--cards", "8", "--slo-ttft", "2", "--kv-host-gbs", "0",
                     "--out-dir", str(out)]) == 2  # a bandwidth must be > 0


def test_a_save_bigger_than_the_save_queue_keeps_its_prefix():
    """A's 65 computed blocks against a save queue of 40: the first 40 are saved (the prefix B reuses),
    the rest dropped and counted, as live (kv/store/connector.py ``num_savable``)."""
    block_bytes = 128 * 1024 * 16
    sim, r = _run(_colocated(2, {**HOST, "kv_save_queue": 40 * block_bytes}), _shared_prefix_items())
    assert [e["cached_tokens"] for e in r["requests"]] == [0, 40 * 16]
    assert sim.store.dropped_saves >= 1
