"""Mixture-of-experts arithmetic for the performance model: how a step's tokens spread over experts and
expert-parallel ranks, and what the expert-parallel all-to-alls carry.

Routing is taken as uniform over experts, with ``imbalance`` (>= 1) the busiest rank's share of routed
token copies over the mean (1.0: perfectly balanced; DeepSeek's EPLB reports its production balance as
a ratio of this kind). The busiest rank decides the step, since every MoE layer ends in a combine that
waits for all ranks. Every function conserves tokens: the per-rank loads sum to tokens x top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.sim.models import ModelSpec

DISPATCH_BYTES = 1.0  # FP8 dispatch (DeepEP's, DeepSeek-V3's layout)
COMBINE_BYTES = 2.0  # BF16 combine


@dataclass(frozen=True)
class ExpertLoad:
    """One MoE layer of one step on the busiest expert-parallel rank."""

    assignments: float  # routed token copies the rank computes
    touched: float  # distinct experts of the rank those copies hit (expected)

    @property
    def tokens_per_expert(self) -> float:
        return self.assignments / self.touched if self.touched else 0.0


def rank_loads(num_tokens: float, model: ModelSpec, ep: int, imbalance: float = 1.0) -> list[float]:
    """Routed token copies per rank: the busiest ``imbalance`` x the mean (capped at every copy the rank
    could take), the rest shared evenly; the loads sum to ``num_tokens`` x top-k."""
    if not model.is_moe:
        raise ValueError(f"{model.name} has no experts")
    if ep < 1 or imbalance < 1.0:
        raise ValueError(f"ep must be >= 1 and imbalance >= 1, got {ep} and {imbalance}")
    total = num_tokens * model.num_experts_per_token
    if ep == 1:
        return [total]
    per_rank_experts = model.num_experts / ep
    busiest = min(total / ep * imbalance, num_tokens * min(model.num_experts_per_token, per_rank_experts), total)
    rest = (total - busiest) / (ep - 1)
    return [busiest] + [rest] * (ep - 1)


def busiest_rank(num_tokens: float, model: ModelSpec, ep: int, imbalance: float = 1.0) -> ExpertLoad:
    """The busiest rank's load, and the distinct experts it touches: E_r (1 - (1 - 1/E_r)^a) for a
    copies spread uniformly over its E_r experts."""
    a = rank_loads(num_tokens, model, ep, imbalance)[0]
    e_r = model.num_experts / ep
    touched = e_r * (1.0 - (1.0 - 1.0 / e_r) ** a) if e_r > 1 else min(1.0, a)
    return ExpertLoad(a, max(touched, min(1.0, a)))


def all_to_all_bytes(tokens_per_rank: float, model: ModelSpec, dispatch_bytes: float = DISPATCH_BYTES,
                     combine_bytes: float = COMBINE_BYTES) -> tuple[float, float]:
    """(dispatch, combine) bytes one rank sends per MoE layer: every routed copy of its tokens, a hidden
    vector each, FP8 out and BF16 back (DeepEP's accounting; under uniform routing (ep - 1)/ep of them
    cross to other ranks)."""
    copies = tokens_per_rank * model.num_experts_per_token
    return copies * model.hidden_size * dispatch_bytes, copies * model.hidden_size * combine_bytes


def ep_options(model: ModelSpec, max_cards: int) -> list[int]:
    """Expert-parallel degrees the planner may try: powers of two from 2 that divide the expert count,
    up to ``max_cards`` (one expert per rank at most)."""
    if not model.is_moe:
        return []
    out, ep = [], 2
    while ep <= min(max_cards, model.num_experts):
        if model.num_experts % ep == 0:
            out.append(ep)
        ep *= 2
    return out


@dataclass(frozen=True)
class Layout:
    """How one MoE instance's ``cards`` split the model: experts over all of them (EP = cards),
    attention and dense layers tensor-parallel over ``attn_tp`` cards, in cards / attn_tp data-parallel
    groups (TP x EP x DP; ``AnalyticPerfModel(..., tp=cards, parallelism="ep", attn_tp=...)``)."""

    cards: int
    attn_tp: int

    @property
    def ep(self) -> int:
        return self.cards

    @property
    def dp(self) -> int:
        return self.cards // self.attn_tp


def layouts(model: ModelSpec, hardware, precision: str, max_cards: int, block_size: int = 16) -> list[Layout]:
    """Every TP x EP x DP layout of at most ``max_cards`` cards whose weights leave room for KV: EP a
    power of two dividing the expert count, attention TP a power of two up to one node dividing it."""
    from pdserve.sim.kv_sizing import instance_kv_blocks

    out = []
    for cards in ep_options(model, max_cards):
        attn_tp = 1
        while attn_tp <= min(cards, hardware.node_size):
            try:
                instance_kv_blocks(model, hardware, cards, precision, block_size, parallelism="ep", attn_tp=attn_tp)
            except ValueError:
                pass  # does not fit: not a layout
            else:
                out.append(Layout(cards, attn_tp))
            attn_tp *= 2
    return out
