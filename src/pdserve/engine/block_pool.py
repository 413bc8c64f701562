"""The pool of KV blocks: reference counts, the prefix-cache map, and LRU eviction. Pure Python.

Every block is in exactly one of three states:
- free: no references, no hash; in the free queue;
- cached: no references, holds a full block under a hash; in the free queue and the hash map, so it can
  be reused by a later request with the same prefix until it is evicted (oldest freed first);
- in use: one or more requests hold it (``ref_count > 0``); not in the free queue.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockPool:
    """Fixed set of ``num_blocks`` blocks handed out by id."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, max_events: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Evictable blocks (free or cached) in eviction order: the front is evicted first.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}
        self.num_evictions = 0
        # KV events (hash stored / evicted) for routers that track caches; the oldest drop if unread.
        self.events: deque[tuple[bool, int]] | None = deque(maxlen=max_events) if max_events else None

    # -- queries (no side effects) -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``allocate`` can hand out now (free or evictable cached)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a hash and no references."""
        return sum(1 for b in self._free.values() if b.block_hash is not None)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        """The block that holds ``block_hash`` (in use or evictable), or None."""
        return self._cached.get(block_hash)

    # -- actions -----------------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take ``num_blocks`` blocks from the front of the free queue, evicting cached ones.

        The caller checks ``num_free_blocks`` first; asking for more than is free is a bug (AssertionError).
        """
        assert num_blocks <= len(self._free), (num_blocks, len(self._free))
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                if self.events is not None:
                    self.events.append((False, block.block_hash))
                block.block_hash = None
                self.num_evictions += 1
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference to cached blocks (a prefix hit); they leave the free queue if idle."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference to each block. Callers pass a request's blocks tail first, so the end of a
        sequence is evicted before its shared prefix."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, block
            if block.ref_count == 0:
                if not self.enable_caching:
                    block.block_hash = None
                self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: int) -> None:
        """Register a full, in-use block under its hash. A hash already held by another block keeps
        that one (the duplicate is freed normally later and never cached)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block
        if self.events is not None:
            self.events.append((True, block_hash))

    def take_events(self) -> tuple[list[int], list[int]]:
        """Hashes stored and evicted since the last call (empty when events are off)."""
        if not self.events:
            return [], []
        events, self.events = list(self.events), deque(maxlen=self.events.maxlen)
        return [h for stored, h in events if stored], [h for stored, h in events if not stored]

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash whose block is idle; return how many were dropped."""
        dropped = 0
        for block in self._free.values():
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                if self.events is not None:
                    self.events.append((False, block.block_hash))
                block.block_hash = None
                dropped += 1
        return dropped

    def check_integrity(self) -> None:
        """Assert the pool's invariants (tests call it after every scheduler step)."""
        in_use = [b for b in self.blocks if b.ref_count > 0]
        idle = list(self._free.values())
        assert all(b.ref_count >= 0 for b in self.blocks), "negative reference count"
        assert all(b.ref_count == 0 for b in idle), "referenced block in the free queue"
        assert len(in_use) + len(idle) == self.num_blocks, (len(in_use), len(idle), self.num_blocks)
        for h, b in self._cached.items():
            assert b.block_hash == h, (h, b)
        assert sum(1 for b in self.blocks if b.block_hash is not None) == len(self._cached)
