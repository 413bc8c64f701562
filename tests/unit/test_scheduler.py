"""Scheduler + KV manager on tiny configs: exact block ids, chunking, prefix hits, preemption, aborts,
and the integrity check after every step."""
from __future__ import annotations

import pytest

from pdserve.config import SchedulerConfig
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler
from pdserve.kv.base import RemotePrefill
from pdserve.sampling_params import SamplingParams

EOS = 2


def make(num_blocks=8, block_size=4, budget=16, max_seqs=8, chunked=True, caching=True, max_len=64):
    kv = KVCacheManager(num_blocks, block_size, caching)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_chunked_prefill=chunked)
    return Scheduler(cfg, kv, max_len, external=RemotePrefill())


def req(rid, prompt, max_tokens=4, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return Request(rid, prompt, params, eos_token_ids=(EOS,), arrival_time=0.0)


def run_step(s: Scheduler, token=7):
    out = s.schedule()
    sampled = {c.request.request_id: token for c in out.chunks if c.samples}
    outputs = s.update_from_output(out, sampled)
    s.check_integrity()
    return out, outputs


def run_to_end(s: Scheduler, max_steps=200):
    finished = {}
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            break
        _, outputs = run_step(s)
        finished.update({o.request_id: o.finish_reason for o in outputs if o.finished})
    assert not s.has_unfinished_requests()
    return finished


def test_prefill_then_decode_with_exact_block_ids():
    s = make()
    r = req("a", list(range(10, 16)), max_tokens=3)  # 6 prompt tokens: blocks 0, 1
    s.add_request(r)
    out, outputs = run_step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 6)]
    assert s.kv.block_ids("a") == [0, 1]
    assert outputs[0].new_token_ids == [7]
    run_step(s)  # token 7 at position 6
    run_step(s)  # position 7: still block 1
    assert r.is_finished and r.finish_reason == "length" and r.output_token_ids == [7, 7, 7]
    assert s.kv.pool.num_free_blocks == 8


def test_chunked_prefill_splits_a_long_prompt_and_batches_decodes():
    s = make(num_blocks=16, budget=8)
    s.add_request(req("short", [11, 12, 13], max_tokens=5))
    s.add_request(req("long", list(range(100, 120)), max_tokens=2))  # 20 tokens
    out, _ = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("short", 0, 3), ("long", 0, 5)]
    out, _ = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("short", 3, 1), ("long", 5, 7)]
    assert not out.chunks[1].samples
    out, _ = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("short", 4, 1), ("long", 12, 7)]
    out, outputs = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("short", 5, 1), ("long", 19, 1)]
    assert {o.request_id for o in outputs} == {"short", "long"}
    run_to_end(s)


def test_no_chunking_waits_for_budget():
    s = make(budget=8, chunked=False)
    s.add_request(req("long", list(range(100, 112))))
    out = s.schedule()
    assert out.is_empty and s.num_waiting == 1


def test_prefix_cache_hit_reuses_blocks_and_leaves_one_token_to_compute():
    s = make(num_blocks=8)
    prompt = list(range(20, 28))  # exactly 2 full blocks
    s.add_request(req("a", prompt, max_tokens=1))
    run_to_end(s)
    assert s.kv.pool.num_cached_blocks == 2
    b = req("b", prompt, max_tokens=1)
    s.add_request(b)
    out, _ = run_step(s)
    # Block 0 is a hit; block 1 would cover the last token, which must be computed for logits.
    assert (out.chunks[0].start, out.chunks[0].num_tokens) == (4, 4)
    assert b.num_cached_tokens == 4
    c = req("c", prompt + [99, 98], max_tokens=1)
    s.add_request(c)
    out, _ = run_step(s)
    assert (out.chunks[0].start, out.chunks[0].num_tokens) == (8, 2)
    assert s.kv.stats.num_hit_tokens == 12


def test_shared_prefix_between_running_requests():
    s = make(num_blocks=16)
    s.add_request(req("a", list(range(30, 42)), max_tokens=4))
    run_step(s)
    s.add_request(req("b", list(range(30, 38)) + [1, 1, 1], max_tokens=4))
    out, _ = run_step(s)
    chunk = next(c for c in out.chunks if c.request.request_id == "b")
    assert chunk.start == 8
    assert s.kv.block_ids("b")[:2] == s.kv.block_ids("a")[:2]
    run_to_end(s)
    assert s.kv.pool.num_free_blocks == 16


