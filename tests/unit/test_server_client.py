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


def test_a_worker_whose_kv_dtype_differs_is_refused_at_connect(caplog):
    """A decode worker with a bfloat16 KV cache joining a prefill worker's float8 one: never admitted (no
    request is routed to it, so no block is ever misread), with one error naming both; the same dtype joins."""
    from pdserve import protocol as p
    from pdserve.server.client import WorkerConn

    def info(worker_id, role, kv_dtype):
        return p.WorkerInfo(worker_id, role, "m", 1, "h", 16, 100, 2048, kv_dtype=kv_dtype)

    client = FrontendClient(FrontendOptions(("tcp://a", "tcp://b", "tcp://c")))
    client._dispatch(WorkerConn("tcp://a", None), info("prefill-0", "prefill", "float8_e4m3fn"))
    late = WorkerConn("tcp://b", None)
    for _ in range(2):  # the frontend says hello again until it hears back: one error, not one a second
        client._dispatch(late, info("decode-0", "decode", "bfloat16"))
    assert set(client.conns) == {"prefill-0"} and late.info is None
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "bfloat16" in errors[0] and "float8_e4m3fn" in errors[0] and \
        "--kv-cache-dtype" in errors[0]
    client._dispatch(WorkerConn("tcp://c", None), info("decode-1", "decode", "float8_e4m3fn"))
    assert set(client.conns) == {"prefill-0", "decode-1"}
