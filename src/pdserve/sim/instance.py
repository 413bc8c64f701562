"""One simulated instance: a real scheduler and KV manager, the view routing policies read, and the
bookkeeping of its steps; plus ``WorkItem``, one request to simulate."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.config import SchedulerConfig
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.scheduler import Scheduler
from pdserve.flow.decode import DecodeSide
from pdserve.flow.prefill import PrefillSide
from pdserve.kv.base import RemotePrefill
from pdserve.sim.cluster import PoolSpec
from pdserve.sim.hardware import Hardware
from pdserve.sim.perf_model import PerfModel
from pdserve.sim.requests import SimRequest
from pdserve.sim.step_time import StepTime


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
        self.remote = RemotePrefill()  # the scheduler side of disaggregation, as a worker's engine has it
        self.scheduler = Scheduler(config, self.kv, max_model_len, external=self.remote)
        # The hand-off's worker sides (deadlines never pass in a simulation without failures).
        self.decode_side = DecodeSide(transfer_timeout_s=1e18, writes_remotely=False)
        self.prefill_side = PrefillSide(hold_timeout_s=1e18)
        self.kv_target = None  # protocol.KVTarget: what this instance's reservations name
        self.num_inflight = 0  # the frontend's count (the router reads the exact scheduler counts here)
        self.is_alive = True
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

    def add(self, request: SimRequest, remote_kv: bool = False, hold_kv: bool = False) -> None:
        """What a worker does with ``AddRequest``: queue it; a remote prefill's KV, or a held prefill."""
        self.scheduler.add_request(request)
        if remote_kv:
            self.remote.expect(request.request_id)
            self.decode_side.add(request.request_id)
        if hold_kv:
            self.remote.hold(request.request_id)
            self.prefill_side.add(request.request_id)

    def release_kv(self, request_id: str) -> None:
        self.scheduler.release_kv(request_id)
        self.remote.forget([request_id])

    # -- the view routing policies read (as router.instances.InstanceView) ----------------------------
    @property
    def instance_id(self) -> str:
        return f"{self.role}-{self.index}"

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


class SimTracker:
    """The router's instance tracker over simulated instances: the views are the instances themselves, whose
    counts come straight from their schedulers (a live router's lag by a stats interval is not modelled)."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        self.instances = {inst.instance_id: inst for inst in instances}

    def views(self, roles: tuple[str, ...]) -> list[Instance]:
        return [i for i in self.instances.values() if i.role in roles and i.is_alive]

    def set_alive(self, instance_id: str, is_alive: bool) -> None:
        self.instances[instance_id].is_alive = is_alive
