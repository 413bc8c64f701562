"""Instances as the router sees them: counters from workers' stats, cached blocks from their KV events,
and the requests the frontend itself has in flight there. Pure Python."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.router.store_index import StoreIndex


@dataclass
class InstanceView:
    """One worker as the router sees it. ``num_inflight`` is counted by the frontend (sent, not yet
    finished), so it is fresher than the worker's own counters, which lag by a stats interval."""

    instance_id: str
    role: str  # "prefill" | "decode" | "both"
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_awaiting_kv: int = 0
    num_inflight: int = 0
    block_size: int = 16
    is_alive: bool = True
    cached_block_hashes: set[int] = field(default_factory=set)
    # For path choice (router/path.py), from the worker's stats: its measured step costs and queue.
    queued_prefill_tokens: int = 0
    prefill_token_s: float = 0.0  # 0: not measured yet
    decode_step_s: float = 0.0  # its current decode batch's step, predicted
    step_target_s: float | None = None  # stall-free chunking's target (None: no bound)
    max_step_tokens: int = 2048
    cores: tuple[int, ...] | None = None  # () parked: no work is routed to it; None: not reported
    host: str = ""  # where it runs: which KV store tiers it reaches (its host's, and every remote one)
    store: StoreIndex | None = None  # the cluster-wide KV store index (None: no store)

    @property
    def is_parked(self) -> bool:
        return self.cores == ()

    @property
    def queue_len(self) -> int:
        """Work ahead of a new request: the larger of the worker's own count and the frontend's."""
        return max(self.num_running + self.num_waiting + self.num_awaiting_kv, self.num_inflight)

    def num_cached_prefix_blocks(self, block_hashes: list[int]) -> int:
        """Leading blocks of a request this instance holds in its prefix cache (chained hashes: the first
        miss ends the prefix)."""
        n = 0
        for h in block_hashes:
            if h not in self.cached_block_hashes:
                break
            n += 1
        return n

    def num_store_blocks(self, block_hashes: list[int], start: int) -> int:
        """Blocks after the first ``start`` of a request that this instance could load from the KV store."""
        if self.store is None:
            return 0
        return self.store.num_prefix_blocks(block_hashes, start, self.host)


def uncached_tokens(num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int, view) -> int:
    """Prompt tokens the instance must compute (at least one: its logits give the first token). ``view``: an
    ``InstanceView``, or anything with its ``num_cached_prefix_blocks`` (the simulator's instances)."""
    cached = view.num_cached_prefix_blocks(list(block_hashes)) * block_size
    return max(1, num_prompt_tokens - cached)


class InstanceTracker:
    """Keeps ``InstanceView``s up to date from stats and KV events. Not thread-safe."""

    def __init__(self, store: StoreIndex | None = None) -> None:
        self.instances: dict[str, InstanceView] = {}
        self.store = store if store is not None else StoreIndex()

    def add(self, view: InstanceView) -> None:
        view.store = self.store
        self.instances[view.instance_id] = view

    def apply_store_events(self, tier: str, location: str, stored: list[int], evicted: list[int]) -> None:
        """A worker stored (evicted) blocks in a KV store tier at ``location`` (router/store_index.py)."""
        self.store.apply(tier, location, stored, evicted)

    def remove(self, instance_id: str) -> None:
        self.instances.pop(instance_id, None)

    def note_routed(self, instance_id: str, num_prompt_tokens: int, block_hashes: list[int],
                    block_size: int) -> None:
        """A request was routed to compute its prompt on this instance: its uncached tokens count in the
        instance's prefill queue until the worker's next stats (which count it themselves), so a burst of
        requests between two stats does not see one queue."""
        view = self.instances.get(instance_id)
        if view is not None:
            view.queued_prefill_tokens += uncached_tokens(num_prompt_tokens, block_hashes, block_size, view)

    def update_stats(self, instance_id: str, *, num_blocks: int, num_free_blocks: int, num_running: int,
                     num_waiting: int, num_awaiting_kv: int = 0, **path_fields) -> None:
        """Counters from a worker's stats; ``path_fields``: the ``InstanceView`` fields path choice reads."""
        view = self.instances.get(instance_id)
        if view is None:
            return
        view.num_blocks, view.num_free_blocks = num_blocks, num_free_blocks
        view.num_running, view.num_waiting, view.num_awaiting_kv = num_running, num_waiting, num_awaiting_kv
        for name, value in path_fields.items():
            setattr(view, name, value)

    def apply_kv_events(self, instance_id: str, stored: list[int], evicted: list[int]) -> None:
        view = self.instances.get(instance_id)
        if view is None:
            return
        view.cached_block_hashes.difference_update(evicted)
        view.cached_block_hashes.update(stored)

    def set_alive(self, instance_id: str, is_alive: bool) -> None:
        view = self.instances.get(instance_id)
        if view is not None:
            view.is_alive = is_alive
            if not is_alive:
                view.cached_block_hashes.clear()

    def views(self, roles: tuple[str, ...]) -> list[InstanceView]:
        """Live, unparked instances of these roles, in the order they were added."""
        return [v for v in self.instances.values() if v.role in roles and v.is_alive and not v.is_parked]
