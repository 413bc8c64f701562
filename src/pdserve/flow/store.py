"""The store side of a worker: requests whose leading prompt blocks load from the KV store, and finished
requests whose blocks are being saved to it.

A load writes into the request's blocks until its ``LoadDone`` is reported, so an abort while it runs waits for
it (the blocks must not be given to another request meanwhile); then the request is aborted. A load that landed
continues the request's prefill after the loaded tokens (``Continue``); one that did not makes the request
compute them (``ComputeLocally``). A save's blocks are released when it reports (``Release``).

Pure: no sockets, no clock, no engine; the caller carries out the actions.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.kv.base import LoadDone, SaveDone


@dataclass(frozen=True)
class Continue:
    """The engine's ``finish_load`` without a first token: ``num_tokens`` leading tokens landed."""

    request_id: str
    num_tokens: int


@dataclass(frozen=True)
class ComputeLocally:
    """The engine's ``fail_load``: the request computes the tokens itself."""

    request_id: str
    reason: str


@dataclass(frozen=True)
class AbortNow:
    request_id: str


@dataclass(frozen=True)
class Release:
    """The engine's ``release_kv(request_id, "store")``."""

    request_id: str


StoreAction = Continue | ComputeLocally | AbortNow | Release


class StoreLoads:
    def __init__(self) -> None:
        self._loading: dict[str, bool] = {}  # request id -> aborted meanwhile
        self._saving: set[str] = set()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._loading

    @property
    def num_loading(self) -> int:
        return len(self._loading)

    def started(self, request_id: str) -> None:
        self._loading[request_id] = False

    def saving(self, request_id: str) -> None:
        self._saving.add(request_id)

    def loaded(self, load: LoadDone) -> list[StoreAction]:
        aborted = self._loading.pop(load.request_id, None)
        if aborted is None:
            return []
        if aborted:
            return [AbortNow(load.request_id)]
        if not load.ok:
            return [ComputeLocally(load.request_id, load.error or "the store load failed")]
        return [Continue(load.request_id, load.num_tokens)]

    def saved(self, done: SaveDone) -> list[StoreAction]:
        if done.request_id not in self._saving:
            return []
        self._saving.discard(done.request_id)
        return [Release(done.request_id)]

    def abort(self, request_id: str) -> list[StoreAction]:
        """The request is over. Safe at once unless its load is still writing."""
        if request_id in self._loading:
            self._loading[request_id] = True
            return []
        return [AbortNow(request_id)]
