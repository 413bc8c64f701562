"""Per-request block tables over the block pool, with prefix caching. Pure Python.

A request's blocks cover its tokens in order (block i holds tokens ``[i*block_size, (i+1)*block_size)``).
Full blocks are registered in the prefix cache under their chained hash as soon as their KV is computed,
so a request that arrives while another is still running can already reuse its prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.block_pool import BlockPool, KVBlock
from pdserve.engine.request import Request


@dataclass
class PrefixCacheStats:
    """Counters since start: tokens asked for and found in the prefix cache."""

    num_queries: int = 0  # requests looked up
    num_query_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_events: int = 0) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching, max_events=max_events)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks of a request already registered by hash
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest run of the request's leading full blocks found in the cache, and the tokens they
        cover. At least one token is always left to compute (its logits give the next token).
        No side effects except the hit-rate counters."""
        if not self.enable_prefix_caching:
            return [], 0
        hashes = request.update_block_hashes(self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.stats.num_queries += 1
        self.stats.num_query_tokens += request.num_tokens
        self.stats.num_hit_tokens += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens after the request's computed ones.

        ``computed_blocks`` are prefix-cache hits from ``get_computed_blocks`` (first scheduling only);
        they are referenced before new blocks are taken, so allocation cannot evict them. Returns the ids
        of newly allocated blocks, or None (and changes nothing) when the pool has too few.
        """
        if not computed_blocks:
            held = self._blocks.get(request.request_id)
            if held is not None and len(held) * self.block_size >= request.num_computed_tokens + num_new_tokens:
                return []  # the common decode step: the last block still has room
        computed_blocks = computed_blocks or []
        need = self._num_blocks_needed(request, num_new_tokens, computed_blocks)
        if need is None:
            return None
        blocks = self._blocks.setdefault(request.request_id, [])
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            self._num_cached[request.request_id] = len(computed_blocks)
        new_blocks = self.pool.allocate(need)
        blocks.extend(new_blocks)
        return [b.block_id for b in new_blocks]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's full blocks whose KV is now computed under their hashes."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        blocks = self._blocks.get(rid)
        if not blocks:
            return
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        start = self._num_cached.get(rid, 0)
        if num_full <= start:
            return
        hashes = request.update_block_hashes(self.block_size)
        for i in range(start, min(num_full, len(hashes))):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached[rid] = min(num_full, len(hashes))

    def free(self, request: Request | str) -> None:
        """Release every block of the request, tail first (idempotent)."""
        rid = request if isinstance(request, str) else request.request_id
        blocks = self._blocks.pop(rid, None)
        self._num_cached.pop(rid, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._blocks

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held = sum(len(v) for v in self._blocks.values())
        refs = sum(b.ref_count for b in self.pool.blocks)
        assert held == refs, (held, refs)

    def _num_blocks_needed(self, request: Request, num_new_tokens: int,
                           computed_blocks: list[KVBlock] | None) -> int | None:
        computed_blocks = computed_blocks or []
        num_held = len(self._blocks.get(request.request_id, ())) + len(computed_blocks)
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        need = max(0, self.num_blocks_for(num_computed + num_new_tokens) - num_held)
        # Hit blocks that sit idle in the free queue stop being allocatable once touched.
        num_idle_hits = sum(1 for b in computed_blocks if b.ref_count == 0)
        if need + num_idle_hits > self.pool.num_free_blocks:
            return None
        return need
