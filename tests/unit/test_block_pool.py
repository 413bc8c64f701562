from __future__ import annotations

import pytest

from pdserve.engine.block_pool import BlockPool


def test_allocate_takes_lowest_ids_first_and_free_returns_to_tail():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1]
    assert pool.num_free_blocks == 2
    pool.free(list(reversed(a)))  # tail first
    # Free queue order is now 2, 3, 1, 0.
    assert [b.block_id for b in pool.allocate(4)] == [2, 3, 1, 0]
    pool.check_integrity()


def test_cached_blocks_are_evicted_in_lru_order_and_counted():
    pool = BlockPool(3, max_events=16)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, (101, 102, 103)):
        pool.cache_block(b, h)
    pool.free([blocks[1]])
    pool.free([blocks[0]])
    pool.free([blocks[2]])
    assert pool.num_cached_blocks == 3 and pool.num_free_blocks == 3
    # The least recently freed cached block (hash 102) is evicted first.
    first = pool.allocate(1)[0]
    assert first.block_id == 1 and pool.get_cached_block(102) is None
    assert pool.get_cached_block(101) is blocks[0]
    assert pool.num_evictions == 1
    stored, removed = pool.take_events()
    assert stored == [101, 102, 103] and removed == [102]
    assert pool.take_events() == ([], [])
    pool.check_integrity()


def test_touch_revives_a_cached_block_and_refcounts_never_go_negative():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache_block(b, 7)
    pool.free([b])
    assert pool.num_free_blocks == 2
    pool.touch([b])
    pool.touch([b])
    assert b.ref_count == 2 and pool.num_free_blocks == 1
    pool.free([b])
    pool.free([b])
    with pytest.raises(AssertionError):
        pool.free([b])


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, 5)
    pool.cache_block(b, 5)
    assert pool.get_cached_block(5) is a and b.block_hash is None
    pool.check_integrity()


def test_caching_off_forgets_hashes_on_free():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, 9)
    assert pool.get_cached_block(9) is None
    pool.free([a])
    pool.check_integrity()
