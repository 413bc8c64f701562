"""Continuous batching with chunked prefill, prefix caching and preemption by recompute. Pure Python.

Each step has a token budget, and optionally a smaller budget for its prefill tokens (``prefill_budget_fn``,
set from the decodes it runs beside: stall-free chunking, engine/step_budget.py). Running requests are
served first, in arrival order: a decode takes one token, an unfinished (chunked) prefill takes what is
left of its prompt up to the budgets. Then waiting
requests are admitted in strict FCFS order while blocks, the budget and the running cap allow. When a
running request cannot get a block, the most recently admitted running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later (prefix hits make that cheap).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.outputs import EngineOutput, KVReservation, TokenLogprobs
from pdserve.engine.request import Request, RequestStatus
from pdserve.kv.base import ExternalKV, ExternalSources

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
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 external: ExternalKV | None = None) -> None:
        """``external``: the scheduler side of a KV connector (``kv.base``): which tokens of a request
        are loaded from outside instead of computed, and which finished requests keep their blocks."""
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.external = external
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.awaiting_kv: dict[str, Request] = {}  # blocks allocated, KV being loaded from outside
        self.held: dict[str, Request] = {}  # finished, blocks kept until released (a save under way)
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._num_after_load: dict[str, int] = {}  # awaiting requests: computed tokens once loaded
        # (num_decodes, decode_ctx, prefill_ctx: the first chunk's computed prompt tokens) -> the prefill tokens
        # this step may carry (engine/step_budget.py); None: the step's token budget alone.
        self.prefill_budget_fn: Callable[[int, int, int], int] | None = None

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
    def add_request(self, request: Request) -> None:
        """Queue a validated request (FCFS)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
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
            self._num_after_load.pop(rid, None)
            was_held = self.held.pop(rid, None) is not None
            if was_held and isinstance(self.external, ExternalSources) and not self.external.on_aborted(rid):
                self.held[rid] = request  # another holder (a store save) still reads its blocks
                self.requests[rid] = request
                continue
            if not was_held and isinstance(self.external, ExternalSources):
                self.external.on_aborted(rid)
            was_finished = request.is_finished
            request.status = RequestStatus.FINISHED_ABORTED
            self.kv.free(request)
            if not was_finished:
                outputs.append(EngineOutput(rid, [], "abort", num_prompt_tokens=request.num_prompt_tokens))
        return outputs

    def release_kv(self, request_id: str) -> None:
        """A held request's save is over; free its blocks."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.kv.free(request)
            self.requests.pop(request_id, None)

    def finish_load(self, request_id: str, first_token_id: int | None = None,
                    num_loaded_tokens: int | None = None) -> EngineOutput | None:
        """The request's external KV has landed in its blocks. With ``first_token_id`` (a remote prefill:
        the whole prompt arrived with its first token) the request joins the running batch as a decode and
        the output carries that token; without (a store load), it continues its prefill after the loaded tokens
        (``num_loaded_tokens`` of the reserved ones, the leading ones, when fewer than all landed).
        None when the request is not awaiting a load (aborted meanwhile)."""
        request = self.awaiting_kv.pop(request_id, None)
        if request is None:
            return None
        num_after_load = self._num_after_load.pop(request_id)
        if num_loaded_tokens is not None and first_token_id is None:
            num_after_load = min(num_after_load, request.num_computed_tokens + max(0, num_loaded_tokens))
        request.num_computed_tokens = num_after_load
        self.kv.cache_blocks(request, request.num_computed_tokens)
        request.status = RequestStatus.RUNNING
        if isinstance(self.external, ExternalSources):
            self.external.on_loaded(request_id)
        if first_token_id is None:
            request.num_cached_tokens = request.num_computed_tokens  # loaded, not computed here
            self.running.append(request)
            return None
        assert request.num_computed_tokens == request.num_tokens, request
        request.append_output_token(first_token_id)
        out = EngineOutput(request_id, [first_token_id], num_prompt_tokens=request.num_prompt_tokens,
                           num_cached_tokens=request.num_cached_tokens)
        if request.check_stop(self.max_model_len):
            self._finish(request, out)
        else:
            self.running.append(request)
        return out

    def fail_load(self, request_id: str) -> None:
        """The load failed: compute the request here instead (its blocks are freed and recomputed)."""
        request = self.awaiting_kv.pop(request_id, None)
        if request is None:
            return
        self._num_after_load.pop(request_id, None)
        if self.external is not None:
            self.external.on_load_failed(request_id)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    # -- the step ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        prefill_left = budget if self.prefill_budget_fn is None else self._prefill_budget(budget)

        # 1. Running requests, oldest first: decodes and unfinished prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if request.num_tokens - request.num_computed_tokens > 1:  # a chunked prefill (or recompute)
                num_new = min(num_new, prefill_left)
                if num_new <= 0:
                    i += 1
                    continue
                prefill_left -= num_new
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
        external = self.external
        while self.waiting and not out.preempted_ids:
            if len(self.running) + len(self.awaiting_kv) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            may_load = external is not None and external.has_external(request.request_id)
            if (budget <= 0 or prefill_left <= 0) and not may_load:
                break
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            if may_load:
                num_external = external.num_external_tokens(request.request_id, request.num_prompt_tokens,
                                                            num_hit_tokens, request.block_hashes)
                if num_external > 0:  # loading costs no step budget: allocate and wait for the data
                    if not self._reserve_for_load(request, hits, num_hit_tokens, num_external, out):
                        break
                    self.waiting.popleft()
                    continue
                if budget <= 0 or prefill_left <= 0:
                    break
            num_new = request.num_tokens - num_hit_tokens
            if num_new > min(budget, prefill_left) and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget, prefill_left)
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
            prefill_left -= num_new
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

    def commit_decode_steps(self, requests: list[Request], num_steps: int, token_id: int) -> None:
        """Advance running ``requests`` by ``num_steps`` decode steps at once, each sampling ``token_id``: the
        state that as many ``schedule`` + ``update_from_output`` calls would leave (the same tokens, computed
        counts and number of blocks; block ids may differ), for a caller that has checked that only these
        decodes run, none stops within the steps and the free blocks suffice (the simulator's fast-forward).
        AssertionError when the blocks do not suffice."""
        for request in requests:
            assert request.num_tokens - request.num_computed_tokens == 1, request
            assert self.kv.allocate_slots(request, num_steps) is not None, "decode steps without blocks"
            request.num_computed_tokens += num_steps
            request.append_output_tokens([token_id] * num_steps)
            self.kv.cache_blocks(request, request.num_computed_tokens)

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
    def _prefill_budget(self, budget: int) -> int:
        """``prefill_budget_fn``'s bound, for the running decodes and the prompt whose chunk comes first (a
        running, part-computed one: its computed tokens are the chunk's context; else a new one: none)."""
        num_decodes = decode_ctx = 0
        prefill_ctx = None
        for r in self.running:
            if r.num_tokens - r.num_computed_tokens == 1:
                num_decodes += 1
                decode_ctx += r.num_computed_tokens + 1
            elif prefill_ctx is None:
                prefill_ctx = r.num_computed_tokens
        return min(budget, self.prefill_budget_fn(num_decodes, decode_ctx, prefill_ctx or 0))

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_ids.append(request.request_id)
        logger.debug("preempted %s (blocks exhausted)", request.request_id)

    def _reserve_for_load(self, request: Request, hits: list, num_hit_tokens: int, num_external: int,
                          out: SchedulerOutput) -> bool:
        if self.kv.allocate_slots(request, num_external, hits) is None:
            return False
        request.num_computed_tokens = num_hit_tokens
        request.num_cached_tokens = num_hit_tokens
        request.status = RequestStatus.WAITING_FOR_KV
        self.awaiting_kv[request.request_id] = request
        self._num_after_load[request.request_id] = num_hit_tokens + num_external
        block_ids = self.kv.block_ids(request.request_id)
        self.external.on_allocated(request.request_id, block_ids, num_hit_tokens, num_external)
        out.reservations.append(KVReservation(request.request_id, block_ids, num_hit_tokens, num_external))
        return True

    def _finish(self, request: Request, out: EngineOutput) -> None:
        out.finish_reason = request.finish_reason
        out.stop_reason = request.stop_reason
        block_ids = self.kv.block_ids(request.request_id)
        num_full = min(request.num_computed_tokens // self.kv.block_size, len(block_ids))
        hashes = request.update_block_hashes(self.kv.block_size)[:num_full]
        if self.external is not None and self.external.on_finished(request.request_id, block_ids[:len(hashes)],
                                                                   hashes):
            out.kv_block_ids = block_ids
            self.held[request.request_id] = request
            return
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
