"""The router: which worker computes a request's prompt and which generates its tokens."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.router.instances import InstanceTracker
from pdserve.router.path import PathChooser, PathPrediction
from pdserve.router.policies import DecodePolicy, RoutingPolicy


@dataclass(frozen=True)
class Route:
    """``prefill_id`` None: the decode (or colocated) instance computes the prompt itself. ``prediction``:
    the path choice's predicted TTFTs, when it made one."""

    decode_id: str
    prefill_id: str | None = None
    prediction: PathPrediction | None = None

    @property
    def is_disaggregated(self) -> bool:
        return self.prefill_id is not None


class Router:
    """Disaggregated when prefill and decode instances are both alive; colocated ("both") otherwise.

    Prompts shorter than ``min_remote_prefill_tokens`` skip the remote prefill: the decode instance
    computes them (a transfer would cost more than it saves). With a ``path_chooser`` (router/path.py),
    each other request goes remote or local by its predicted TTFT on each path."""

    def __init__(self, tracker: InstanceTracker, prefill_policy: RoutingPolicy,
                 decode_policy: DecodePolicy | RoutingPolicy | None = None,
                 min_remote_prefill_tokens: int = 0, path_chooser: PathChooser | None = None) -> None:
        self.tracker = tracker
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy or DecodePolicy()
        self.min_remote_prefill_tokens = min_remote_prefill_tokens
        self.path_chooser = path_chooser

    def route(self, num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int = 16) -> Route | None:
        """None when no instance can serve the request (no live worker of a needed role)."""
        prefills = self.tracker.views(("prefill",))
        decodes = self.tracker.views(("decode",))
        colocated = self.tracker.views(("both",))
        if decodes:
            num_blocks = -(-(num_prompt_tokens + 1) // block_size)
            if isinstance(self.decode_policy, DecodePolicy):
                decode_id = self.decode_policy.choose(decodes, num_blocks)
            else:  # a prefill policy used for decode placement too (the simulator's decode_routing)
                decode_id = self.decode_policy.choose(decodes, block_hashes)
            assert decode_id is not None
            if not prefills or num_prompt_tokens < self.min_remote_prefill_tokens:
                return Route(decode_id)
            prefill_id = self.prefill_policy.choose(prefills, block_hashes)
            if self.path_chooser is None:
                return Route(decode_id, prefill_id)
            views = self.tracker.instances
            p = self.path_chooser.choose(num_prompt_tokens, block_hashes, block_size, views[prefill_id],
                                         views[decode_id])
            return Route(decode_id, prefill_id if p.is_remote else None, p)
        if colocated:
            chosen = self.prefill_policy.choose(colocated, block_hashes)
            assert chosen is not None
            return Route(chosen)
        return None
