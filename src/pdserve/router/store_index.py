"""The cluster-wide prefix index of the KV store: which block hashes its tiers hold, by location, as the workers
report what they stored and evicted (``KVEvents`` with a tier). Pure Python.

A location is a host name (its host-memory and disk tiers, reachable by the workers on that host) or a remote
store's URL (reachable by every worker). Each location keeps at most ``max_blocks`` hashes, the most recently
stored, so the index stays bounded when a store evicts without telling (a remote server's own LRU): a hash the
index still names but the store lost is only a miss at load time, never wrong output.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class StoreIndex:
    def __init__(self, max_blocks: int = 200_000) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self._hashes: dict[str, OrderedDict[int, None]] = {}
        self._remote: set[str] = set()

    def __len__(self) -> int:
        return sum(len(h) for h in self._hashes.values())

    def apply(self, tier: str, location: str, stored: Sequence[int], evicted: Sequence[int]) -> None:
        held = self._hashes.setdefault(location, OrderedDict())
        if tier == "remote":
            self._remote.add(location)
        for h in evicted:
            held.pop(h, None)
        for h in stored:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_blocks:
            held.popitem(last=False)

    def locations_for(self, host: str) -> list[str]:
        """Where a worker on ``host`` can load from: its host's tiers and every remote store."""
        return [loc for loc in self._hashes if loc == host or loc in self._remote]

    def num_prefix_blocks(self, block_hashes: Sequence[int], start: int, host: str) -> int:
        """How many of ``block_hashes[start:]``, from the first, a worker on ``host`` could load."""
        held = [self._hashes[loc] for loc in self.locations_for(host)]
        if not held:
            return 0
        n = 0
        for h in block_hashes[start:]:
            if not any(h in x for x in held):
                break
            n += 1
        return n
