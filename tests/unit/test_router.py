"""Routing policies and the router: exact choices on small instance views."""
from __future__ import annotations

import pytest

from pdserve.errors import OverloadedError
from pdserve.hashing import hash_block_tokens
from pdserve.router import (DecodePolicy, InstanceTracker, InstanceView, LeastLoaded, PrefixAware, RoundRobin,
                            Router, make_policy)
from pdserve.router.admission import Admission


def _views(*queues, role="prefill"):
    return [InstanceView(f"w{i}", role, num_blocks=100, num_free_blocks=100, num_waiting=q)
            for i, q in enumerate(queues)]


def test_round_robin_cycles_in_order():
    policy = RoundRobin()
    views = _views(0, 0, 0)
    assert [policy.choose(views, []) for _ in range(5)] == ["w0", "w1", "w2", "w0", "w1"]


def test_least_loaded_picks_shortest_queue_first_on_ties():
    assert LeastLoaded().choose(_views(3, 1, 1), []) == "w1"
    views = _views(0, 0)
    views[0].num_inflight = 5  # the frontend knows of more than the worker reported yet
    assert LeastLoaded().choose(views, []) == "w1"


def test_policies_return_none_without_instances():
    for name in ("round_robin", "least_loaded", "prefix_aware"):
        assert make_policy(name).choose([], [1, 2]) is None
    with pytest.raises(ValueError):
        make_policy("random")


def test_prefix_aware_prefers_cached_prefix_until_queue_outweighs_it():
    tokens = list(range(64))
    hashes = hash_block_tokens(tokens, 16)  # 4 blocks
    views = _views(0, 0, 0)
    views[1].cached_block_hashes = set(hashes[:3])
    views[2].cached_block_hashes = set(hashes[:1])
    assert PrefixAware(load_weight=1.0).choose(views, hashes) == "w1"
    views[1].num_waiting = 2  # score 3 - 2 = 1 vs w0: 0, w2: 1 -> tie on score, shorter queue wins
    assert PrefixAware(load_weight=1.0).choose(views, hashes) == "w2"
    views[1].num_waiting = 4  # score -1: the idle instance without the prefix is better
    assert PrefixAware(load_weight=1.0).choose(views, hashes) == "w2"
    assert PrefixAware(load_weight=0.0).choose(views, hashes) == "w1"  # pure prefix affinity


def test_prefix_match_stops_at_first_missing_block():
    hashes = hash_block_tokens(list(range(48)), 16)
    view = InstanceView("w0", "prefill", cached_block_hashes={hashes[0], hashes[2]})
    assert view.num_cached_prefix_blocks(hashes) == 1


def test_store_index_reach_eviction_and_bound():
    from pdserve.router.store_index import StoreIndex

    hashes = hash_block_tokens(list(range(80)), 16)  # 5 blocks
    index = StoreIndex(max_blocks=4)
    index.apply("host", "hostA", hashes[:3], [])
    assert index.num_prefix_blocks(hashes, 0, "hostA") == 3
    assert index.num_prefix_blocks(hashes, 1, "hostA") == 2  # after a worker's own cached first block
    assert index.num_prefix_blocks(hashes, 0, "hostB") == 0  # another host's memory is out of reach
    index.apply("remote", "redis://store:6379", hashes[:2], [])
    assert index.num_prefix_blocks(hashes, 0, "hostB") == 2  # a remote store is reachable from every host
    index.apply("host", "hostA", [], [hashes[1]])
    assert index.num_prefix_blocks(hashes, 0, "hostA") == 3  # hashes[1] is still in the remote store
    index.apply("host", "hostA", hashes[3:], [])  # hostA now names hashes 0, 2, 3, 4: at its bound
    index.apply("host", "hostA", [hashes[1]], [])  # one more: the least recently stored (hashes[0]) goes
    assert len(index) == 4 + 2
    assert index.num_prefix_blocks(hashes, 0, "hostA") == 5  # hashes[0] and [1] from the remote store
    with pytest.raises(ValueError):
        StoreIndex(max_blocks=0)


