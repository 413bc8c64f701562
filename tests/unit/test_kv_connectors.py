"""KV transfer backends: bit-identical blocks land in exactly the reserved block ids, timing recorded.

shm runs sender and receiver in two processes (the receiver's cache is in /dev/shm, the sender maps it);
tcp runs them in two threads over a real TCP socket on 127.0.0.1.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch
import zmq

from pdserve.kv.transfer import block_runs, copy_blocks, make_receiver, make_sender
from pdserve.worker.protocol import KVReservationMsg

SHAPE = (3, 2, 12, 4, 2, 8)  # (layers, k|v, blocks, block_size, kv_heads, head_dim)
SRC_BLOCKS = [7, 2, 3, 9, 10]
DST_BLOCKS = [0, 5, 6, 1, 11]
NUM_CACHED_TOKENS = 4  # the receiver already has block 0 from its own prefix cache: 4 blocks travel


def _source_cache(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(SHAPE, generator=g).to(dtype)


def _sender_process(target, reservation_blocks, deadline, dtype_name, queue):
    dtype = getattr(torch, dtype_name)
    sender = make_sender(target.backend, zmq.Context.instance())
    res = KVReservationMsg("r1", reservation_blocks, NUM_CACHED_TOKENS, target, deadline)
    record = sender.send("r1", _source_cache(dtype), SRC_BLOCKS, res, first_token_id=42)
    sender.close()
    queue.put((record.ok, record.kv_bytes, record.seconds, record.num_blocks, record.error))


def _receive(receiver, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = receiver.poll()
        if got:
            return got
        receiver.socket.poll(100)
    raise AssertionError("no transfer notice arrived")


def _check_blocks(cache, src):
    skip = NUM_CACHED_TOKENS // SHAPE[3]
    for s, d in zip(SRC_BLOCKS[skip:], DST_BLOCKS[skip:]):
        assert torch.equal(cache[:, :, d], src[:, :, s]), (s, d)
    untouched = set(range(SHAPE[2])) - set(DST_BLOCKS[skip:])
    for b in untouched:
        assert not cache[:, :, b].any(), f"block {b} was written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shm_transfer_between_processes(dtype):
    ctx = zmq.Context()
    receiver = make_receiver("shm", ctx, "decode-test")
    try:
        cache = receiver.allocate_cache(SHAPE, dtype)
        target = receiver.target()
        queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_sender_process, args=(target, DST_BLOCKS, time.time() + 60,
                                                                             str(dtype).removeprefix("torch."),
                                                                             queue))
        proc.start()
        [incoming] = _receive(receiver)
        ok, kv_bytes, seconds, num_blocks, error = queue.get(timeout=30)
        proc.join(30)
        assert ok, error
        notice = incoming.notice
        assert notice.ok and notice.request_id == "r1" and notice.first_token_id == 42
        assert notice.dst_block_ids == DST_BLOCKS[1:]
        assert incoming.write_into(cache) == 0.0  # shm: the data is already there
        _check_blocks(cache, _source_cache(dtype))
        block_bytes = SHAPE[0] * SHAPE[1] * SHAPE[3] * SHAPE[4] * SHAPE[5] * cache.element_size()
        assert kv_bytes == notice.kv_bytes == 4 * block_bytes and num_blocks == 4 and seconds > 0
    finally:
        path = receiver.path
        receiver.close()
        ctx.term()
    assert not path.exists()


def test_tcp_transfer_between_threads():
    ctx = zmq.Context()
    receiver = make_receiver("tcp", ctx, "decode-test")
    cache = receiver.allocate_cache(SHAPE, torch.float32)
    target = receiver.target()
    records = []

    def send():
        sender = make_sender("tcp", zmq.Context())
        res = KVReservationMsg("r1", DST_BLOCKS, NUM_CACHED_TOKENS, target, time.time() + 60)
        records.append(sender.send("r1", _source_cache(), SRC_BLOCKS, res, first_token_id=42))
        sender.close()

    thread = threading.Thread(target=send)
    thread.start()
    [incoming] = _receive(receiver)
    thread.join(30)
    assert records[0].ok and records[0].seconds > 0 and records[0].kv_bytes > 0
    assert not cache.any()  # nothing lands before the worker validates and writes
    assert incoming.write_into(cache) > 0
    _check_blocks(cache, _source_cache())
    receiver.close()
    ctx.term()


def test_send_after_deadline_fails_and_notifies_receiver():
    ctx = zmq.Context()
    receiver = make_receiver("shm", ctx, "decode-test")
    cache = receiver.allocate_cache(SHAPE, torch.float32)
    sender = make_sender("shm", ctx)
    res = KVReservationMsg("r1", DST_BLOCKS, NUM_CACHED_TOKENS, receiver.target(), time.time() - 1)
    record = sender.send("r1", _source_cache(), SRC_BLOCKS, res, first_token_id=1)
    assert not record.ok and "deadline" in record.error
    [incoming] = _receive(receiver)
    assert not incoming.notice.ok
    assert not cache.any()
    sender.close()
    receiver.close()
    ctx.term()


def test_mismatched_block_counts_fail_without_writing():
    ctx = zmq.Context()
    receiver = make_receiver("shm", ctx, "decode-test")
    cache = receiver.allocate_cache(SHAPE, torch.float32)
    sender = make_sender("shm", ctx)
    res = KVReservationMsg("r1", DST_BLOCKS[:3], 0, receiver.target(), time.time() + 60)
    assert not sender.send("r1", _source_cache(), SRC_BLOCKS, res, first_token_id=1).ok
    assert not cache.any()
    sender.close()
    receiver.close()
    ctx.term()


def test_block_runs_and_copy_blocks():
    assert block_runs([1, 2, 3, 7], [4, 5, 9, 10]) == [(1, 4, 2), (3, 9, 1), (7, 10, 1)]
    src = _source_cache()
    dst = torch.zeros(SHAPE)
    copy_blocks(dst, [4, 5, 9], src, [1, 2, 3])
    assert torch.equal(dst[:, :, [4, 5, 9]], src[:, :, [1, 2, 3]])
