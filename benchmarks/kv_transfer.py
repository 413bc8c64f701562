"""KV transfer bandwidth, shm and tcp connectors, as a ratio to a plain memory copy of the same bytes.

For each prompt length, the prefill side's blocks (random, scattered block ids, as a fragmented pool
gives them) are sent into a decode-side cache's reserved blocks (also scattered) through the real
connectors (kv/): shm (map the target's /dev/shm cache, copy the blocks in, notice over ZMQ) and tcp (gather
into one buffer, zero-copy ZMQ frame over 127.0.0.1 TCP, receiver copies into its blocks). Timed from
the start of the send until the receiver holds the data (notice received; for tcp, written into the
cache), in steady state (a first transfer of every block maps all pages). The baseline, measured in the same run, is ``dst.copy_(src)`` of one contiguous tensor of the
same number of bytes. Median of --repeats.

    .venv/bin/python benchmarks/kv_transfer.py [--shape smollm2|llama8b] [--tokens 512,2048,8192]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import zmq

from pdserve.kv.blocks import block_bytes, copy_blocks
from pdserve.kv.connector import ConnectorConfig, SaveJob
from pdserve.kv.registry import make_connector
from pdserve.protocol import KVReservationMsg

SHAPES = {  # (num_layers, num_kv_heads, head_dim, dtype)
    "smollm2": (30, 3, 64, torch.float32),  # the default model as served on CPU
    "llama8b": (32, 8, 128, torch.bfloat16),
}
BLOCK_SIZE = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="smollm2")
    ap.add_argument("--tokens", default="512,2048,8192", help="prompt lengths (tokens) to transfer")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a worker pinned to one core has 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    layers, heads, dim, dtype = SHAPES[args.shape]
    lengths = [int(t) for t in args.tokens.split(",")]
    num_blocks = 2 * max(lengths) // BLOCK_SIZE + 8
    shape = (layers, 2, num_blocks, BLOCK_SIZE, heads, dim)
    src_cache = torch.randn(shape).to(dtype)
    print(f"KV shape {args.shape}: {layers} layers x {heads} kv heads x {dim} dim, {dtype}, block {BLOCK_SIZE} tokens "
          f"= {block_bytes(src_cache) / 2**10:.0f} KiB per block; torch threads {torch.get_num_threads()}")
    print(f"{'tokens':>7} {'blocks':>6} {'MiB':>7} | {'memcpy':>7} {'blkcopy':>7} {'zmq-raw':>7} | {'shm':>6} "
          f"{'ratio':>5} | {'tcp':>6} {'ratio':>5}   (GB/s)")
    ctx = zmq.Context()
    for r in _run(ctx, src_cache, shape, dtype, lengths, args.repeats):
        n_tokens, n_blocks, nbytes, t = r
        gbs = {k: nbytes / v / 1e9 for k, v in t.items()}
        print(f"{n_tokens:>7} {n_blocks:>6} {nbytes / 2**20:>7.1f} | {gbs['memcpy']:>7.2f} {gbs['blockcopy']:>7.2f} "
              f"{gbs['zmq']:>7.2f} | {gbs['shm']:>6.2f} {t['memcpy'] / t['shm']:>5.2f} | {gbs['tcp']:>6.2f} "
              f"{t['memcpy'] / t['tcp']:>5.2f}")
    ctx.term()
    print("ratio = backend bandwidth / memcpy bandwidth (one contiguous torch copy of the same bytes).\n"
          "blkcopy: a local torch copy of the same scattered blocks (what shm does, without the mapping and "
          "notice);\nzmq-raw: one frame of the same bytes over ZMQ on 127.0.0.1 (the floor under tcp).")


def _run(ctx, src_cache, shape, dtype, lengths, repeats):
    receivers = {b: make_connector(b, ConnectorConfig(f"bench-{b}")) for b in ("shm", "tcp")}
    caches = {}
    for b, r in receivers.items():
        r.listen()
        caches[b] = r.allocate_cache(shape, dtype) if r.capabilities.places_cache else torch.zeros(shape, dtype=dtype)
        r.register_cache(caches[b])
    sender_ctx = zmq.Context()  # its own ZMQ I/O thread for the raw-frame baseline
    senders = {b: make_connector(b, ConnectorConfig(f"bench-sender-{b}")) for b in ("shm", "tcp")}
    rng = random.Random(0)
    for b in ("shm", "tcp"):  # steady state: every page of both caches already mapped on both sides
        every = list(range(shape[2]))
        _one_transfer(senders[b], receivers[b], caches[b], src_cache, every, every)
    try:
        for n_tokens in lengths:
            n_blocks = n_tokens // BLOCK_SIZE
            nbytes = n_blocks * block_bytes(src_cache)
            flat_src = torch.randn(nbytes // src_cache.element_size()).to(dtype)
            flat_dst = torch.empty_like(flat_src)
            times = {"memcpy": _median(repeats, lambda: flat_dst.copy_(flat_src))}
            local = torch.empty_like(src_cache)
            ids = rng.sample(range(shape[2]), n_blocks), rng.sample(range(shape[2]), n_blocks)
            times["blockcopy"] = _median(repeats, lambda: copy_blocks(local, ids[1], src_cache, ids[0]))
            del local
            times["zmq"] = _median(repeats, lambda: _zmq_raw(ctx, sender_ctx, flat_src))
            for backend in ("shm", "tcp"):
                samples = []
                for _ in range(repeats):
                    src_ids = rng.sample(range(shape[2]), n_blocks)
                    dst_ids = rng.sample(range(shape[2]), n_blocks)
                    samples.append(_one_transfer(senders[backend], receivers[backend], caches[backend], src_cache,
                                                 src_ids, dst_ids))
                times[backend] = statistics.median(samples)
            yield n_tokens, n_blocks, nbytes, times
    finally:
        for s in senders.values():
            s.close()
        for r in receivers.values():
            r.close()
        sender_ctx.term()


def _one_transfer(sender, receiver, cache, src_cache, src_ids, dst_ids) -> float:
    """From the start of the save (on the sender's save thread) until the target holds the data."""
    reservation = KVReservationMsg("bench", dst_ids, 0, receiver.target(), time.time() + 60)
    receiver.expect(reservation)
    t0 = time.perf_counter()
    sender.start_save(SaveJob("bench", src_ids, reservation, 1), src_cache)
    loads = []
    while not loads:
        receiver.socket.poll(1000)
        loads = receiver.poll_loads()  # tcp: validates and writes the frames into the cache
    elapsed = time.perf_counter() - t0
    done = []
    while not done:
        done = sender.poll_saves()
        time.sleep(0.001)
    assert loads[0].ok and done[0].ok, (loads[0].error, done[0].error)
    assert torch.equal(cache[:, :, dst_ids[-1]], src_cache[:, :, src_ids[-1]])
    return elapsed


def _zmq_raw(ctx, sender_ctx, data: torch.Tensor) -> None:
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = sender_ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(data.view(torch.uint8).numpy(), copy=False)
    pull.recv(copy=False)
    push.close(0)
    pull.close(0)


def _median(repeats: int, fn) -> float:
    fn()  # warm up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
