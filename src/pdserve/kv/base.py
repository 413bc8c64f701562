"""The KV connector seam, scheduler side (pure: no torch, no sockets) and the records both sides share.

A KV connector moves KV blocks between a worker's paged cache and the outside: another worker's cache
(prefill -> decode transfer) or, later, a store tier. As in vLLM's connector, it has two sides:

- the **scheduler side** (``ExternalKV``, this module) answers, when the scheduler admits a request, how many of
  its tokens beyond the local prefix-cache hits can be loaded from outside; is told which blocks were
  allocated for them; and, when a request finishes, says whether its blocks must stay until a save is done;
- the **worker side** (``kv.connector.KVConnector``) carries the data: it starts loads and saves and reports
  them finished by request id from a non-blocking ``poll``, never blocking the engine step.

``RemotePrefill`` is the scheduler side of disaggregation: every prompt token of a request that a prefill
worker computes is "external" to its decode worker, and a prefill worker holds a finished request's blocks
until they are sent. ``kv.store.scheduler_side.StoreExternal`` is the KV store's: the prompt blocks after the
local prefix hits that the store holds are loaded, and a finished request's blocks are held until saved.
``ExternalSources`` composes several scheduler sides into the one the scheduler talks to: the first source
that claims a request's tokens loads them; every source may hold a finished request's blocks.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ConnectorCapabilities:
    """What a connector can do; everything outside kv/ asks these instead of testing a connector's name.

    ``is_target``: other workers can write into this worker's cache (a decode worker can use it);
    ``places_cache``: it allocates the worker's KV cache itself (``KVConnector.allocate_cache``, e.g. in
    shared memory); ``writes_remotely``: a sender writes straight into the target's cache, so a target must
    keep an aborted request's reserved blocks until the sender's notice or the deadline (a late write must
    never land in blocks given to another request); ``same_host_only``: both ends must share a host;
    ``layerwise``: the connector can save a layer as soon as it is computed; ``is_store``: it loads and saves
    blocks by hash (``KVConnector.start_load``, ``SaveJob.block_hashes``), a KV store."""

    is_target: bool = True
    places_cache: bool = False
    writes_remotely: bool = False
    same_host_only: bool = False
    layerwise: bool = False
    is_store: bool = False


@dataclass
class LoadDone:
    """Target side: the KV of a request arrived in its reserved blocks (``ok``) or will not (``error``).

    A remote prefill's load carries the first token the prefill worker sampled (``first_token_id``, its
    logprobs in wire form). A store load may land fewer tokens than were reserved (``num_tokens``, the leading
    ones; -1: all): the request computes the rest."""

    request_id: str
    ok: bool
    first_token_id: int = -1
    first_logprobs: list | None = None
    kv_bytes: int = 0
    error: str = ""
    num_tokens: int = -1
    seconds: float = 0.0
    finished_at: float = 0.0  # time.monotonic() when the load ended


@dataclass
class SaveDone:
    """Source side: the send of a request's KV finished (``ok``) or failed (``error``); its blocks may go."""

    request_id: str
    ok: bool
    kv_bytes: int = 0
    seconds: float = 0.0
    num_blocks: int = 0
    error: str = ""
    target_worker_id: str = ""
    finished_at: float = 0.0  # time.monotonic() when the save ended


class ExternalKV(Protocol):
    """The scheduler side of a connector. Called by ``engine.scheduler.Scheduler`` only; no I/O."""

    def has_external(self, request_id: str) -> bool:
        """Whether any of this request's tokens may come from outside (cheap; no side effects)."""

    def num_external_tokens(self, request_id: str, num_prompt_tokens: int, num_local_hit_tokens: int,
                            block_hashes: Sequence[int] = ()) -> int:
        """Tokens after the ``num_local_hit_tokens`` local prefix hits that can be loaded from outside (0:
        none, compute them here); ``block_hashes``: the request's chained block hashes (hashing.py) so far.
        No side effects on the request (a store may look its blocks up)."""

    def on_allocated(self, request_id: str, block_ids: list[int], num_local_hit_tokens: int,
                     num_external_tokens: int) -> None:
        """Blocks are allocated for the request: hits first, then the external tokens' blocks."""

    def on_load_failed(self, request_id: str) -> None:
        """The load did not happen: from now on the request is computed here (``num_external_tokens`` 0)."""

    def on_finished(self, request_id: str, block_ids: Sequence[int] = (), block_hashes: Sequence[int] = ()) -> bool:
        """The request finished. True: its blocks stay allocated until the engine's ``release_kv`` (a save is
        under way); False: free them now. ``block_ids``/``block_hashes``: its blocks whose KV is computed
        (full blocks, in order), for a source that saves them."""