def test_prefix_aware_counts_store_blocks_below_cached_ones():
    hashes = hash_block_tokens(list(range(64)), 16)  # 4 blocks
    tracker = InstanceTracker()
    views = _views(0, 0, 0)
    for v, host in zip(views, ("hostA", "hostB", "hostB")):
        v.host = host
        tracker.add(v)
    tracker.apply_store_events("host", "hostB", hashes, [])
    assert views[1].num_store_blocks(hashes, 0) == 4 and views[0].num_store_blocks(hashes, 0) == 0
    assert PrefixAware().choose(views, hashes) == "w1"  # hostB's pool holds the prefix; w1 first on ties
    views[2].cached_block_hashes = set(hashes[:2])  # w2: 2 cached + 2 from the store beats w1's 4 from the store
    assert PrefixAware().choose(views, hashes) == "w2"
    views[1].num_waiting = 3  # 0.5 * 4 - 3 < 0: the idle worker on the other host wins
    views[2].num_waiting = 4
    assert PrefixAware().choose(views, hashes) == "w0"
    assert PrefixAware(store_weight=0.0).choose(_views(0, 0), hashes) == "w0"


def test_decode_policy_needs_room_then_smallest_batch():
    views = _views(0, 0, 0, role="decode")
    views[0].num_free_blocks, views[0].num_running = 2, 0
    views[1].num_free_blocks, views[1].num_running = 50, 3
    views[2].num_free_blocks, views[2].num_running = 40, 1
    assert DecodePolicy().choose(views, 10) == "w2"  # w0 has no room
    assert DecodePolicy().choose(views, 45) == "w1"
    assert DecodePolicy().choose(views, 500) == "w1"  # nobody has room: most free blocks, it waits there


def test_tracker_kv_events_and_liveness():
    tracker = InstanceTracker()
    tracker.add(InstanceView("p0", "prefill"))
    tracker.apply_kv_events("p0", stored=[1, 2, 3], evicted=[])
    tracker.apply_kv_events("p0", stored=[4], evicted=[2])
    assert tracker.instances["p0"].cached_block_hashes == {1, 3, 4}
    tracker.update_stats("p0", num_blocks=10, num_free_blocks=7, num_running=1, num_waiting=2)
    assert tracker.instances["p0"].queue_len == 3
    tracker.set_alive("p0", False)
    assert tracker.views(("prefill",)) == [] and tracker.instances["p0"].cached_block_hashes == set()


def _tracker(roles):
    t = InstanceTracker()
    for i, role in enumerate(roles):
        t.add(InstanceView(f"{role}{i}", role, num_blocks=100, num_free_blocks=100))
    return t


def test_router_disaggregated_short_prompt_and_colocated():
    router = Router(_tracker(["prefill", "prefill", "decode"]), RoundRobin(), min_remote_prefill_tokens=32)
    long_route = router.route(100, [])
    assert long_route.decode_id == "decode2" and long_route.prefill_id == "prefill0"
    assert router.route(100, []).prefill_id == "prefill1"
    short = router.route(10, [])
    assert short.decode_id == "decode2" and not short.is_disaggregated
    colocated = Router(_tracker(["both", "both"]), LeastLoaded())
    colocated.tracker.instances["both0"].num_running = 4
    assert colocated.route(100, []).decode_id == "both1"


def test_router_falls_back_when_prefill_dead_and_none_without_servers():
    tracker = _tracker(["prefill", "decode"])
    router = Router(tracker, RoundRobin())
    tracker.set_alive("prefill0", False)
    assert router.route(100, []) == router.route(100, []) and not router.route(100, []).is_disaggregated
    tracker.set_alive("decode1", False)
    assert router.route(100, []) is None


def test_admission_bounds():
    a = Admission(max_inflight=2, max_inflight_per_instance=1)
    a.check(1, 0)
    with pytest.raises(OverloadedError):
        a.check(2)
    with pytest.raises(OverloadedError) as e:
        a.check(0, 1)
    assert e.value.retry_after_s >= 1