def test_preemption_by_recompute_never_drops_a_request():
    # 4 blocks of 4 tokens; two requests that each grow to 3 blocks cannot both stay.
    s = make(num_blocks=4, budget=32)
    a, b = req("a", [5] * 7, max_tokens=5), req("b", [6] * 7, max_tokens=5)
    s.add_request(a)
    s.add_request(b)
    preempted = []
    for _ in range(100):
        if not s.has_unfinished_requests():
            break
        out, _ = run_step(s)
        preempted += out.preempted_ids
    assert preempted and preempted[0] == "b"  # the latest admitted goes first
    assert a.output_token_ids == [7] * 5 and b.output_token_ids == [7] * 5
    assert b.num_preemptions >= 1
    assert s.kv.pool.num_free_blocks == 4


def test_eos_stop_token_and_min_tokens():
    s = make()
    r = req("a", [1, 2, 3], max_tokens=10, min_tokens=2, stop_token_ids=[9])
    s.add_request(r)
    _, outs = run_step(s, token=EOS)  # below min_tokens: not a stop
    assert not r.is_finished
    _, outs = run_step(s, token=9)
    assert r.is_finished and r.finish_reason == "stop" and r.stop_reason == 9
    r2 = req("b", [1, 2, 3], max_tokens=10, ignore_eos=True)
    s.add_request(r2)
    run_step(s, token=EOS)
    assert not r2.is_finished


def test_max_model_len_caps_output():
    s = make(max_len=6)
    r = req("a", [1, 2, 3, 4], max_tokens=100)
    s.add_request(r)
    run_to_end(s)
    assert r.num_tokens == 6 and r.finish_reason == "length"


def test_abort_frees_blocks_anywhere_and_ignores_unknown_ids():
    s = make(num_blocks=8, budget=8)
    s.add_request(req("run", list(range(40, 50)), max_tokens=20))
    s.add_request(req("wait", list(range(40, 50)), max_tokens=20))
    run_step(s)
    outs = s.abort_requests(["run", "wait", "nope"])
    assert {o.request_id for o in outs} == {"run", "wait"} and all(o.finish_reason == "abort" for o in outs)
    s.check_integrity()
    assert s.kv.pool.num_free_blocks == 8 and not s.has_unfinished_requests()


def test_abort_during_step_is_skipped_by_update():
    s = make()
    s.add_request(req("a", [1, 2, 3]))
    out = s.schedule()
    s.abort_requests(["a"])
    assert s.update_from_output(out, {"a": 7}) == []
    s.check_integrity()


def test_max_num_seqs_caps_running():
    s = make(num_blocks=32, budget=64, max_seqs=2)
    for i in range(4):
        s.add_request(req(str(i), [3, 4, 5]))
    out, _ = run_step(s)
    assert len(out.chunks) == 2 and s.num_waiting == 2
    run_to_end(s)


def test_remote_kv_reserve_complete_and_fail():
    s = make(num_blocks=8)
    r = req("d", list(range(50, 57)), max_tokens=3)
    s.add_request(r)
    s.external.expect("d")
    out, _ = run_step(s)
    assert out.is_empty and [(x.request_id, x.block_ids, x.num_cached_tokens, x.num_external_tokens)
                             for x in out.reservations] == [("d", [0, 1], 0, 7)]
    assert r.status == RequestStatus.WAITING_FOR_KV
    first = s.finish_load("d", 42)
    assert first.new_token_ids == [42] and r.num_computed_tokens == 7
    out, _ = run_step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(7, 1)]
    run_to_end(s)
    assert r.output_token_ids == [42, 7, 7]
    # A failed transfer falls back to a local prefill, and is not reserved again.
    r2 = req("e", list(range(60, 67)), max_tokens=2)
    s.add_request(r2)
    s.external.expect("e")
    run_step(s)
    s.fail_load("e")
    s.check_integrity()
    out, _ = run_step(s)
    assert out.reservations == [] and [(c.start, c.num_tokens) for c in out.chunks] == [(0, 7)]
    run_to_end(s)
    assert r2.output_token_ids == [7, 7]
    assert s.kv.pool.num_free_blocks == 8


