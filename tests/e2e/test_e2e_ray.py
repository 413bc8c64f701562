"""End to end on a Ray cluster: `pdserve up --ray` over a local two-node Ray cluster (Ray's own test utility:
two nodes on this machine, each with one CPU and a custom resource of its own), prefill placed on node A and
decode on node B by the pools' resources, KV between them over TCP (chosen from where Ray placed them, with
the cluster's CURVE keys); greedy output through the openai client equals the offline engine's; a worker
actor killed mid-load is restarted by Ray, re-registered by the frontend, and serves again; after stop,
nothing of the cluster is left in Ray."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from cluster_helpers import DTYPE, KV_CACHE, MODEL, MAX_TOKENS, offline_reference, require_model, wait_idle
import e2e_checks as checks
from ray_helpers import ray_test_cluster, ray_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_cluster():
    require_model()
    with ray_test_cluster({"num_cpus": 1, "resources": {"node_a": 1}}, {"num_cpus": 1, "resources": {"node_b": 1}}) \
            as cluster:
        yield cluster


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """`pdserve up` from a cluster file (backend ray, each pool on its node); yields (url, status at start, log);
    stops it with SIGTERM and checks that its actors and placement groups are gone from Ray."""
    config = {"model": MODEL, "engine": {"kv_cache_memory": KV_CACHE, "dtype": DTYPE},
              "serving": {"mode": "disaggregated", "prefill": 1, "decode": 1, "backend": "ray",
                          "ray": {"address": ray_cluster.address,
                                  "pools": {"prefill": {"num_cpus": 1, "resources": {"node_a": 1}},
                                            "decode": {"num_cpus": 1, "resources": {"node_b": 1}}}}}}
    with ray_up(config, tmp_path_factory.mktemp("ray"), "--enable-debug-endpoints", "--worker-timeout", "10") \
            as served:
        yield served


def _node_of(status, resource):
    return next(n["node_id"] for n in status["ray"]["nodes"] if resource in n["resources"])


def test_pools_placed_by_resources_and_kv_over_tcp(served):
    url, status, log = served
    ray_status = status["ray"]
    workers = ray_status["workers"]
    assert workers["prefill-0"]["node_id"] == _node_of(status, "node_a")
    assert workers["decode-1"]["node_id"] == _node_of(status, "node_b")
    assert workers["prefill-0"]["resources"] == {"CPU": 1.0, "node_a": 1.0}
    for w in status["workers"]:  # the frontend found them through Ray, at the addresses Ray's actors report
        assert w["address"] == workers[w["worker_id"]]["address"]
    checks.check_kv_integrity(url)  # a disaggregated request: the decode worker's blocks equal the prefill's
    assert "KV to decode-1 goes by tcp" in log.read_text()  # two Ray nodes: TCP, not shared memory


def test_greedy_matches_offline(served):
    checks.check_greedy_matches_offline(served[0])


def test_killed_actor_is_restarted_and_serves_again(served):
    """Kill the prefill worker's actor while requests are running: they still end with the right tokens (their
    decode worker computes what was lost), Ray restarts the actor, the frontend finds it at its new address
    and re-admits it, and requests after it are prefilled there again, with the offline engine's tokens."""
    import ray

    url, status, _ = served
    prompt_ids, expected, _ = offline_reference()
    c = checks.client(url)
    results = []

    def run(ids, want):
        r = c.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                 extra_body={"return_tokens_as_token_ids": True})
        results.append(checks.token_ids_from_logprobs(r.choices[0].logprobs.tokens) == want)

    threads = [threading.Thread(target=run, args=(prompt_ids[1], expected[1])) for _ in range(3)]
    for t in threads:
        t.start()
    actor = ray.get_actor("prefill-0", namespace=status["ray"]["namespace"])
    old_address = status["ray"]["workers"]["prefill-0"]["address"]
    ray.kill(actor, no_restart=False)  # the process dies; Ray starts it again
    for t in threads:
        t.join(120)
    assert results == [True] * 3
    deadline = time.monotonic() + 180
    while True:
        s = httpx.get(f"{url}/v1/cluster", timeout=30).json()
        w = s["ray"]["workers"]["prefill-0"]
        alive = {x["worker_id"]: x["alive"] for x in s["workers"] if "worker_id" in x}
        if w["restarted"] and w["address"] != old_address and alive.get("prefill-0"):
            break
        assert time.monotonic() < deadline, f"prefill-0 not back: {w}, {alive}"
        time.sleep(1)
    wait_idle(url)
    before = httpx.get(f"{url}/metrics", timeout=30).text
    checks.check_greedy_matches_offline(url)
    assert _prefill_done(httpx.get(f"{url}/metrics", timeout=30).text) > _prefill_done(before)  # remote again


def _prefill_done(metrics: str) -> float:
    """KV transfers the prefill workers reported (pdserve:kv_transfer_seconds_count)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("pdserve:kv_transfer_seconds_count"))
