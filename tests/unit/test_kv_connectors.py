"""KV connectors: bit-identical blocks land in exactly the reserved block ids, saves run asynchronously and
report by request id, and every failure is a reported failure (never an exception, never a write).

shm runs source and target in two processes (the target's cache is in /dev/shm, the source maps it);
tcp runs them in one process over a real TCP socket on 127.0.0.1.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from pdserve.kv.blocks import block_runs, copy_blocks
from pdserve.kv.connector import ConnectorConfig, SaveJob
from pdserve.kv.registry import connector_class, make_connector
from pdserve.protocol import KVReservationMsg

SHAPE = (3, 2, 12, 4, 2, 8)  # (layers, k|v, blocks, block_size, kv_heads, head_dim)
SRC_BLOCKS = [7, 2, 3, 9, 10]
DST_BLOCKS = [0, 5, 6, 1, 11]
NUM_CACHED_TOKENS = 4  # the target already has block 0 from its own prefix cache: 4 blocks travel


def _source_cache(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(SHAPE, generator=g).to(dtype)


def _target(name, dtype=torch.float32):
    conn = make_connector(name, ConnectorConfig("decode-test"))
    conn.listen()
    cache = conn.allocate_cache(SHAPE, dtype) if conn.capabilities.places_cache else torch.zeros(SHAPE, dtype=dtype)
    conn.register_cache(cache)
    return conn, cache


def _save(name, reservation, dtype=torch.float32, timeout_s=30.0):
    """Run one save with a fresh source connector; return its SaveDone."""
    source = make_connector(name, ConnectorConfig("prefill-test"))
    try:
        source.start_save(SaveJob("r1", SRC_BLOCKS, reservation, 42), _source_cache(dtype))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = source.poll_saves()
            if done:
                return done[0]
            time.sleep(0.01)
        raise AssertionError("the save never finished")
    finally:
        source.close()


def _sender_process(name, reservation, dtype_name, queue):
    done = _save(name, reservation, getattr(torch, dtype_name))
    queue.put((done.ok, done.kv_bytes, done.seconds, done.num_blocks, done.error))


def _loads(conn, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = conn.poll_loads()
        if got:
            return got
        conn.socket.poll(50)
    raise AssertionError("no load finished")


def _check_blocks(cache, src):
    skip = NUM_CACHED_TOKENS // SHAPE[3]
    cache, src = cache.view(torch.uint8), src.view(torch.uint8)  # bytes (torch compares no float8)
    for s, d in zip(SRC_BLOCKS[skip:], DST_BLOCKS[skip:]):
        assert torch.equal(cache[:, :, d], src[:, :, s]), (s, d)
    for b in set(range(SHAPE[2])) - set(DST_BLOCKS[skip:]):
        assert not cache[:, :, b].any(), f"block {b} was written"


def _reservation(conn, blocks=DST_BLOCKS, deadline_s=60.0, rid="r1"):
    r = KVReservationMsg(rid, list(blocks), NUM_CACHED_TOKENS, conn.target(), time.time() + deadline_s)
    conn.expect(r)
    return r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_shm_transfer_between_processes(dtype):
    target, cache = _target("shm", dtype)
    try:
        assert target.target().params["path"].startswith("/dev/shm/")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_sender_process, args=("shm", _reservation(target), str(dtype).removeprefix("torch."),
                                                         queue))
        proc.start()
        [load] = _loads(target)
        ok, kv_bytes, seconds, num_blocks, error = queue.get(timeout=30)
        proc.join(30)
        assert ok, error
        assert load.ok and load.request_id == "r1" and load.first_token_id == 42
        _check_blocks(cache, _source_cache(dtype))
        block_bytes = SHAPE[0] * SHAPE[1] * SHAPE[3] * SHAPE[4] * SHAPE[5] * cache.element_size()
        assert kv_bytes == load.kv_bytes == 4 * block_bytes and num_blocks == 4 and seconds > 0
    finally:
        path = target.path
        target.close()
    assert not path.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_tcp_transfer_writes_only_after_validation(dtype):
    target, cache = _target("tcp", dtype)
    try:
        done = _save("tcp", _reservation(target), dtype)
        assert done.ok and done.seconds > 0
        assert done.kv_bytes == 4 * SHAPE[0] * SHAPE[1] * SHAPE[3] * SHAPE[4] * SHAPE[5] * cache.element_size()
        assert not cache.view(torch.uint8).any()  # nothing lands before the worker loop polls (and validates)
        [load] = _loads(target)
        assert load.ok and load.first_token_id == 42
        _check_blocks(cache, _source_cache(dtype))
    finally:
        target.close()


@pytest.mark.parametrize("name", ["shm", "tcp"])
def test_kv_dtypes_that_differ_are_refused_unwritten(name):
    """A prefill worker with a bfloat16 cache and a decode worker with a float8 one (or the reverse): the
    transfer fails naming both dtypes; no byte is written, none misread."""
    for target_dtype, source_dtype in ((torch.float8_e4m3fn, torch.bfloat16), (torch.bfloat16, torch.float8_e4m3fn)):
        target, cache = _target(name, target_dtype)
        try:
            done = _save(name, _reservation(target), source_dtype)
            assert not done.ok and "KV dtypes differ" in done.error and "float8_e4m3fn" in done.error
            [load] = _loads(target)
            assert not load.ok and not cache.view(torch.uint8).any()
        finally:
            target.close()


def test_cancelled_reservation_drops_the_late_arrival_unwritten():
    target, cache = _target("tcp")
    try:
        reservation = _reservation(target)
        target.cancel("r1")
        assert _save("tcp", reservation).ok
        time.sleep(0.3)
        assert target.poll_loads() == [] and not cache.any()
    finally:
        target.close()


@pytest.mark.parametrize("name", ["shm", "tcp"])
def test_send_after_deadline_fails_and_tells_the_target(name):
    target, cache = _target(name)
    try:
        done = _save(name, _reservation(target, deadline_s=-1))
        assert not done.ok and "deadline" in done.error
        [load] = _loads(target)
        assert not load.ok and not cache.any()
    finally:
        target.close()


def test_mismatched_block_counts_fail_without_writing():
    target, cache = _target("shm")
    try:
        done = _save("shm", _reservation(target, DST_BLOCKS[:3]))
        assert not done.ok and "reserved" in done.error
        [load] = _loads(target)
        assert not load.ok and not cache.any()
    finally:
        target.close()


def test_refuse_tells_the_target():
    target, _ = _target("tcp")
    source = make_connector("tcp", ConnectorConfig("prefill-test"))
    try:
        source.refuse(_reservation(target), "no longer held")
        [load] = _loads(target)
        assert not load.ok and load.error == "no longer held"
    finally:
        source.close()
        target.close()


def test_registry_names_and_errors():
    assert connector_class("shm").capabilities.places_cache
    assert not connector_class("tcp").capabilities.writes_remotely
    assert connector_class("pdserve.kv.tcp:TcpConnector") is connector_class("tcp")
    for bad, words in (("rdma", "unknown KV connector"), ("nope.module:X", "cannot be loaded"),
                       ("pdserve.protocol:KVTarget", "is not a")):
        with pytest.raises(ValueError, match=words):
            connector_class(bad)


def test_block_runs_and_copy_blocks():
    assert block_runs([1, 2, 3, 7], [4, 5, 9, 10]) == [(1, 4, 2), (3, 9, 1), (7, 10, 1)]
    src = _source_cache()
    dst = torch.zeros(SHAPE)
    copy_blocks(dst, [4, 5, 9], src, [1, 2, 3])
    assert torch.equal(dst[:, :, [4, 5, 9]], src[:, :, [1, 2, 3]])


@pytest.mark.parametrize("name", ["shm", "tcp"])
def test_injected_corruption_is_caught_by_the_checksum(name, monkeypatch):
    monkeypatch.setenv("PDSERVE_FAULTS", "kv_corrupt=1")
    target, cache = _target(name)
    try:
        done = _save(name, _reservation(target))
        assert done.ok  # the sender cannot tell ...
        [load] = _loads(target)
        assert not load.ok and "checksum" in load.error  # ... the target can
    finally:
        target.close()


def test_checksums_pass_on_good_data_and_drops_leave_the_target_waiting(monkeypatch):
    monkeypatch.setenv("PDSERVE_KV_VERIFY", "1")
    target, cache = _target("tcp")
    try:
        assert _save("tcp", _reservation(target)).ok
        [load] = _loads(target)
        assert load.ok
        _check_blocks(cache, _source_cache())
        monkeypatch.setenv("PDSERVE_FAULTS", "kv_drop=1")
        assert _save("tcp", _reservation(target, rid="r1")).ok
        time.sleep(0.3)
        assert target.poll_loads() == []  # nothing came: the worker's deadline handles it
    finally:
        target.close()


def test_fault_plan_errors():
    import os

    from pdserve.kv.faults import KVFaults
    os.environ["PDSERVE_FAULTS"] = "kv_explode=1"
    try:
        with pytest.raises(ValueError, match="kv_explode"):
            KVFaults.from_env()
    finally:
        del os.environ["PDSERVE_FAULTS"]


def test_shm_source_lets_go_of_a_dead_targets_cache():
    """A restarted decode worker places a new cache file: the source maps it and drops the mapping of the
    old one, whose file is gone (else each restart would keep a whole KV pool mapped in the prefill worker)."""
    source = make_connector("shm", ConnectorConfig("prefill-test"))
    src = _source_cache()
    try:
        for i in range(3):
            conn, cache = _target("shm")
            try:
                source.start_save(SaveJob(f"r{i}", SRC_BLOCKS, _reservation(conn, rid=f"r{i}"), 42), src)
                deadline = time.monotonic() + 30
                while not (done := source.poll_saves()):
                    assert time.monotonic() < deadline, "the save never finished"
                    time.sleep(0.01)
                assert done[0].ok, done[0].error
                _check_blocks(cache, src)
                assert len(source._maps) == 1  # this target's cache only
            finally:
                conn.close()  # removes its file, as a dead worker's launcher does
    finally:
        source.close()
