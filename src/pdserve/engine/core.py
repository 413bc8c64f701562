"""EngineCore: one model, one paged KV cache, one scheduler. ``step()`` is schedule, execute, update."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.config import EngineConfig
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.outputs import EngineOutput, KVReservation, TokenLogprobs
from pdserve.engine.request import Request
from pdserve.engine.runner import ModelRunner
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.step_budget import PrefillBudget, StepCosts, StepOverhead
from pdserve.errors import InvalidRequestError, OverloadedError
from pdserve.kv.base import ExternalKV, ExternalSources, RemotePrefill
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

KVCacheAllocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class LayerSink(Protocol):
    """What the engine tells a layer-wise saver (``kv.layerwise.LayerwiseSaves``) about a step."""

    def begin_step(self, chunks: list[tuple[str, int, int, list[int]]]) -> bool:
        """The step computes these ``(request_id, start, num_tokens, block_ids)`` chunks; True: call
        ``layer_done`` after each layer of its forward pass."""

    def layer_done(self, layer: int) -> None:
        """Layer ``layer``'s KV of every chunk is written (queued, on an accelerator)."""
MAX_KV_EVENTS = 65536


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_awaiting_kv: int
    kv_usage: float
    num_blocks: int
    num_free_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    num_prompt_tokens: int  # computed (prefill) tokens since start, cache hits excluded
    num_generation_tokens: int
    num_steps: int
    queued_prefill_tokens: int = 0  # prompt (or recompute) tokens waiting or part-computed
    prefill_token_s: float = 0.0  # learned time per prefill token (0: too few steps seen)
    decode_step_s: float = 0.0  # learned time of a step of the running decodes alone
    step_target_s: float | None = None
    step_overhead_s: float = 0.0  # measured time between two forward passes of a busy engine


