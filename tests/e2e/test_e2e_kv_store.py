"""The KV store end to end: two colocated workers behind round-robin routing, so every second request lands on the
worker that did not compute its prefix; through the host tier (a shared-memory pool) and through the remote tier
(a Valkey server that `pdserve up --kv-remote redis` starts and stops). Greedy outputs are compared token for token
with the offline engine without a store (float32)."""
from __future__ import annotations

import functools
import os
import re
import signal
import time

import httpx
import psutil
import pytest

from cluster_helpers import (DTYPE, KV_CACHE, MODEL, PROMPTS, local_cluster, quant_act_bits_as_cluster, require_model,
                             token_ids_from_logprobs)
from e2e_checks import client

pytestmark = pytest.mark.slow
MAX_TOKENS = 12
BLOCK = 16
FLAGS = ("--colocated", "2", "--routing", "round_robin", "--no-pin")


_LLM: list = []  # the offline engine without a store, the reference (one for the module)


@pytest.fixture(scope="module", autouse=True)
def _reference_engine():
    yield
    _LLM.clear()


def _llm():
    from pdserve import LLM

    if not _LLM:
        _LLM.append(LLM(MODEL, kv_cache_memory=KV_CACHE, dtype=DTYPE))
    return _LLM[0]


@functools.cache
def _prompts() -> dict[str, list[int]]:
    tok = _llm().get_tokenizer()
    story = tok.encode(PROMPTS[1])
    return {"shared": story * 3, "turn1": tok.encode(PROMPTS[2]) + story, "corrupt": story[::-1] * 2,
            "killed": story[5:] * 2, "extra": tok.encode(" Tell me more about it, please.")}


def _offline(ids_list: list[list[int]]) -> list[list[int]]:
    from pdserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    with quant_act_bits_as_cluster():  # the workers' activation rounding: a loaded KV is bit for bit a computed one
        return [list(_llm().generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids)
                for ids in ids_list]


def _generate(url: str, ids: list[int]) -> tuple[list[int], int]:
    r = client(url).completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                       extra_body={"return_tokens_as_token_ids": True})
    return token_ids_from_logprobs(r.choices[0].logprobs.tokens), r.usage.prompt_tokens_details.cached_tokens


def _metric(url: str, name: str) -> dict[str, float]:
    """``{label text: value}`` of one metric family in /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", text, re.M)}


def _wait_saved(url: str, before: float, timeout_s: float = 20.0) -> float:
    """Until the workers report more KV store bytes saved than ``before`` (their Stats come every 0.5 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total = sum(_metric(url, "pdserve:kv_store_save_bytes_total").values())
        if total > before:
            time.sleep(0.6)  # a save's blocks are released with its report
            return total
        time.sleep(0.2)
    raise AssertionError("no KV store save reported")


def _saved(url: str) -> float:
    return sum(_metric(url, "pdserve:kv_store_save_bytes_total").values())


def _check_prefix_crosses_workers(url: str) -> None:
    ids = _prompts()["shared"]
    (want,) = _offline([ids])
    before = _saved(url)
    got, cached = _generate(url, ids)  # worker A computes it
    assert got == want and cached == 0
    _wait_saved(url, before)
    got, cached = _generate(url, ids)  # worker B loads it from the store
    assert got == want
    assert cached == (len(ids) - 1) // BLOCK * BLOCK
    deadline = time.monotonic() + 10  # the count comes with the workers' Stats (every 0.5 s)
    while max((loaded := _metric(url, "pdserve:kv_store_loaded_tokens_total")).values(), default=0) < cached:
        assert time.monotonic() < deadline, loaded
        time.sleep(0.2)
    assert sorted(loaded.values())[0] == 0, loaded
    rates = [w["tier_hit_rates"] for w in httpx.get(f"{url}/v1/cluster", timeout=10).json()["workers"]]
    assert any(r and max(r.values()) > 0 for r in rates), rates  # the dashboard's tier hit rates
    used = _metric(url, "pdserve:kv_store_used_bytes")
    capacity = _metric(url, "pdserve:kv_store_capacity_bytes")
    assert all(used[k] <= capacity[k] for k in used if capacity[k]), (used, capacity)


@pytest.fixture(scope="module")
def host_cluster():
    require_model()
    with local_cluster(*FLAGS, "--kv-host-memory", "128MiB") as (url, _):
        yield url
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("pdserve-kvstore-")], "the pool outlived its users"


def test_host_tier_serves_a_prefix_the_other_worker_computed(host_cluster):
    _check_prefix_crosses_workers(host_cluster)


def test_second_turn_on_the_other_worker_loads_the_first_turns_prompt_and_output(host_cluster):
    p = _prompts()
    turn1 = p["turn1"]
    (out1,) = _offline([turn1])
    before = _saved(host_cluster)
    got, _ = _generate(host_cluster, turn1)
    assert got == out1
    _wait_saved(host_cluster, before)
    turn2 = turn1 + out1 + p["extra"]
    (want,) = _offline([turn2])
    got, cached = _generate(host_cluster, turn2)  # the other worker (round robin)
    assert got == want
    # the first turn's blocks with KV: prompt and output but the last output token (its KV is never computed)
    assert cached == (len(turn1) + len(out1) - 1) // BLOCK * BLOCK
    assert cached > len(turn1) // BLOCK * BLOCK, "the output's blocks were not loaded"


def test_a_flipped_byte_in_the_store_is_a_miss_and_the_output_is_right(host_cluster):
    from pdserve.hashing import hash_block_tokens
    from pdserve.kv.store.host import open_pool
    from pdserve.kv.store.keys import Namespace

    ids = _prompts()["corrupt"]
    (want,) = _offline([ids])
    before = _saved(host_cluster)
    assert _generate(host_cluster, ids)[0] == want
    _wait_saved(host_cluster, before)
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, float32 (the workers' namespace, kv/store/keys.py)
    ns = Namespace(f"{MODEL}|auto", DTYPE, (30, 2, BLOCK, 3, 64), 4)
    pool = open_pool(ns, 0)
    try:
        assert pool.flip_a_byte(hash_block_tokens(ids, BLOCK)[0])
    finally:
        pool.close()
    got, cached = _generate(host_cluster, ids)
    assert got == want and cached == 0


@pytest.fixture(scope="module")
def remote_cluster():
    require_model()
    with local_cluster(*FLAGS, "--kv-remote", "redis", "--kv-remote-memory", "64MiB", "--kv-store-timeout", "0.5") \
            as (url, proc):
        yield url, proc
    assert not [c for c in psutil.process_iter(["name"]) if c.info["name"] == "valkey-server"
                and c.ppid() == proc.pid], "the store server outlived pdserve up"


def test_remote_tier_serves_a_prefix_the_other_worker_computed(remote_cluster):
    _check_prefix_crosses_workers(remote_cluster[0])


def test_store_killed_mid_run_requests_complete(remote_cluster):
    url, proc = remote_cluster
    ids = _prompts()["killed"]
    (want,) = _offline([ids])
    servers = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "valkey-server"]
    assert len(servers) == 1
    os.kill(servers[0].pid, signal.SIGKILL)
    for _ in range(4):
        assert _generate(url, ids)[0] == want
    assert sum(_metric(url, "pdserve:kv_store_errors_total").values()) >= 1 or \
        time.sleep(1) or sum(_metric(url, "pdserve:kv_store_errors_total").values()) >= 1
