"""The router: which worker computes a request's prompt and which generates its tokens."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.router.instances import InstanceTracker
from pdserve.router.policies import DecodePolicy, RoutingPolicy


@dataclass(frozen=True)
class Route:
    """``prefill_id`` None: the decode (or colocated) instance computes the prompt itself."""

    decode_id: str
    prefill_id: str | None = None

    @property
    def is_disaggregated(self) -> bool:
        return self.prefill_id is not None


class Router:
    """Disaggregated when prefill and decode instances are both alive; colocated ("both") otherwise.

    Prompts shorter than ``min_remote_prefill_tokens`` skip the remote prefill: the decode instance
    computes them (a transfer would cost more than it saves)."""

    def __init__(self, tracker: InstanceTracker, prefill_policy: RoutingPolicy,
                 decode_policy: DecodePolicy | None = None, min_remote_prefill_tokens: int = 0) -> None:
        self.tracker = tracker
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy or DecodePolicy()
        self.min_remote_prefill_tokens = min_remote_prefill_tokens

    def route(self, num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int = 16) -> Route | None:
        """None when no instance can serve the request (no live worker of a needed role)."""
        prefills = self.tracker.views(("prefill",))
        decodes = self.tracker.views(("decode",))
        colocated = self.tracker.views(("both",))
        if decodes:
            num_blocks = -(-(num_prompt_tokens + 1) // block_size)
            decode_id = self.decode_policy.choose(decodes, num_blocks)
            assert decode_id is not None
            if prefills and num_prompt_tokens >= self.min_remote_prefill_tokens:
                return Route(decode_id, self.prefill_policy.choose(prefills, block_hashes))
            return Route(decode_id)
        if colocated:
            chosen = self.prefill_policy.choose(colocated, block_hashes)
            assert chosen is not None
            return Route(chosen)
        return None
