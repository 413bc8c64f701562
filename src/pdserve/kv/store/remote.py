"""The remote tier: a store shared by every host, behind one small interface, two backends.

- ``redis://host:port[/db]``: the Redis protocol (Redis, Valkey) through redis-py with hiredis's parser: one
  pipelined round trip per lookup (EXISTS per key), per load (MGET) and per save (SET NX per key, so two
  writers of one block keep the first). The server's own ``maxmemory`` and LRU policy are the budget
  (``pdserve up`` sets them when it starts the server).
- ``mooncake://master_host:port[?metadata=URL]``: Mooncake's store (its master service and TCP transport; the
  memory is contributed by a store client process that ``pdserve up`` starts, or by the operator's own).

A value is a ``codec`` header and one block's payload; a value that does not check is a miss. Every call has a
timeout (``timeout_s``); a failure raises ``RemoteError`` (the caller skips the tier for a while).
"""
from __future__ import annotations

import abc
import logging
import socket
from urllib.parse import parse_qs, urlparse

logger = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """The remote store did not answer, or answered with an error."""


class RemoteBackend(abc.ABC):
    name = ""

    @abc.abstractmethod
    def exists(self, keys: list[str]) -> list[bool]:
        """Whether each key is stored (one round trip)."""

    @abc.abstractmethod
    def get(self, keys: list[str]) -> list:
        """Each key's value (bytes-like) or None (one round trip)."""

    @abc.abstractmethod
    def put(self, keys: list[str], values: list[bytes]) -> int:
        """Store the values of keys not stored yet (an existing key keeps its value); return how many were sent."""

    def close(self) -> None:
        """Release connections."""


def connect(url: str, timeout_s: float) -> RemoteBackend:
    """The backend for ``url``; ValueError for a URL of no known kind, RemoteError when it cannot connect."""
    scheme = url.split("://", 1)[0]
    if "://" not in url:
        raise ValueError(f"kv_remote {url!r} names no server: give {scheme}://host:port (`pdserve up "
                         f"--kv-remote {scheme}` starts one on this host)")
    if scheme in ("redis", "rediss"):
        return RedisBackend(url, timeout_s)
    if scheme == "mooncake":
        return MooncakeBackend(url, timeout_s)
    raise ValueError(f"unknown remote KV store {url!r}: redis://host:port or mooncake://host:port")


class RedisBackend(RemoteBackend):
    name = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False)
        try:
            self.client.ping()
        except self._redis_errors as e:
            raise RemoteError(f"cannot reach {url}: {e}") from e

    def exists(self, keys: list[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return [bool(x) for x in self._run(pipe)]

    def get(self, keys: list[str]) -> list:
        try:
            return self.client.mget(keys)
        except self._redis_errors as e:
            raise RemoteError(str(e)) from e

    def put(self, keys: list[str], values: list[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for k, v in zip(keys, values):
            pipe.set(k, v, nx=True)
        self._run(pipe)
        return len(keys)

    def close(self) -> None:
        self.client.close()

    def _run(self, pipe) -> list:
        try:
            return pipe.execute()
        except self._redis_errors as e:
            raise RemoteError(str(e)) from e


class MooncakeBackend(RemoteBackend):
    """A client of Mooncake's store that contributes no memory of its own (``global_segment_size`` 0)."""

    name = "mooncake"
    LOCAL_BUFFER_BYTES = 256 * 2**20

    def __init__(self, url: str, timeout_s: float) -> None:
        from mooncake.store import MooncakeDistributedStore

        u = urlparse(url)
        if not u.hostname or not u.port:
            raise ValueError(f"kv_remote {url!r}: give mooncake://master_host:port")
        query = parse_qs(u.query)
        metadata = query.get("metadata", [f"http://{u.hostname}:{metadata_port(u.port)}/metadata"])[0]
        self.store = MooncakeDistributedStore()
        local = "127.0.0.1" if u.hostname in ("127.0.0.1", "localhost") else socket.gethostname()
        rc = self.store.setup(local, metadata, 0, self.LOCAL_BUFFER_BYTES, "tcp", "", f"{u.hostname}:{u.port}")
        if rc != 0:
            raise RemoteError(f"cannot reach Mooncake's master at {u.hostname}:{u.port} (setup returned {rc})")

    def exists(self, keys: list[str]) -> list[bool]:
        got = self.store.batch_is_exist(keys)
        if any(x < 0 for x in got):
            raise RemoteError("Mooncake's store failed a lookup")
        return [x == 1 for x in got]

    def get(self, keys: list[str]) -> list:
        return [v if v else None for v in self.store.get_batch(keys)]

    def put(self, keys: list[str], values: list[bytes]) -> int:
        rc = self.store.put_batch(keys, values)
        if rc != 0:
            raise RemoteError(f"Mooncake's store refused a put ({rc})")
        return len(keys)

    def close(self) -> None:
        self.store.close()


def metadata_port(master_port: int) -> int:
    """Where ``pdserve up`` puts the Mooncake master's HTTP metadata server: beside its RPC port."""
    return master_port + 1
