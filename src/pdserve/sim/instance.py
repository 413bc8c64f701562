"""One simulated instance: a real scheduler and KV manager, the view routing policies read, and the
bookkeeping of its steps; plus ``WorkItem``, one request to simulate."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.config import SchedulerConfig
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.scheduler import Scheduler
from pdserve.sim.cluster import PoolSpec
from pdserve.sim.hardware import Hardware
from pdserve.sim.overheads import COLD_IDLE_S
from pdserve.sim.perf_model import PerfModel
from pdserve.sim.requests import SimRequest


@dataclass(frozen=True)
class WorkItem:
    """One request to simulate (a ``bench.workloads.RequestShape`` reduced)."""

    index: int
    arrival_s: float | None
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    block_size: int = 512


class Instance:
    """One engine (a tensor-parallel group of cards) as the simulator runs it."""

    def __init__(self, index: int, role: str, pool: PoolSpec, hardware: Hardware, perf: PerfModel,
                 num_blocks: int, block_size: int, enable_prefix_caching: bool, max_model_len: int) -> None:
        self.index, self.role, self.pool, self.hardware, self.perf = index, role, pool, hardware, perf
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        config = SchedulerConfig(max_num_batched_tokens=pool.max_num_batched_tokens, max_num_seqs=pool.max_num_seqs,
                                 enable_chunked_prefill=pool.enable_chunked_prefill, max_waiting=1 << 30)
        self.scheduler = Scheduler(config, self.kv, max_model_len)
        self.block_size = block_size
        self.busy = False
        self.version = 0
        self.step_start = 0.0
        self.idle_since = -float("inf")  # when the last step ended
        self.window: tuple[float, list[float], list[SimRequest]] | None = None
        self.window_limit = 8  # steps the next fast-forward window may cover
        self.link_free_s = 0.0
        self.inbox: list[tuple[str, str]] = []  # (kind, request id) messages read at the next step boundary
        self.outbox: list[str] = []  # request ids whose reservations leave when the step ends
        self.step_overhead = None  # sim.overheads.StepOverhead of this role, from a live calibration
        self.noise = None  # overheads.StepNoise: the step jitter, seeded by the simulator
        self.num_steps = 0
        self.busy_s = 0.0
        self.prefill_busy_s = 0.0

    def is_cold(self, now: float) -> bool:
        """Whether a step starting at ``now`` follows an idle spell (``overheads.COLD_IDLE_S``)."""
        return now - self.idle_since >= COLD_IDLE_S

    # -- the view routing policies read (as router.instances.InstanceView) ----------------------------
    @property
    def instance_id(self) -> str:
        return str(self.index)

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
