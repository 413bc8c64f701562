"""The frontend's worker client against tiny in-process workers (threads): disaggregated requests and
prefix-aware routing learned from the workers' KV events."""
from __future__ import annotations

import asyncio

import pytest

from pdserve.sampling_params import SamplingParams
from pdserve.server.client import FrontendClient, FrontendOptions

from test_server_worker import PROMPT, Running, tiny_dir  # noqa: F401 - tiny_dir is a fixture


def _collect(client, prompt, params):
    async def run():
        ids, reason = [], None
        async for event in client.generate(prompt, [params]):
            assert event.error is None, event.error
            ids += event.output.new_token_ids
            if event.output.finish_reason:
                reason = event.output.finish_reason
                break
        return ids, reason
    return run()


@pytest.fixture(scope="module")
def workers(tiny_dir):  # noqa: F811
    ws = [Running(tiny_dir, "prefill"), Running(tiny_dir, "prefill"), Running(tiny_dir, "decode", "shm")]
    yield ws
    for w in ws:
        w.close()


def test_disaggregated_requests_and_prefix_aware_routing(workers):
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)

    async def scenario():
        client = FrontendClient(FrontendOptions(tuple(w.worker.address for w in workers), routing="prefix_aware",
                                                connect_timeout_s=30))
        await client.start()
        try:
            assert client.mode == "disaggregated" and client.can_serve()
            first, reason = await _collect(client, PROMPT, greedy)
            assert len(first) == 5 and reason == "length"
            # the prefill worker that computed PROMPT reports its blocks; the router follows them
            prefill_ids = [w.worker.worker_id for w in workers[:2]]
            for _ in range(100):
                cached = [client.tracker.instances[i].num_cached_prefix_blocks(_hashes()) for i in prefill_ids]
                if max(cached) == 2:
                    break
                await asyncio.sleep(0.05)
            owner = prefill_ids[cached.index(2)]
            route = client.router.route(len(PROMPT), _hashes(), 16)
            assert route.prefill_id == owner
            again, _ = await _collect(client, PROMPT, greedy)
            assert again == first
            health = client.health()
            assert health["status"] == "ok" and len(health["workers"]) == 3
            assert client.num_inflight == 0
        finally:
            await client.stop()

    asyncio.run(scenario())


def _hashes():
    from pdserve.hashing import hash_block_tokens

    return hash_block_tokens(PROMPT, 16)
