"""Instance choice inside the simulator: the production router's policies (``pdserve.router.policies``)
run on the simulator's instances.

The policies read an instance view duck-typed: ``instance_id``, ``queue_len``, ``num_free_blocks`` and
``num_cached_prefix_blocks(block_hashes)``; ``sim.simulator.Instance`` provides them from its real
scheduler and KV manager (exact, where a live router's view lags by a stats interval). Decode placement
with ``decode_routing: least_loaded`` uses the router's ``DecodePolicy`` (room for the prompt's blocks,
then the smallest batch).
"""
from __future__ import annotations

from collections.abc import Sequence

from pdserve.router.policies import POLICIES, DecodePolicy, make_policy as _router_policy

__all__ = ["POLICIES", "Chooser", "make_chooser"]


class Chooser:
    """Index of the instance a router policy picks among ``instances``."""

    def __init__(self, name: str, decode: bool = False) -> None:
        self.name = name
        self._decode = decode and name == "least_loaded"
        self._policy = DecodePolicy() if self._decode else _router_policy(name)

    def choose(self, instances: Sequence, block_hashes: Sequence[int], num_blocks_needed: int) -> int:
        if self._decode:
            chosen = self._policy.choose(instances, num_blocks_needed)
        else:
            chosen = self._policy.choose(instances, block_hashes)
        return int(chosen)


def make_chooser(name: str, decode: bool = False) -> Chooser:
    if name not in POLICIES:
        raise ValueError(f"routing policy must be one of {POLICIES}, got {name!r}")
    return Chooser(name, decode)
