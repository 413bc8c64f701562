"""The KV store: tiers of KV blocks beside each worker's own cache, keyed by block hash (docs/kv_store.md).

``keys`` (namespaces and keys), ``codec`` (values and their checksums), the tiers (``host``: a shared-memory
pool per host; ``disk``; ``remote``: the Redis protocol or Mooncake's store), ``tiers`` (lookups, loads and
saves across them), ``connector`` (the KV connector seam's worker side) and ``scheduler_side`` (its scheduler
side, pure).
"""
