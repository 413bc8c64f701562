"""What a stored block is called: a namespace (model identity, dtype, cache layout, layout version) and the
block's chained hash from ``pdserve.hashing``, so two models, dtypes or layouts never share an entry."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

LAYOUT_VERSION = 1  # bump when a block's byte layout in the store changes

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Namespace:
    """The identity of every block a worker stores. ``block_shape``: one block's
    ``(num_layers, 2, block_size, num_kv_heads, head_dim)``; ``model``: what makes the weights (the checkpoint's
    path or name, its load format and a dummy seed)."""

    model: str
    dtype: str
    block_shape: tuple[int, ...]
    itemsize: int
    layout_version: int = LAYOUT_VERSION

    @property
    def block_bytes(self) -> int:
        n = self.itemsize
        for d in self.block_shape:
            n *= d
        return n

    @property
    def digest(self) -> str:
        """16 hex digits naming the namespace (in keys, file names and the shared-memory pool's name)."""
        text = f"{self.model}|{self.dtype}|{'x'.join(map(str, self.block_shape))}|v{self.layout_version}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def digest_int(self) -> int:
        return int(self.digest, 16)

    def key(self, block_hash: int) -> str:
        """The remote and disk key of a block: ``pdkv:<namespace>:<hash as 16 hex digits>``."""
        return f"pdkv:{self.digest}:{block_hash & _MASK64:016x}"


def unsigned(block_hash: int) -> int:
    """A block hash (a signed 64-bit Python hash) as an unsigned 64-bit value."""
    return block_hash & _MASK64