class ExternalSources:
    """Several scheduler sides as one (``ExternalKV``), by name. A request's external tokens come from the
    first source (in order) that offers any; that source alone is told of the allocation and of a failed
    load. A finished request is offered to every source: its blocks stay while any of them holds them, and are
    freed when the last holder ``release``s (an abort drops only the holds that ``abortable`` names)."""

    def __init__(self, sources: dict[str, ExternalKV], abortable: Iterable[str] = ("remote",)) -> None:
        self.sources = dict(sources)
        self.abortable = set(abortable)
        self._loading: dict[str, str] = {}  # request id -> the source its load comes from
        self._holders: dict[str, set[str]] = {}
        self._offer: tuple[str, str] | None = None  # (request id, source) of the last non-zero answer

    def add(self, name: str, source: ExternalKV) -> None:
        self.sources[name] = source

    def loading_source(self, request_id: str) -> str | None:
        """The name of the source whose load the request awaits (None: none)."""
        return self._loading.get(request_id)

    def has_external(self, request_id: str) -> bool:
        return any(s.has_external(request_id) for s in self.sources.values())

    def num_external_tokens(self, request_id: str, num_prompt_tokens: int, num_local_hit_tokens: int,
                            block_hashes: Sequence[int] = ()) -> int:
        for name, source in self.sources.items():
            if source.has_external(request_id):
                n = source.num_external_tokens(request_id, num_prompt_tokens, num_local_hit_tokens, block_hashes)
                if n > 0:
                    self._offer = (request_id, name)
                    return n
        return 0

    def on_allocated(self, request_id: str, block_ids: list[int], num_local_hit_tokens: int,
                     num_external_tokens: int) -> None:
        assert self._offer is not None and self._offer[0] == request_id, "on_allocated without an offer"
        name = self._offer[1]
        self._offer = None
        self._loading[request_id] = name
        self.sources[name].on_allocated(request_id, block_ids, num_local_hit_tokens, num_external_tokens)

    def on_loaded(self, request_id: str) -> None:
        self._loading.pop(request_id, None)

    def on_load_failed(self, request_id: str) -> None:
        name = self._loading.pop(request_id, None)
        if name is not None:
            self.sources[name].on_load_failed(request_id)

    def on_finished(self, request_id: str, block_ids: Sequence[int] = (), block_hashes: Sequence[int] = ()) -> bool:
        self._loading.pop(request_id, None)
        holders = {name for name, s in self.sources.items() if s.on_finished(request_id, block_ids, block_hashes)}
        if holders:
            self._holders[request_id] = holders
        return bool(holders)

    def release(self, request_id: str, holder: str) -> bool:
        """``holder`` is done with the request's blocks; True when no source holds them any more."""
        holders = self._holders.get(request_id)
        if holders is None:
            return True
        holders.discard(holder)
        if holders:
            return False
        del self._holders[request_id]
        return True

    def on_aborted(self, request_id: str) -> bool:
        """The request is aborted: the abortable holds go; True when its blocks may be freed now."""
        self._loading.pop(request_id, None)
        holders = self._holders.get(request_id)
        if holders is None:
            return True
        holders -= self.abortable
        if holders:
            return False
        del self._holders[request_id]
        return True


class RemotePrefill:
    """Disaggregation's scheduler side. A decode worker ``expect``s a request's prompt from a prefill
    worker (its whole uncached prompt is external, once: after a failed load it is computed locally); a
    prefill worker ``hold``s a finished request's blocks until ``release_kv``."""

    def __init__(self) -> None:
        self._expected: set[str] = set()
        self._held: set[str] = set()

    def expect(self, request_id: str) -> None:
        self._expected.add(request_id)

    def hold(self, request_id: str) -> None:
        self._held.add(request_id)

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._expected.discard(rid)
            self._held.discard(rid)

    def has_external(self, request_id: str) -> bool:
        return request_id in self._expected

    def num_external_tokens(self, request_id: str, num_prompt_tokens: int, num_local_hit_tokens: int,
                            block_hashes: Sequence[int] = ()) -> int:
        return num_prompt_tokens - num_local_hit_tokens if request_id in self._expected else 0

    def on_allocated(self, request_id: str, block_ids: list[int], num_local_hit_tokens: int,
                     num_external_tokens: int) -> None:
        self._expected.discard(request_id)  # one load per request

    def on_load_failed(self, request_id: str) -> None:
        self._expected.discard(request_id)

    def on_finished(self, request_id: str, block_ids: Sequence[int] = (), block_hashes: Sequence[int] = ()) -> bool:
        self._expected.discard(request_id)
        return request_id in self._held