class _PartialSource(RemotePrefill):
    """A source that has the first ``n`` tokens of every prompt (as a store tier would)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def has_external(self, request_id):
        return True

    def num_external_tokens(self, request_id, num_prompt_tokens, num_local_hit_tokens, block_hashes=()):
        return max(0, self.n - num_local_hit_tokens) if request_id not in self._held else 0


def test_partial_load_continues_the_prefill_after_the_loaded_tokens():
    s = make(num_blocks=8, budget=16)
    s.external = _PartialSource(8)
    r = req("p", list(range(20, 31)), max_tokens=2)  # 11 prompt tokens: 8 loaded, 3 computed
    s.add_request(r)
    out, _ = run_step(s)
    assert out.is_empty and [(x.block_ids, x.num_cached_tokens, x.num_external_tokens)
                             for x in out.reservations] == [([0, 1], 0, 8)]
    assert s.finish_load("p") is None  # no first token: the request continues its prefill
    out, _ = run_step(s)
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(8, 3, True)]
    run_to_end(s)
    assert r.output_token_ids == [7, 7] and s.kv.pool.num_free_blocks == 8


def test_hold_kv_keeps_blocks_until_released():
    s = make(num_blocks=8)
    r = req("p", list(range(70, 79)), max_tokens=1)
    s.external.hold("p")
    s.add_request(r)
    _, outs = run_step(s)
    assert outs[0].finished and outs[0].kv_block_ids == [0, 1, 2]
    assert s.kv.pool.num_free_blocks == 5
    s.release_kv("p")
    s.check_integrity()
    assert s.kv.pool.num_free_blocks == 8


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_integrity(seed):
    import random
    rng = random.Random(seed)
    s = make(num_blocks=12, block_size=4, budget=12, max_seqs=6)
    n = 0
    for step in range(300):
        if rng.random() < 0.3 and n < 30:
            prefix = [1, 2, 3, 4] * rng.randint(0, 2)
            s.add_request(req(f"r{n}", prefix + [rng.randint(5, 50) for _ in range(rng.randint(1, 14))],
                              max_tokens=rng.randint(1, 8)))
            n += 1
        if rng.random() < 0.05 and s.running:
            s.abort_requests([rng.choice(s.running).request_id])
            s.check_integrity()
        run_step(s, token=rng.randint(5, 50))
    run_to_end(s, max_steps=1000)
    assert s.kv.pool.num_free_blocks == 12


def test_commit_decode_steps_equals_stepping():
    """The simulator's fast-forward: k decode steps committed at once leave what k steps leave."""
    def started():
        s = make(num_blocks=16, block_size=4, budget=32)
        for i in range(3):
            s.add_request(req(f"r{i}", [3, 4, 5, 6, 7 + i], max_tokens=20))
        run_step(s)  # prefills, first tokens
        return s

    stepped, committed = started(), started()
    for _ in range(6):
        run_step(stepped)
    committed.commit_decode_steps(list(committed.running), 6, 7)
    committed.check_integrity()
    for a, b in zip(stepped.running, committed.running):
        assert (a.output_token_ids, a.num_computed_tokens) == (b.output_token_ids, b.num_computed_tokens)
        assert len(stepped.kv.block_ids(a.request_id)) == len(committed.kv.block_ids(b.request_id))
    assert stepped.kv.pool.num_free_blocks == committed.kv.pool.num_free_blocks


def test_prefill_budget_bounds_prefill_chunks_beside_decodes():
    """Stall-free chunking: decodes always run; the prefill tokens beside them follow the budget function."""
    s = make(num_blocks=32, block_size=4, budget=64)
    s.add_request(req("d", [3, 4, 5], max_tokens=30))
    run_step(s)  # its prompt: from now on a decode
    seen = []

    def budget(num_decodes, decode_ctx, prefill_ctx):
        seen.append((num_decodes, decode_ctx, prefill_ctx))
        return 5
    s.prefill_budget_fn = budget
    s.add_request(req("p", list(range(10, 30)), max_tokens=2))  # 20 prompt tokens
    out, _ = run_step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("d", 1), ("p", 5)]
    assert seen[-1] == (1, 4, 0)  # a new prompt: no context
    out, _ = run_step(s)  # the running chunked prefill is bounded too, its chunk after the 5 computed tokens
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("d", 1), ("p", 5)]
    assert seen[-1] == (1, 5, 5)
    s.prefill_budget_fn = lambda n, ctx, prefill_ctx: 0  # no prefill at all this step: the decode still runs
    out, _ = run_step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("d", 1)]
    s.prefill_budget_fn = None
    run_to_end(s)
