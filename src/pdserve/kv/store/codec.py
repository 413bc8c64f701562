"""A stored value: a fixed header (magic, layout version, namespace, block hash, payload length, checksum)
then one block's bytes in ``(num_layers, 2, block_size, num_kv_heads, head_dim)`` order.

The checksum is XXH3-64 of the payload (xxhash: tens of GB/s, so checking a load costs a fraction of the copy).
``unpack`` returns the payload only when every header field and the checksum match what is expected: a
corrupt, truncated, foreign or missing value is a miss (None), never data.
"""
from __future__ import annotations

import struct

import xxhash

from pdserve.kv.store.keys import LAYOUT_VERSION, Namespace, unsigned

MAGIC = b"PDKV"
HEADER = struct.Struct("<4sHHQQQQ")  # magic, version, reserved, namespace, block hash, payload bytes, checksum
HEADER_BYTES = HEADER.size


def checksum(payload) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def pack_header(ns: Namespace, block_hash: int, payload) -> bytes:
    """The header for ``payload`` (a bytes-like object of one block)."""
    n = memoryview(payload).nbytes
    return HEADER.pack(MAGIC, LAYOUT_VERSION, 0, ns.digest_int, unsigned(block_hash), n, checksum(payload))


def unpack(ns: Namespace, block_hash: int, value) -> memoryview | None:
    """The payload of a stored ``value`` (bytes-like: header + payload), or None when it is not exactly the
    block ``block_hash`` of ``ns`` with an intact checksum."""
    if value is None:
        return None
    view = memoryview(value).cast("B")
    if view.nbytes != HEADER_BYTES + ns.block_bytes:
        return None
    magic, version, _, nsd, h, n, digest = HEADER.unpack_from(view)
    if magic != MAGIC or version != LAYOUT_VERSION or nsd != ns.digest_int or h != unsigned(block_hash) \
            or n != ns.block_bytes:
        return None
    payload = view[HEADER_BYTES:]
    return payload if checksum(payload) == digest else None
