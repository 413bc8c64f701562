"""Continuous batching with chunked prefill, prefix caching and preemption by recompute. Pure Python.

Each step has a token budget. Running requests are served first, in arrival order: a decode takes one
token, an unfinished (chunked) prefill takes what is left of its prompt up to the budget. Then waiting
requests are admitted in strict FCFS order while blocks, the budget and the running cap allow. When a
running request cannot get a block, the most recently admitted running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later (prefix hits make that cheap).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.outputs import EngineOutput, KVReservation, TokenLogprobs
from pdserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` starting at position ``start`` are computed this step."""

    request: Request
    start: int
    num_tokens: int
    # Whether this chunk reaches the end of the request's tokens, so the step samples after it.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    reservations: list[KVReservation] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.awaiting_kv: dict[str, Request] = {}  # decode role: reserved, KV in flight
        self.held: dict[str, Request] = {}  # prefill role: finished, blocks held for the transfer
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        """Whether ``schedule`` has anything to do (requests awaiting remote KV alone are not work)."""
        return bool(self.waiting or self.running)

    # -- intake --------------------------------------------------------------------------------------
    def add_request(self, request: Request, remote_kv: bool = False) -> None:
        """Queue a validated request. ``remote_kv``: reserve its prompt's blocks, then wait for a
        prefill worker to fill them (``complete_remote_kv``)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if remote_kv:
            request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineOutput]:
        """Stop requests wherever they are and free their blocks; unknown ids are ignored."""
        outputs = []
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            self.awaiting_kv.pop(rid, None)
            self.held.pop(rid, None)
            was_finished = request.is_finished
            request.status = RequestStatus.FINISHED_ABORTED
            self.kv.free(request)
            if not was_finished:
                outputs.append(EngineOutput(rid, [], "abort", num_prompt_tokens=request.num_prompt_tokens))
        return outputs

    def release_kv(self, request_id: str) -> None:
        """Prefill role: the transfer of a held request is over; free its blocks."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.kv.free(request)
            self.requests.pop(request_id, None)

    def complete_remote_kv(self, request_id: str, first_token_id: int) -> EngineOutput | None:
        """Decode role: the prompt's KV has arrived in the reserved blocks; join the running batch."""
        request = self.awaiting_kv.pop(request_id, None)
        if request is None:
            return None
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_blocks(request, request.num_computed_tokens)
        request.append_output_token(first_token_id)
        out = EngineOutput(request_id, [first_token_id], num_prompt_tokens=request.num_prompt_tokens,
                           num_cached_tokens=request.num_cached_tokens)
        if request.check_stop(self.max_model_len):
            self._finish(request, out)
        else:
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        return out

    def fail_remote_kv(self, request_id: str) -> None:
        """Decode role: the transfer failed; compute the prompt here instead (blocks are recomputed)."""
        request = self.awaiting_kv.pop(request_id, None)
        if request is None:
            return
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    # -- the step ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running requests, oldest first: decodes and unfinished prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            scheduled = True
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    scheduled = False
                    break
            if not scheduled:
                break
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
            budget -= num_new
            i += 1

        # 2. Waiting requests in strict arrival order.
        while self.waiting and not out.preempted_ids:
            if len(self.running) + len(self.awaiting_kv) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            if request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
                if not self._reserve_for_remote_kv(request, out):
                    break
                self.waiting.popleft()
                continue
            if budget <= 0:
                break
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, num_hit_tokens, num_new))
            budget -= num_new
        return out

    def update_from_output(self, sched: SchedulerOutput, sampled_token_ids: dict[str, int],
                           logprobs: dict[str, TokenLogprobs] | None = None) -> list[EngineOutput]:
        """Advance every scheduled request; append sampled tokens; finish and free where a stop is met.

        ``sampled_token_ids`` holds one token for each chunk that ``samples``; requests aborted while the
        step ran are skipped."""
        outputs = []
        for chunk in sched.chunks:
            request = chunk.request
            if request.is_finished or request.request_id not in self.requests:
                continue
            request.num_computed_tokens = chunk.start + chunk.num_tokens
            self.kv.cache_blocks(request, request.num_computed_tokens)
            if not chunk.samples:
                continue
            token = sampled_token_ids[request.request_id]
            request.append_output_token(token)
            out = EngineOutput(request.request_id, [token], num_prompt_tokens=request.num_prompt_tokens,
                               num_cached_tokens=request.num_cached_tokens)
            if logprobs is not None and request.request_id in logprobs:
                out.new_logprobs = [logprobs[request.request_id]]
            if request.check_stop(self.max_model_len):
                self.running.remove(request)
                self._finish(request, out)
            outputs.append(out)
        return outputs

    def check_integrity(self) -> None:
        """Assert the invariants between the queues and the KV manager (tests, after each step)."""
        self.kv.check_integrity()
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request
            assert request.num_computed_tokens <= request.num_tokens, request
        for request in self.waiting:
            assert not self.kv.has_blocks(request.request_id), request
        assert len(set(map(id, self.running))) == len(self.running)

    # -- private -------------------------------------------------------------------------------------
    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_ids.append(request.request_id)
        logger.debug("preempted %s (blocks exhausted)", request.request_id)

    def _reserve_for_remote_kv(self, request: Request, out: SchedulerOutput) -> bool:
        hits, num_hit_tokens = self.kv.get_computed_blocks(request)
        if self.kv.allocate_slots(request, request.num_prompt_tokens - num_hit_tokens, hits) is None:
            return False
        request.num_computed_tokens = num_hit_tokens
        request.num_cached_tokens = num_hit_tokens
        self.awaiting_kv[request.request_id] = request
        out.reservations.append(KVReservation(request.request_id, self.kv.block_ids(request.request_id),
                                              num_hit_tokens))
        return True

    def _finish(self, request: Request, out: EngineOutput) -> None:
        out.finish_reason = request.finish_reason
        out.stop_reason = request.stop_reason
        if request.hold_kv:
            out.kv_block_ids = self.kv.block_ids(request.request_id)
            self.held[request.request_id] = request
            return
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
