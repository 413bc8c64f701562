"""The frontend's side of the hand-off: every request in flight, from routing to its last token.

A request is admitted (``router.admission``), routed (``Router.route``: a decode worker, and a prefill worker
when its prompt is computed remotely) and sent to both at once, so the prompt computes while the decode
worker reserves blocks. The decode worker's reservation is forwarded to the prefill worker; the prefill
worker reports ``PrefillDone``; the decode worker streams every token, the first included. Whenever the
prefill side fails (refusal, failed send, death) the decode worker is told to compute the prompt itself; a
dead decode worker's requests without tokens are routed again, the others migrate (``Migrate``: the caller
submits the prompt and the tokens so far to another decode worker, and the stream goes on) or, past
``max_attempts``, end with an error. A request past its deadline is aborted everywhere and ends with a
clear error (``expire``).

Pure: the caller (``server/client.py``, ``sim/simulator.py``) carries out the actions in order; the actions
of one call are ordered (an abort of an old route goes out before the retry's requests).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.errors import DeadlineExceededError, PdserveError, WorkerDeadError
from pdserve.router.admission import Admission
from pdserve.router.path import PathChooser, PathPrediction
from pdserve.router.router import Router


_DEFAULT_CHOOSER = PathChooser()  # predicts routes' TTFT for admission when the router makes no path choice


@dataclass(frozen=True)
class AddToWorker:
    """Send the request to a worker: ``remote_kv`` (decode: reserve, then receive the prompt's KV) or
    ``hold_kv`` (prefill: compute the prompt and its first token only, hold the KV for the send)."""

    worker_id: str
    request_id: str
    remote_kv: bool = False
    hold_kv: bool = False


@dataclass(frozen=True)
class Forward:
    """Forward a decode worker's reservation to the prefill worker."""

    worker_id: str
    reservation: object


@dataclass(frozen=True)
class FailRemote:
    """Tell the decode worker that no KV will come: it computes the prompt itself."""

    worker_id: str
    request_id: str
    reason: str


@dataclass(frozen=True)
class AbortOn:
    """Abort these requests on a worker."""

    worker_id: str
    request_ids: list[str]


@dataclass(frozen=True)
class Fail:
    """End the request's stream with this error."""

    request_id: str
    error: PdserveError


@dataclass(frozen=True)
class Migrate:
    """The request's decode worker died after ``num_tokens`` tokens: submit it again (``submit`` with
    ``attempt``) with its prompt followed by those tokens, for the rest of its output, so the client's
    stream goes on where it stopped."""

    request_id: str
    num_tokens: int
    attempt: int
    deadline_s: float | None


FrontendAction = AddToWorker | Forward | FailRemote | AbortOn | Fail | Migrate


@dataclass
class Flight:
    """One request as the frontend tracks it."""

    request_id: str
    num_prompt_tokens: int
    block_hashes: Sequence[int]
    block_size: int
    decode_id: str = ""
    prefill_id: str | None = None
    num_tokens: int = 0
    is_prefill_done: bool = False
    prediction: PathPrediction | None = None  # the path choice's, when it made one
    predicted_ttft_s: float | None = None  # what admission judged it by (None: no estimate, or no objective)
    deadline_s: float | None = None  # (the caller's clock) it is aborted everywhere at this time
    attempt: int = 0  # how many times it moved to another decode worker

    @property
    def worker_ids(self) -> list[str]:
        return [w for w in (self.decode_id, self.prefill_id) if w]


@dataclass
class FrontendFlow:
    router: Router
    admission: Admission
    retry_dead_worker: bool = True  # route again a request whose decode worker died before any token
    migrate: bool = False  # ... and move one that had tokens already (``Migrate``; the caller must handle it)
    max_attempts: int = 3  # moves per request before it fails with the worker's death
    requests: dict[str, Flight] = field(default_factory=dict)
    inflight: dict[str, set[str]] = field(default_factory=dict)  # worker id -> request ids sent there

    @property
    def num_inflight(self) -> int:
        return len(self.requests)

    def submit(self, request_id: str, num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int,
               deadline_s: float | None = None, attempt: int = 0) -> list[FrontendAction]:
        """Admit and route a new request (or a migrated one: ``attempt`` > 0). Raises ``OverloadedError``
        (admission) or ``WorkerDeadError`` (no live worker can serve it); nothing is registered then."""
        return self._route(Flight(request_id, num_prompt_tokens, block_hashes, block_size, deadline_s=deadline_s,
                                  attempt=attempt))

    def expire(self, now: float) -> list[FrontendAction]:
        """Requests past their deadline: aborted on every worker, their streams end with a clear error."""
        late = [f for f in self.requests.values() if f.deadline_s is not None and now >= f.deadline_s]
        actions = self.end([f.request_id for f in late])
        return actions + [Fail(f.request_id, DeadlineExceededError(
            f"the request did not finish within its deadline ({f.num_tokens} tokens sent)")) for f in late]

    def on_reservation(self, worker_id: str, request_id: str, reservation: object) -> list[FrontendAction]:
        """A decode worker reserved blocks for the request's prompt."""
        f = self.requests.get(request_id)
        if f is None or f.prefill_id is None:
            # Gone (aborted): nobody will write into the blocks, so the decode worker may free them now.
            return [FailRemote(worker_id, request_id, "the request ended before its KV was sent")]
        if f.is_prefill_done or not self._is_alive(f.prefill_id):
            return self._fail_remote(f, "the prefill worker is gone")
        return [Forward(f.prefill_id, reservation)]

    def on_prefill_done(self, request_id: str, ok: bool, error: str = "") -> list[FrontendAction]:
        """The prefill worker sent the request's KV (``ok``) or could not."""
        f = self.requests.get(request_id)
        if f is None:
            return []
        self._prefill_over(f)
        return [] if ok else self._fail_remote(f, error or "the prefill side failed")

    def on_output(self, worker_id: str, request_id: str, num_new_tokens: int, is_finished: bool) -> bool:
        """Tokens from a worker; False when they are not the request's (a stale route): drop them."""
        f = self.requests.get(request_id)
        if f is None or f.decode_id != worker_id:
            return False
        f.num_tokens += num_new_tokens
        if is_finished:
            self._forget(f)
        return True

    def on_error(self, worker_id: str, request_id: str, error: PdserveError) -> list[FrontendAction]:
        """A worker refused the request. A refusal by its prefill worker falls back to the decode worker."""
        f = self.requests.get(request_id)
        if f is None:
            return []
        if worker_id == f.prefill_id and worker_id != f.decode_id:
            self._prefill_over(f)
            return self._fail_remote(f, str(error))
        self._forget(f)
        others = [w for w in f.worker_ids if w != worker_id]
        return [*(AbortOn(w, [request_id]) for w in others), Fail(request_id, error)]

    def on_worker_dead(self, worker_id: str) -> list[FrontendAction]:
        """The worker is gone (its process ended or it went silent): its requests fall back, are routed
        again, or end with an error. The worker stays out of routing until ``on_worker_alive``."""
        self.router.tracker.set_alive(worker_id, False)
        actions: list[FrontendAction] = []
        for rid in sorted(self.inflight.get(worker_id, ())):
            f = self.requests.get(rid)
            if f is None:
                continue
            if worker_id == f.prefill_id and worker_id != f.decode_id:
                self._prefill_over(f)
                actions += self._fail_remote(f, f"prefill worker {worker_id} died")
                continue
            self._forget(f)
            actions += [AbortOn(w, [rid]) for w in f.worker_ids if w != worker_id]
            if self.retry_dead_worker and f.num_tokens == 0:
                try:
                    actions += self._route(Flight(rid, f.num_prompt_tokens, f.block_hashes, f.block_size,
                                                  deadline_s=f.deadline_s, attempt=f.attempt))
                    continue
                except PdserveError as e:
                    actions.append(Fail(rid, e))
                    continue
            if self.migrate and f.attempt < self.max_attempts and self.router.tracker.views(("decode", "both")):
                actions.append(Migrate(rid, f.num_tokens, f.attempt + 1, f.deadline_s))
                continue
            actions.append(Fail(rid, WorkerDeadError(f"worker {worker_id} died while serving this request")))
        self.inflight.pop(worker_id, None)
        return actions

    def on_worker_alive(self, worker_id: str) -> None:
        self.router.tracker.set_alive(worker_id, True)

    def end(self, request_ids: Sequence[str]) -> list[FrontendAction]:
        """The client is gone (or a stop string ended the request here): abort it everywhere."""
        by_worker: dict[str, list[str]] = {}
        for rid in request_ids:
            f = self.requests.get(rid)
            if f is None:
                continue
            self._forget(f)
            for w in f.worker_ids:
                if self._is_alive(w):
                    by_worker.setdefault(w, []).append(rid)
        return [AbortOn(w, ids) for w, ids in by_worker.items()]

    # -- private -----------------------------------------------------------------------------------------
    def _route(self, f: Flight) -> list[FrontendAction]:
        self.admission.check(self.num_inflight)
        route = self.router.route(f.num_prompt_tokens, f.block_hashes, f.block_size)
        if route is None:
            raise WorkerDeadError("no live worker can serve requests")
        self.admission.check(self.num_inflight, len(self.inflight.get(route.decode_id, ())))
        if f.attempt == 0:  # a moved request was admitted already
            f.predicted_ttft_s = self._predicted_ttft_s(f, route)
            views = self.router.tracker.instances
            decode, prefill = views.get(route.decode_id), views.get(route.prefill_id or route.decode_id)
            self.admission.check_predicted(f.predicted_ttft_s, decode.decode_step_s if decode else 0.0,
                                           is_queued=prefill is None or prefill.queued_prefill_tokens > 0)
        f.decode_id, f.prefill_id, f.prediction = route.decode_id, route.prefill_id, route.prediction
        # its prompt joins that worker's prefill queue now, not at the worker's next stats
        self.router.tracker.note_routed(route.prefill_id or route.decode_id, f.num_prompt_tokens,
                                        f.block_hashes, f.block_size)
        self.requests[f.request_id] = f
        self._count(route.decode_id, f.request_id, add=True)
        actions: list[FrontendAction] = [AddToWorker(route.decode_id, f.request_id, remote_kv=route.is_disaggregated)]
        if route.prefill_id is not None:
            self._count(route.prefill_id, f.request_id, add=True)
            actions.append(AddToWorker(route.prefill_id, f.request_id, hold_kv=True))
        return actions

    def _predicted_ttft_s(self, f: Flight, route) -> float | None:
        """The route's predicted TTFT, from workers that have measured their steps (None: no estimate)."""
        if self.admission.ttft_slo_s is None:
            return None
        if route.prediction is not None:
            return route.prediction.ttft_s
        views = self.router.tracker.instances
        chooser = self._predictor
        decode = views[route.decode_id]
        if route.prefill_id is None:
            return chooser.local_ttft_s(f.num_prompt_tokens, f.block_hashes, f.block_size, decode) \
                if decode.prefill_token_s > 0 else None
        prefill = views[route.prefill_id]
        return chooser.remote_ttft_s(f.num_prompt_tokens, f.block_hashes, f.block_size, prefill, decode) \
            if prefill.prefill_token_s > 0 else None

    @property
    def _predictor(self) -> PathChooser:
        return self.router.path_chooser or _DEFAULT_CHOOSER

    def _fail_remote(self, f: Flight, reason: str) -> list[FrontendAction]:
        return [FailRemote(f.decode_id, f.request_id, reason)] if self._is_alive(f.decode_id) else []

    def _prefill_over(self, f: Flight) -> None:
        f.is_prefill_done = True
        if f.prefill_id:
            self._count(f.prefill_id, f.request_id, add=False)

    def _forget(self, f: Flight) -> None:
        self.requests.pop(f.request_id, None)
        for w in f.worker_ids:
            self._count(w, f.request_id, add=False)

    def _count(self, worker_id: str, request_id: str, add: bool) -> None:
        ids = self.inflight.setdefault(worker_id, set())
        if add:
            ids.add(request_id)
        else:
            ids.discard(request_id)
        view = self.router.tracker.instances.get(worker_id)
        if view is not None:
            view.num_inflight = len(ids)

    def _is_alive(self, worker_id: str) -> bool:
        view = self.router.tracker.instances.get(worker_id)
        return view is not None and view.is_alive
