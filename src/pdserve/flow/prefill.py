"""The prefill side of the hand-off: a prefill worker's requests, computed here and sent to a decode worker.

Life of such a request: added (the engine computes its prompt and samples the first token, then holds its
blocks) -> it needs both the computed prompt and the decode worker's reservation (forwarded by the
frontend; either may come first) -> the save starts (the KV connector sends the blocks and the first token)
-> the save finishes: the blocks are released and the frontend is told (``PrefillDone``). A reservation for a
request this side no longer holds is refused at once (the decode worker computes the prompt itself); a
computed prompt that gets no reservation within ``hold_timeout_s`` is released. An abort while the save
runs waits for it (the connector is reading the blocks).

Layer-wise (``stream=True``): a reservation that arrives while the prompt is still computing starts a stream
at once (``StartStream``: the layers computed so far go now, the rest as each is computed); the save that
follows the computed prompt then closes it. An abort while streaming tells the target no KV will come
(behind the layers already queued) and aborts at once.

Pure: no sockets, no clock (``now`` is passed in), no engine; the caller carries out the actions.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.kv.base import SaveDone
from pdserve.protocol import KVReservationMsg


@dataclass(frozen=True)
class StartSave:
    """Start the connector's save of the request's blocks into ``reservation``'s blocks."""

    request_id: str
    block_ids: list[int]
    reservation: KVReservationMsg
    first_token_id: int
    first_logprobs: list | None


@dataclass(frozen=True)
class StartStream:
    """Start sending the request's KV into ``reservation``'s blocks layer by layer as it is computed."""

    request_id: str
    reservation: KVReservationMsg


@dataclass(frozen=True)
class Refuse:
    """Tell the reservation's target (through the connector) that no KV will come."""

    reservation: KVReservationMsg
    reason: str


@dataclass(frozen=True)
class ReleaseBlocks:
    """The engine's ``release_kv``: the held blocks may go."""

    request_id: str


@dataclass(frozen=True)
class ReportDone:
    """Tell the request's owner (the frontend) the hand-off's outcome (``PrefillDone``)."""

    request_id: str
    ok: bool
    first_token_id: int = -1
    num_cached_tokens: int = 0
    kv_bytes: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class AbortNow:
    """The engine aborts the request (blocks freed wherever it is)."""

    request_id: str


PrefillAction = StartSave | StartStream | Refuse | ReleaseBlocks | ReportDone | AbortNow


@dataclass
class _Held:
    block_ids: list[int] | None = None  # set once the prompt is computed (the first token sampled)
    first_token_id: int = -1
    first_logprobs: list | None = None
    num_cached_tokens: int = 0
    computed_at: float = 0.0
    reservation: KVReservationMsg | None = None
    is_saving: bool = False
    is_aborted: bool = False


class PrefillSide:
    def __init__(self, hold_timeout_s: float, stream: bool = False) -> None:
        if hold_timeout_s <= 0:
            raise ValueError(f"hold_timeout_s must be > 0, got {hold_timeout_s}")
        self.hold_timeout_s = hold_timeout_s
        self.stream = stream
        self._held: dict[str, _Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def add(self, request_id: str) -> None:
        self._held[request_id] = _Held()

    def streams_on_reservation(self, request_id: str) -> bool:
        """Whether a reservation for the request now would only start its stream (its prompt is still being
        computed): the one reservation a worker may take in the middle of a step."""
        held = self._held.get(request_id)
        return self.stream and held is not None and not held.is_aborted and held.block_ids is None and \
            held.reservation is None

    def computed(self, request_id: str, block_ids: list[int], first_token_id: int, first_logprobs: list | None,
                 num_cached_tokens: int, now: float) -> list[PrefillAction]:
        """The engine finished the prompt: its first token is sampled and its blocks are held."""
        held = self._held.get(request_id)
        if held is None:
            return []
        held.block_ids, held.first_token_id, held.first_logprobs = list(block_ids), first_token_id, first_logprobs
        held.num_cached_tokens, held.computed_at = num_cached_tokens, now
        return self._maybe_save(request_id, held)

    def ended_without_output(self, request_id: str) -> None:
        """The engine ended the request without a token (aborted there): nothing is held any more."""
        self._held.pop(request_id, None)

    def reservation(self, reservation: KVReservationMsg) -> list[PrefillAction]:
        """The frontend forwarded the decode worker's reservation."""
        held = self._held.get(reservation.request_id)
        if held is None or held.is_aborted:
            return [Refuse(reservation, "the prefill worker no longer holds this request")]
        held.reservation = reservation
        if self.stream and held.block_ids is None:
            return [StartStream(reservation.request_id, reservation)]
        return self._maybe_save(reservation.request_id, held)

    def saved(self, done: SaveDone) -> list[PrefillAction]:
        """The connector finished (or failed) the request's save."""
        held = self._held.pop(done.request_id, None)
        if held is None:
            return []
        actions: list[PrefillAction] = [ReleaseBlocks(done.request_id)]
        if not held.is_aborted:
            actions.append(ReportDone(done.request_id, done.ok, held.first_token_id, held.num_cached_tokens,
                                      done.kv_bytes, done.seconds, done.error))
        return actions

    def abort(self, request_id: str) -> list[PrefillAction]:
        held = self._held.get(request_id)
        if held is None:
            return [AbortNow(request_id)]
        if held.is_saving:
            held.is_aborted = True  # released when the save is done
            return []
        del self._held[request_id]
        actions: list[PrefillAction] = []
        if held.reservation is not None:
            actions.append(Refuse(held.reservation, "aborted on the prefill worker"))
        return actions + [AbortNow(request_id)]

    def expire(self, now: float) -> list[PrefillAction]:
        """Computed prompts that waited ``hold_timeout_s`` for a reservation: released, reported failed."""
        actions: list[PrefillAction] = []
        for rid, held in list(self._held.items()):
            if held.block_ids is not None and held.reservation is None and \
                    now - held.computed_at > self.hold_timeout_s:
                del self._held[rid]
                actions += [ReleaseBlocks(rid), ReportDone(rid, False, error="no reservation arrived")]
        return actions

    def _maybe_save(self, request_id: str, held: _Held) -> list[PrefillAction]:
        if held.block_ids is None or held.reservation is None or held.is_saving:
            return []
        held.is_saving = True
        return [StartSave(request_id, held.block_ids, held.reservation, held.first_token_id, held.first_logprobs)]
