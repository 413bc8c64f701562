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
until they are sent.
"""
from __future__ import annotations

from collections.abc import Iterable
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
    ``layerwise``: the connector can save a layer as soon as it is computed."""

    is_target: bool = True
    places_cache: bool = False
    writes_remotely: bool = False
    same_host_only: bool = False
    layerwise: bool = False


@dataclass
class LoadDone:
    """Target side: the KV of a request arrived in its reserved blocks (``ok``) or will not (``error``).

    A remote prefill's load carries the first token the prefill worker sampled (``first_token_id``, its
    logprobs in wire form)."""

    request_id: str
    ok: bool
    first_token_id: int = -1
    first_logprobs: list | None = None
    kv_bytes: int = 0
    error: str = ""


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

    def num_external_tokens(self, request_id: str, num_prompt_tokens: int, num_local_hit_tokens: int) -> int:
        """Tokens after the ``num_local_hit_tokens`` local prefix hits that can be loaded from outside (0:
        none, compute them here). No side effects."""

    def on_allocated(self, request_id: str, block_ids: list[int], num_local_hit_tokens: int,
                     num_external_tokens: int) -> None:
        """Blocks are allocated for the request: hits first, then the external tokens' blocks."""

    def on_load_failed(self, request_id: str) -> None:
        """The load did not happen: from now on the request is computed here (``num_external_tokens`` 0)."""

    def on_finished(self, request_id: str) -> bool:
        """The request finished (or was aborted). True: its blocks stay allocated until the engine's
        ``release_kv`` (a save is under way); False: free them now."""


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

    def num_external_tokens(self, request_id: str, num_prompt_tokens: int, num_local_hit_tokens: int) -> int:
        return num_prompt_tokens - num_local_hit_tokens if request_id in self._expected else 0

    def on_allocated(self, request_id: str, block_ids: list[int], num_local_hit_tokens: int,
                     num_external_tokens: int) -> None:
        self._expected.discard(request_id)  # one load per request

    def on_load_failed(self, request_id: str) -> None:
        self._expected.discard(request_id)

    def on_finished(self, request_id: str) -> bool:
        self._expected.discard(request_id)
        return request_id in self._held
