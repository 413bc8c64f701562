"""One simulated instance: a real scheduler and KV manager, the view routing policies read, and the
bookkeeping of its steps; plus ``WorkItem``, one request to simulate."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.config import SchedulerConfig
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.step_budget import PrefillBudget
from pdserve.flow.decode import DecodeSide
from pdserve.flow.prefill import PrefillSide
from pdserve.kv.base import ExternalSources, RemotePrefill
from pdserve.kv.store.scheduler_side import StoreExternal, num_fitting, save_queue_bytes
from pdserve.sim.cluster import PoolSpec
from pdserve.sim.hardware import Hardware
from pdserve.sim.perf_model import BatchShape, PerfModel
from pdserve.sim.requests import SimRequest
from pdserve.sim.step_time import StepTime
from pdserve.sim.store import SimStore


@dataclass(frozen=True)
class WorkItem:
    """One request to simulate (a ``bench.workloads.RequestShape`` reduced)."""

    index: int
    arrival_s: float | None
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    block_size: int = 512
    hashed_tokens: int = 0  # tokens the hash ids describe (0: the prompt; more: the output's too)


class Instance:
    """One engine (a tensor-parallel group of cards) as the simulator runs it."""

    def __init__(self, index: int, role: str, pool: PoolSpec, hardware: Hardware, perf: PerfModel,
                 num_blocks: int, block_size: int, enable_prefix_caching: bool, max_model_len: int) -> None:
        self.index, self.role, self.pool, self.hardware, self.perf = index, role, pool, hardware, perf
        self.instance_id = f"{role}-{index}"  # stays when the elastic controller changes the role
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        config = SchedulerConfig(max_num_batched_tokens=pool.max_num_batched_tokens, max_num_seqs=pool.max_num_seqs,
                                 enable_chunked_prefill=pool.enable_chunked_prefill, max_waiting=1 << 30)
        self.remote = RemotePrefill()  # the scheduler side of disaggregation, as a worker's engine has it
        self.scheduler = Scheduler(config, self.kv, max_model_len, external=self.remote)
        # The hand-off's worker sides (deadlines never pass in a simulation without failures).
        self.decode_side = DecodeSide(transfer_timeout_s=1e18, writes_remotely=False)
        self.prefill_side = PrefillSide(hold_timeout_s=1e18)
        self.kv_target = None  # protocol.KVTarget: what this instance's reservations name
        self.num_inflight = 0  # the frontend's count (the router reads the exact scheduler counts here)
        self.is_alive = True
        self.is_parked = False
        self.cores = None  # cards do not move between instances: the elastic controller changes roles
        self.prefill_budget = PrefillBudget()  # stall-free chunking's target (the elastic controller's)
        self._prefill_token_s: float | None = None
        self.block_size = block_size
        self.busy = False
        self.version = 0
        self.step_start = 0.0
        self.idle_since = -float("inf")  # when the last step ended
        self.window: tuple[float, list[float], list[SimRequest]] | None = None
        self.window_limit = 8  # steps the next fast-forward window may cover
        self.link_free_s = 0.0
        self.inbox: list[tuple[str, object]] = []  # (kind, body) messages read at the next step boundary
        self.outbox: list = []  # reservations (protocol.KVReservationMsg) that leave when the step ends
        self.step_time = StepTime(perf)  # the simulator sets it with a live calibration's overheads, if any
        self.num_steps = 0
        self.busy_s = 0.0
        self.prefill_busy_s = 0.0
        self.prompt_tokens_computed = 0
        # The KV store (sim/store.py; None: no store): the live scheduler side beside disaggregation's.
        self.store: SimStore | None = None
        self.store_side: StoreExternal | None = None
        self.sources: ExternalSources | None = None
        self.host = 0
        self.store_gbs: dict[str, float] = {}  # per tier, this instance's cards together
        self.load_free_s = 0.0  # loads, then saves, one after the other on the instance's links
        self.save_free_s = 0.0
        self.save_queued_bytes = 0

    def attach_store(self, store: SimStore, host: int, gbs: dict[str, float]) -> None:
        """Use the store's tiers on ``host`` as a worker's engine does (``WorkerStore``: the store's
        scheduler side asked after disaggregation's)."""
        self.store, self.host, self.store_gbs = store, host, gbs
        self.store_side = StoreExternal(self.block_size, lambda hashes: store.lookup(host, hashes), self._num_savable)
        self.sources = ExternalSources({"remote": self.remote, "store": self.store_side})
        self.scheduler.external = self.sources

    def _num_savable(self, num_blocks: int) -> int:
        """How many leading blocks of the save fit the instance's save queue now (``kv_save_queue``); the
        rest are dropped."""
        limit = save_queue_bytes(self.store.spec.save_queue_bytes, self.kv.num_blocks * self.store.block_bytes)
        n = num_fitting(num_blocks, limit, self.save_queued_bytes, self.store.block_bytes)
        if n < num_blocks:
            self.store.dropped_saves += 1
        return n

    def store_seconds(self, blocks_per_tier: dict[str, int]) -> float:
        """Seconds to move these blocks over the tiers' links, one tier after the other."""
        nbytes = self.store.block_bytes
        return sum(n * nbytes / (self.store_gbs[t] * 1e9) for t, n in blocks_per_tier.items() if n)

    def add(self, request: SimRequest, remote_kv: bool = False, hold_kv: bool = False) -> None:
        """What a worker does with ``AddRequest``: queue it; a remote prefill's KV, or a held prefill."""
        self.scheduler.add_request(request)
        if remote_kv:
            self.remote.expect(request.request_id)
            self.decode_side.add(request.request_id)
        if hold_kv:
            self.remote.hold(request.request_id)
            self.prefill_side.add(request.request_id)

    def release_kv(self, request_id: str, holder: str = "remote") -> None:
        """``holder`` (the prefill hand-off, or the store's save) is done with a finished request's blocks;
        they are freed when no one else holds them (``EngineCore.release_kv``)."""
        if holder == "remote":
            self.remote.forget([request_id])
        if self.sources is None or self.sources.release(request_id, holder):
            self.scheduler.release_kv(request_id)

    def set_step_target(self, target_step_s: float | None) -> None:
        """Bound the prefill tokens of steps with decodes (as ``EngineCore.set_step_target``), predicting
        step times with the instance's own performance model."""
        self.prefill_budget = PrefillBudget(target_step_s)
        self.scheduler.prefill_budget_fn = None if target_step_s is None else self._prefill_tokens

    def _prefill_tokens(self, num_decodes: int, decode_ctx: int, prefill_ctx: int) -> int:
        """As the live engine's, at one cost per prompt token (a 512-token prompt's mean: the chunk's context
        ``prefill_ctx`` is not modelled here)."""
        decode_s = self.perf.decode_step_time_s(num_decodes, decode_ctx) if num_decodes else 0.0
        return self.prefill_budget.tokens_for(decode_s, self.prefill_token_s, self.pool.max_num_batched_tokens)

    # -- the view routing policies and path choice read (as router.instances.InstanceView) --------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def step_target_s(self) -> float | None:
        return self.prefill_budget.target_step_s

    @property
    def max_step_tokens(self) -> int:
        return self.pool.max_num_batched_tokens

    @property
    def prefill_token_s(self) -> float:
        """Seconds per prompt token of a 512-token prompt alone (the model's, computed once)."""
        if self._prefill_token_s is None:
            n = 512
            self._prefill_token_s = self.perf.step_time_s(BatchShape(n, n * (n + 1) / 2, n, 0, 0, 1)) / n
        return self._prefill_token_s

    @property
    def queued_prefill_tokens(self) -> int:
        s = self.scheduler
        queued = sum(r.num_tokens - r.num_computed_tokens for r in s.waiting if r.request_id not in s.awaiting_kv)
        return queued + sum(r.num_tokens - r.num_computed_tokens for r in s.running
                            if r.num_tokens - r.num_computed_tokens > 1)

    @property
    def decode_step_s(self) -> float:
        decodes = [r for r in self.scheduler.running if r.num_tokens - r.num_computed_tokens == 1]
        if not decodes:
            return 0.0
        return self.perf.decode_step_time_s(len(decodes), sum(r.num_computed_tokens + 1 for r in decodes))

    @property
    def queue_len(self) -> int:
        s = self.scheduler
        return len(s.running) + len(s.waiting) + len(s.awaiting_kv)

    @property
    def num_free_blocks(self) -> int:
        return self.kv.pool.num_free_blocks

    def num_cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        pool = self.kv.pool
        n = 0
        for h in block_hashes:
            if pool.get_cached_block(h) is None:
                break
            n += 1
        return n

    def num_store_blocks(self, block_hashes: Sequence[int], start: int) -> int:
        """Blocks after the first ``start`` that this instance could load from the store's tiers (exact: the
        live router's index lags by the workers' event interval)."""
        if self.store is None:
            return 0
        return self.store.peek(self.host, block_hashes, start)


class SimTracker:
    """The router's instance tracker over simulated instances: the views are the instances themselves, whose
    counts come straight from their schedulers (a live router's lag by a stats interval is not modelled)."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        self.instances = {inst.instance_id: inst for inst in instances}

    def views(self, roles: tuple[str, ...]) -> list[Instance]:
        return [i for i in self.instances.values() if i.role in roles and i.is_alive and not i.is_parked]

    def note_routed(self, instance_id: str, num_prompt_tokens: int, block_hashes: list[int],
                    block_size: int) -> None:
        """Nothing to do: a simulated instance's queue is its scheduler's own (requests still on their way
        to it, the simulated admission delay, are not counted)."""

    def set_alive(self, instance_id: str, is_alive: bool) -> None:
        self.instances[instance_id].is_alive = is_alive
