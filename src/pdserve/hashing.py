"""The one block-hash function of pdserve.

A block's hash chains its parent's hash with the block's token ids, so two requests share a block hash
exactly when they share every token up to the end of that block. The engine's prefix cache, the router's
view of each instance's cache, the KV store and the simulator all key blocks by this value.

Python's built-in ``hash`` of a tuple of ints does not depend on PYTHONHASHSEED (only str/bytes hashes
are salted), so the value is the same in every process and on every host of one Python build. It is 64
bits wide; it is the fastest chain hash available in pure Python, which matters for the simulator.
"""
from __future__ import annotations

from collections.abc import Sequence

# The parent of a request's first block: a fixed, arbitrary constant so that hashes are reproducible.
ROOT_HASH = 0x5D5E_7A11_C0FF_EE00


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra: int | None = None) -> int:
    """Hash of one full block given its parent's hash (None for the first block)."""
    parent = ROOT_HASH if parent_hash is None else parent_hash
    if extra is None:
        return hash((parent, tuple(token_ids)))
    return hash((parent, tuple(token_ids), extra))


def hash_block_tokens(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None,
                      extra: int | None = None) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block gets none)."""
    hashes: list[int] = []
    parent = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], extra)
        hashes.append(parent)
    return hashes