class EngineCore:
    """A single engine. Not thread-safe: one thread calls every method (a worker's busy loop)."""

    def __init__(self, config: EngineConfig, kv_cache_allocator: KVCacheAllocator | None = None,
                 record_kv_events: bool = False) -> None:
        from pdserve.devices import activate, resolve_backend
        from pdserve.model.loader import load_model, resolve_dtype, resolve_kv_dtype

        self.config = config
        start = time.perf_counter()
        self.backend, self.device = resolve_backend(config.model.device)  # pdserve.devices
        activate(self.backend)  # the KV data plane asks for it by the cache's device (kv/staging.py)
        self.dtype = resolve_dtype(config.model.dtype, self.backend)
        self.kv_dtype = resolve_kv_dtype(config.cache.kv_cache_dtype, self.dtype, self.backend)
        self.model, self.arch = load_model(config.model)
        self.max_model_len = min(config.model.max_model_len or self.arch.max_position_embeddings,
                                 self.arch.max_position_embeddings)
        self.block_size = config.cache.block_size
        self.kv_bytes_per_block = (self.block_size * self.arch.num_layers * 2 * self.arch.num_kv_heads
                                   * self.arch.head_dim * self.kv_dtype.itemsize)
        self.num_blocks = config.cache.num_blocks or config.cache.kv_cache_memory_bytes // self.kv_bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(f"the KV cache budget ({config.cache.kv_cache_memory_bytes} bytes) holds no "
                             f"block of {self.kv_bytes_per_block} bytes")
        shape = (self.arch.num_layers, 2, self.num_blocks, self.block_size, self.arch.num_kv_heads,
                 self.arch.head_dim)  # (layers, k|v, blocks, block_size, kv_heads, head_dim)
        _warn_if_over_memory(self.backend, self.device, self.num_blocks * self.kv_bytes_per_block)
        if kv_cache_allocator is None or not self.backend.kv_cache_in_host_memory:
            # An allocator places host caches (shared memory); a cache on an accelerator lives there.
            self.kv_cache = self.backend.allocate_kv_cache(shape, self.kv_dtype, self.device)
        else:
            self.kv_cache = kv_cache_allocator(shape, self.kv_dtype)
        kv_caches = list(self.kv_cache.unbind(0))
        self.kv = KVCacheManager(self.num_blocks, self.block_size, config.cache.enable_prefix_caching,
                                 max_events=MAX_KV_EVENTS if record_kv_events else 0)
        self.remote = RemotePrefill()  # the scheduler side of disaggregation (kv/base.py)
        # Every scheduler side of a KV connector, as one: disaggregation's first, then any added (a KV store).
        self.external = ExternalSources({"remote": self.remote})
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, external=self.external)
        self.runner = ModelRunner(self.model, kv_caches, self.block_size, self.device)
        self.step_costs = StepCosts()  # this engine's step time, learned online (engine/step_budget.py)
        self.prefill_budget = PrefillBudget()
        self.step_overhead = StepOverhead()  # time between forward passes, which every token also waits
        self._reservations: list[KVReservation] = []
        # Called with every step's SchedulerOutput before it runs (tracing: worker/trace.py); None: nothing.
        self.schedule_observer: Callable[[SchedulerOutput], None] | None = None
        # Told which requests' chunks a step computes and when each layer is written (layer-wise KV saves,
        # kv/layerwise.py: a prefill worker sends a layer while the next ones compute); None: nothing.
        self.layer_saves: LayerSink | None = None
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_steps = 0
        self.last_chunks: list = []  # the chunks of the last step (a worker meters its busy time by them)
        logger.info("engine ready in %.1fs: %s on %s (%s), KV cache %d blocks x %d tokens = %d tokens "
                    "(%.2f GiB, %s), max_model_len %d", time.perf_counter() - start, self.arch.architecture,
                    self.backend.label(self.device), str(self.dtype).removeprefix("torch."), self.num_blocks,
                    self.block_size, self.max_num_kv_tokens, self.kv_cache.numel() * self.kv_dtype.itemsize / 2**30,
                    str(self.kv_dtype).removeprefix("torch."), self.max_model_len)

    @property
    def max_num_kv_tokens(self) -> int:
        """How many tokens of KV the cache holds in all."""
        return self.num_blocks * self.block_size

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    remote_kv: bool = False, hold_kv: bool = False, arrival_time: float | None = None) -> None:
        """Validate and queue a request. Raises InvalidRequestError (nothing queued) for bad input and
        OverloadedError when the waiting queue is full."""
        params.validate()
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < self.arch.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.arch.vocab_size})",
                                      param="prompt")
        if num_prompt >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {num_prompt} tokens; this model's context is "
                                      f"{self.max_model_len} tokens, including at least one output token",
                                      param="prompt")
        if self.kv.num_blocks_for(num_prompt + 1) > self.num_blocks:
            raise InvalidRequestError(f"the prompt has {num_prompt} tokens; the KV cache holds only "
                                      f"{self.max_num_kv_tokens}", param="prompt")
        if self.scheduler.num_waiting >= self.config.scheduler.max_waiting:
            raise OverloadedError(f"{self.scheduler.num_waiting} requests are already waiting")
        room = self.max_model_len - num_prompt
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        request = Request(request_id, prompt_token_ids, params, eos_token_ids=self.arch.eos_token_ids,
                          arrival_time=arrival_time, max_tokens=max_tokens)
        self.scheduler.add_request(request)
        if remote_kv:
            self.remote.expect(request_id)
        if hold_kv:
            self.remote.hold(request_id)

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineOutput]:
        request_ids = list(request_ids)
        for rid in request_ids:
            self.runner.sampler.forget(rid)
        outputs = self.scheduler.abort_requests(request_ids)
        self.remote.forget(request_ids)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- the step ------------------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        """Schedule, execute, update. Returns the per-request deltas of this step ([] when idle)."""
        self.step_overhead.step_started(time.perf_counter())
        sched = self.scheduler.schedule()
        if self.schedule_observer is not None:
            self.schedule_observer(sched)
        self.last_chunks = sched.chunks
        self._reservations.extend(sched.reservations)
        if sched.is_empty:
            return []
        block_ids = {c.request.request_id: self.kv.block_ids(c.request.request_id) for c in sched.chunks}
        on_layer = None
        if self.layer_saves is not None and self.layer_saves.begin_step(
                [(c.request.request_id, c.start, c.num_tokens, block_ids[c.request.request_id]) for c in sched.chunks]):
            on_layer = self.layer_saves.layer_done
        start = time.perf_counter()
        tokens, logprobs = self.runner.execute(sched, block_ids, on_layer)
        execute_s = time.perf_counter() - start
        self._observe_step(sched, execute_s)
        outputs = self.scheduler.update_from_output(sched, tokens, logprobs)
        self.step_overhead.step_ended(execute_s, self.scheduler.has_unfinished_requests())
        self._num_steps += 1
        self._num_generation_tokens += len(tokens)
        self._num_prompt_tokens += sum(max(0, min(c.start + c.num_tokens, c.request.num_prompt_tokens) - c.start)
                                       for c in sched.chunks)
        for out in outputs:
            if out.finished:
                self.runner.sampler.forget(out.request_id)
        return outputs

    # -- time as a resource ----------------------------------------------------------------------------
    def set_step_target(self, target_step_s: float | None) -> None:
        """Bound the prefill tokens of a step that runs decodes so the step takes about ``target_step_s``
        (stall-free chunking; the elastic controller sets it from the TPOT objective). None: no bound."""
        if target_step_s is not None and not target_step_s > 0:
            raise ValueError(f"a step target must be > 0 s, got {target_step_s}")
        self.prefill_budget = PrefillBudget(target_step_s)
        self.scheduler.prefill_budget_fn = None if target_step_s is None else self._prefill_tokens

    def _prefill_tokens(self, num_decodes: int, decode_ctx: int, prefill_ctx: int) -> int:
        return self.prefill_budget.tokens(self.step_costs, num_decodes, decode_ctx,
                                          self.config.scheduler.max_num_batched_tokens, self.step_overhead.seconds,
                                          prefill_ctx)

    def _observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        num_decodes = decode_ctx = num_prefill = 0
        attn = 0.0
        for c in sched.chunks:
            if c.num_tokens == 1 and c.start >= c.request.num_prompt_tokens:
                num_decodes += 1
                decode_ctx += c.start + 1
            else:
                n, start = c.num_tokens, c.start
                num_prefill += n
                attn += n * start + n * (n + 1) / 2
        self.step_costs.observe(num_decodes, decode_ctx, num_prefill, attn, seconds)

    # -- KV loaded from outside, KV held for a save (the KV connector seam, kv/base.py) ------------------
    def add_external(self, name: str, source: ExternalKV) -> None:
        """Another connector's scheduler side (``kv.base.ExternalKV``), asked after disaggregation's."""
        self.external.add(name, source)

    def take_reservations(self) -> list[KVReservation]:
        """Blocks allocated for loads from outside (a remote prefill) since the last call."""
        out, self._reservations = self._reservations, []
        return out

    def finish_load(self, request_id: str, first_token_id: int | None = None,
                    first_logprobs: TokenLogprobs | None = None,
                    num_loaded_tokens: int | None = None) -> EngineOutput | None:
        """The request's KV has landed. A remote prefill's request joins the running batch with the first
        token its prefill worker sampled (and that token's logprobs, when asked for); a store load's
        continues its prefill after the ``num_loaded_tokens`` loaded (None: all reserved)."""
        request = self.scheduler.awaiting_kv.get(request_id)
        out = self.scheduler.finish_load(request_id, first_token_id, num_loaded_tokens)
        if out is None:
            return None
        if first_logprobs is not None:
            out.new_logprobs = [first_logprobs]
        if out.finished:
            self.runner.sampler.forget(request_id)
        else:
            self.runner.sampler.skip_draw(request, self.arch.vocab_size)
        return out

    def fail_load(self, request_id: str) -> None:
        """The load will not happen: compute the request here."""
        self.scheduler.fail_load(request_id)

    def release_kv(self, request_id: str, holder: str = "remote") -> None:
        """``holder``'s save of a held request is over: its blocks are freed once no source holds them."""
        if holder == "remote":
            self.remote.forget([request_id])
        if self.external.release(request_id, holder):
            self.scheduler.release_kv(request_id)

    def take_kv_events(self) -> tuple[list[int], list[int]]:
        """Block hashes stored and evicted since the last call (when built with record_kv_events)."""
        return self.kv.pool.take_events()

    def stats(self) -> EngineStats:
        s = self.scheduler
        queued = sum(r.num_tokens - r.num_computed_tokens for r in s.waiting
                     if r.request_id not in s.awaiting_kv)
        num_decodes = decode_ctx = 0
        for r in s.running:
            remaining = r.num_tokens - r.num_computed_tokens
            if remaining > 1:
                queued += remaining
            else:
                num_decodes += 1
                decode_ctx += r.num_computed_tokens + 1
        costs = self.step_costs
        measured = costs.num_observed >= self.prefill_budget.min_observed
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_awaiting_kv=len(s.awaiting_kv),
            kv_usage=self.kv.usage, num_blocks=self.num_blocks, num_free_blocks=self.kv.pool.num_free_blocks,
            prefix_query_tokens=self.kv.stats.num_query_tokens, prefix_hit_tokens=self.kv.stats.num_hit_tokens,
            num_preemptions=s.num_preemptions, num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens, num_steps=self._num_steps,
            queued_prefill_tokens=queued, prefill_token_s=costs.prefill_token_s() if measured else 0.0,
            decode_step_s=costs.predict(num_decodes, decode_ctx) if measured and num_decodes else 0.0,
            step_target_s=self.prefill_budget.target_step_s, step_overhead_s=self.step_overhead.seconds)


def _warn_if_over_memory(backend, device: torch.device, kv_bytes: int) -> None:
    """Say so when the KV cache about to be allocated is larger than the device's free memory (the
    allocation may still succeed: a host cache's pages are touched lazily)."""
    try:
        free, _ = backend.memory_info(device)
    except NotImplementedError:
        return
    if kv_bytes > free:
        logger.warning("the KV cache (%.2f GiB) is larger than %s's free memory (%.2f GiB): lower "
                       "--kv-cache-memory", kv_bytes / 2**30, backend.label(device), free / 2**30)
