"""Routing policies: given live instance views and a request's block hashes, pick an instance id.

Pure functions of their inputs (RoundRobin keeps a counter), so the simulator runs the same code.
Every policy returns None only when ``instances`` is empty; ties go to the earlier instance in the list.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pdserve.router.instances import InstanceView


class RoutingPolicy(Protocol):
    name: str

    def choose(self, instances: Sequence[InstanceView], block_hashes: Sequence[int]) -> str | None:
        """The id of the instance that should compute the request's prompt; no side effects beyond the
        policy's own state (a round-robin counter)."""


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, instances: Sequence[InstanceView], block_hashes: Sequence[int]) -> str | None:
        if not instances:
            return None
        view = instances[self._next % len(instances)]
        self._next += 1
        return view.instance_id


class LeastLoaded:
    """The shortest queue (running + waiting, or the frontend's in-flight count if larger)."""

    name = "least_loaded"

    def choose(self, instances: Sequence[InstanceView], block_hashes: Sequence[int]) -> str | None:
        if not instances:
            return None
        return min(instances, key=lambda v: v.queue_len).instance_id


class PrefixAware:
    """The longest cached prefix, weighed against queue length.

    score = cached_blocks + store_weight * store_blocks - load_weight * queue_len; the highest score wins, then
    the shorter queue. ``cached_blocks``: the leading blocks in the instance's own cache; ``store_blocks``: the
    blocks after them it could load from the KV store (its host's tiers, a remote store), worth ``store_weight``
    of a cached one (a load is not free). ``load_weight`` is in blocks per queued request: with 1.0, one more
    queued request cancels one block of prefix hit. A request with no full block falls back to least loaded."""

    name = "prefix_aware"

    def __init__(self, load_weight: float = 1.0, store_weight: float = 0.5) -> None:
        if load_weight < 0 or store_weight < 0:
            raise ValueError(f"load_weight and store_weight must be >= 0, got {load_weight}, {store_weight}")
        self.load_weight = load_weight
        self.store_weight = store_weight

    def choose(self, instances: Sequence[InstanceView], block_hashes: Sequence[int]) -> str | None:
        if not instances:
            return None
        hashes = list(block_hashes)

        def score(v: InstanceView) -> tuple[float, int]:
            cached = v.num_cached_prefix_blocks(hashes)
            stored = v.num_store_blocks(hashes, cached) if self.store_weight else 0
            return cached + self.store_weight * stored - self.load_weight * v.queue_len, -v.queue_len

        return max(instances, key=score).instance_id


class DecodePolicy:
    """Decode placement: among instances with room for the prompt's blocks, the smallest running batch
    (running + awaiting KV, or in-flight), then the most free blocks; if none has room, the one with
    the most free blocks (the request waits there for blocks)."""

    name = "decode_least_loaded"

    def choose(self, instances: Sequence[InstanceView], num_blocks_needed: int) -> str | None:
        if not instances:
            return None
        fits = [v for v in instances if v.num_free_blocks >= num_blocks_needed]
        if not fits:
            return max(instances, key=lambda v: v.num_free_blocks).instance_id
        return min(fits, key=lambda v: (v.queue_len, -v.num_free_blocks)).instance_id


POLICIES = ("round_robin", "least_loaded", "prefix_aware")


def make_policy(name: str, load_weight: float = 1.0) -> RoutingPolicy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "prefix_aware":
        return PrefixAware(load_weight)
    raise ValueError(f"routing policy must be one of {POLICIES}, got {name!r}")
