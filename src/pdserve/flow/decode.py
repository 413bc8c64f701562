"""The decode side of the hand-off: a decode worker's requests whose prompt KV a prefill worker sends.

Life of such a request: added (the engine will allocate its blocks) -> reserved (the reservation goes to the
frontend, which forwards it to the prefill worker; the KV connector expects a load) -> loaded (it joins the
running batch with its first token) or, when the prefill side fails, the load fails or the deadline passes,
computed locally. An abort while reserved on a connector that writes remotely (shm) keeps the blocks until
the sender's notice or the deadline plus ``grace_s``, so a late write never lands in reused blocks.

Pure: no sockets, no clock (``now`` is passed in), no engine; the caller carries out the actions.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.outputs import KVReservation
from pdserve.kv.base import LoadDone
from pdserve.protocol import KVReservationMsg, KVTarget


@dataclass(frozen=True)
class SendReservation:
    """Send ``reservation`` to the request's owner (the frontend) and tell the connector to expect it."""

    reservation: KVReservationMsg


@dataclass(frozen=True)
class JoinBatch:
    """The KV landed: the engine's ``finish_load`` with the first token (wire-form logprobs)."""

    request_id: str
    first_token_id: int
    first_logprobs: list | None = None


@dataclass(frozen=True)
class ComputeLocally:
    """No KV will come: the connector forgets the reservation, the engine computes the prompt (``fail_load``)."""

    request_id: str
    reason: str


@dataclass(frozen=True)
class AbortNow:
    """The request is over: the connector forgets it, the engine aborts it (its blocks are safe to free)."""

    request_id: str


DecodeAction = SendReservation | JoinBatch | ComputeLocally | AbortNow


@dataclass
class _Remote:
    reservation: KVReservationMsg | None = None
    is_aborted: bool = False  # waiting for the notice or the deadline before freeing the blocks
    fail_on_reserve: bool = False  # the prefill side gave up before the blocks were reserved


class DecodeSide:
    def __init__(self, transfer_timeout_s: float, writes_remotely: bool, grace_s: float = 2.0) -> None:
        if transfer_timeout_s <= 0:
            raise ValueError(f"transfer_timeout_s must be > 0, got {transfer_timeout_s}")
        self.transfer_timeout_s = transfer_timeout_s
        self.writes_remotely = writes_remotely
        self.grace_s = grace_s if writes_remotely else 0.0
        self._remote: dict[str, _Remote] = {}

    def __len__(self) -> int:
        return len(self._remote)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._remote

    def add(self, request_id: str) -> None:
        self._remote[request_id] = _Remote()

    def reserved(self, r: KVReservation, target: KVTarget, now: float) -> list[DecodeAction]:
        """The engine allocated the request's blocks (``EngineCore.take_reservations``)."""
        remote = self._remote.get(r.request_id)
        if remote is None:
            return []
        if remote.fail_on_reserve:
            del self._remote[r.request_id]
            return [ComputeLocally(r.request_id, "the prefill side gave up before the reservation")]
        remote.reservation = KVReservationMsg(r.request_id, list(r.block_ids), r.num_cached_tokens, target,
                                              now + self.transfer_timeout_s)
        return [SendReservation(remote.reservation)]

    def loaded(self, load: LoadDone) -> list[DecodeAction]:
        """The connector reports the request's load (already validated against its reservation)."""
        remote = self._remote.get(load.request_id)
        if remote is None or remote.reservation is None:
            return []
        del self._remote[load.request_id]
        if remote.is_aborted:
            return [AbortNow(load.request_id)]
        if not load.ok:
            return [ComputeLocally(load.request_id, load.error or "the transfer failed")]
        return [JoinBatch(load.request_id, load.first_token_id, load.first_logprobs)]

    def prefill_failed(self, request_id: str, reason: str = "") -> list[DecodeAction]:
        """The frontend says the prefill side gave up (its worker died or refused the request)."""
        remote = self._remote.get(request_id)
        if remote is None:
            return []
        if remote.reservation is None:
            remote.fail_on_reserve = True
            return []
        del self._remote[request_id]
        if remote.is_aborted:
            return [AbortNow(request_id)]
        return [ComputeLocally(request_id, reason or "the prefill side failed")]

    def abort(self, request_id: str) -> list[DecodeAction]:
        """The client is gone. Safe at once unless a remote writer may still fill the reserved blocks."""
        remote = self._remote.get(request_id)
        if remote is not None and remote.reservation is not None and self.writes_remotely:
            remote.is_aborted = True
            return []
        self._remote.pop(request_id, None)
        return [AbortNow(request_id)]

    def expire(self, now: float) -> list[DecodeAction]:
        """Reservations whose deadline (plus the grace for remote writers) has passed."""
        actions: list[DecodeAction] = []
        for rid, remote in list(self._remote.items()):
            r = remote.reservation
            if r is not None and now > r.deadline_unix_s + self.grace_s:
                actions += self.prefill_failed(rid, f"the KV did not arrive within {self.transfer_timeout_s:.0f} s")
        return actions
