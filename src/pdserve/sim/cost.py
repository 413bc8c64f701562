"""Cost arithmetic: fleet cost per hour and per day, cost per million tokens split into cached input,
uncached input and output, and power.

How device time is apportioned (the one place; the planner's ``run_cost`` and the frontend's live cost,
``server/cost.py``, both call the functions below):

1. A step that mixes prefill chunks and decodes is split by ``step_prefill_share``: the time a step-time
   model gives its prefill part alone, over that plus its decodes alone (the simulator uses its perf
   model; a worker uses the analytic model of its hardware, ``worker/busy.py``).
2. A worker's prefill time is ``prefill_time``: all of its busy time for a prefill-role worker, else the
   prefill parts of its steps (a live worker applies it step by step, with the role it has at that step).
3. A fleet's cost over a period (every device's price times the period, idle time included) is split
   between input and output by the share of busy time that went to prefill (``input_time_share``): idle
   time is shared out in the same proportion.
4. The input share is split between cached and uncached input tokens with ``cached_weight`` (the cost of
   a cached token relative to an uncached one; default 0.1: a cache hit still costs a KV load and
   attention context, not the GEMMs). ``token_costs`` does 3 and 4.

Tokens: input tokens are the prompts of requests that produced a token, cached input the part of them
found in the serving worker's prefix cache (for a disaggregated request: the decode worker's, as the
usage object reports it), output every token generated.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CACHED_WEIGHT = 0.1


@dataclass(frozen=True)
class TokenCosts:
    """USD per million tokens."""

    cached_input: float
    uncached_input: float
    output: float
    blended: float  # total cost / all tokens (input + output)

    def to_dict(self) -> dict[str, float]:
        return {"cached_input_per_mtok": self.cached_input, "uncached_input_per_mtok": self.uncached_input,
                "output_per_mtok": self.output, "blended_per_mtok": self.blended}


def fleet_cost_usd(num_cards: float, price_per_card_hour: float, hours: float) -> float:
    return num_cards * price_per_card_hour * hours


def cost_per_million(cost_usd: float, cached_input_tokens: float, uncached_input_tokens: float,
                     output_tokens: float, input_share: float,
                     cached_weight: float = DEFAULT_CACHED_WEIGHT) -> TokenCosts:
    """Split ``cost_usd`` (``input_share`` of it to input) into USD per million tokens by kind."""
    if not 0.0 <= input_share <= 1.0:
        raise ValueError(f"input_share must be in [0, 1], got {input_share}")
    input_cost = cost_usd * input_share
    output_cost = cost_usd - input_cost
    units = cached_weight * cached_input_tokens + uncached_input_tokens
    per_unit = input_cost / units if units else 0.0
    total = cached_input_tokens + uncached_input_tokens + output_tokens
    return TokenCosts(
        cached_input=per_unit * cached_weight * 1e6,
        uncached_input=per_unit * 1e6,
        output=output_cost / output_tokens * 1e6 if output_tokens else 0.0,
        blended=cost_usd / total * 1e6 if total else 0.0,
    )


def input_time_share(prefill_busy_s: float, busy_s: float) -> float:
    """Share of a fleet's cost that goes to input: prefill busy time over all busy time (0 when idle)."""
    if prefill_busy_s < 0 or busy_s < 0:
        raise ValueError(f"busy times must be >= 0, got {prefill_busy_s} and {busy_s}")
    return min(1.0, prefill_busy_s / busy_s) if busy_s > 0 else 0.0


def prefill_time(role: str, busy_s: float, prefill_part_s: float) -> float:
    """A worker's busy time that counts as prefill: all of it on a prefill worker, else the prefill parts
    of its steps (``step_prefill_share``)."""
    return busy_s if role == "prefill" else prefill_part_s


def step_prefill_share(perf, shape) -> float:
    """Fraction of a step's time spent on its prefill tokens: ``perf`` (a ``PerfModel``) times the prefill
    part alone and the decodes alone; 1 for a step without decodes, 0 for one without prefill."""
    from pdserve.sim.perf_model import BatchShape

    if not shape.num_prefill_tokens:
        return 0.0
    if not shape.num_decode:
        return 1.0
    t_p = perf.step_time_s(BatchShape(shape.num_prefill_tokens, shape.prefill_attn, shape.prefill_kv, 0, 0, 1))
    t_d = perf.decode_step_time_s(shape.num_decode, shape.decode_ctx, shape.decode_max_ctx)
    return t_p / (t_p + t_d) if t_p + t_d > 0 else 0.0


def token_costs(cost_usd: float, prefill_busy_s: float, busy_s: float, cached_input_tokens: float,
                uncached_input_tokens: float, output_tokens: float,
                cached_weight: float = DEFAULT_CACHED_WEIGHT) -> TokenCosts:
    """USD per million tokens by kind for ``cost_usd`` spent over a period in which the fleet was busy
    ``busy_s`` device-seconds, ``prefill_busy_s`` of them on prefill (see the module docstring)."""
    return cost_per_million(cost_usd, cached_input_tokens, uncached_input_tokens, output_tokens,
                            input_time_share(prefill_busy_s, busy_s), cached_weight)


def input_share_from_throughput(input_tokens: float, input_tokens_per_s: float,
                                output_tokens: float, output_tokens_per_s: float) -> float:
    """Share of accelerator time that went to input, from per-unit prefill and decode throughputs."""
    t_in = input_tokens / input_tokens_per_s
    t_out = output_tokens / output_tokens_per_s
    return t_in / (t_in + t_out)


def run_cost(sim, duration_s: float) -> dict:
    """Cost figures of a finished simulation (the whole cluster, sampled runs scaled up)."""
    spec, rec, scale = sim.spec, sim.recorder, sim.scale
    price_h = power_w = 0.0
    cards = 0
    prefill_s = total_s = 0.0
    for name, pool in spec.pools.items():
        hw = sim.catalogue[pool.hardware]
        price_h += pool.num_cards * hw.price_per_hour
        power_w += pool.num_cards * hw.power_w
        cards += pool.num_cards
        for inst in sim.pools[name]:
            busy = inst.busy_s * pool.tp
            total_s += busy
            prefill_s += prefill_time(name, busy, inst.prefill_busy_s * pool.tp)
    input_share = input_time_share(prefill_s, total_s)
    ok_in = sum(rec.input_len[i] for i in range(len(rec.input_len)) if rec.num_tokens[i] > 0)
    cached = sum(rec.cached_tokens)
    out_tok = sum(rec.num_tokens)
    hours = duration_s / 3600.0
    cost = price_h * hours
    per_m = token_costs(cost, prefill_s, total_s, cached * scale, (ok_in - cached) * scale, out_tok * scale)
    return {"num_cards": cards, "price_per_hour": price_h, "cost_usd": cost, "power_kw_tdp": power_w / 1e3,
            "energy_kwh_tdp": power_w / 1e3 * hours, "input_time_share": input_share, **per_m.to_dict(),
            "cached_weight": DEFAULT_CACHED_WEIGHT}


# DeepSeek's published one-day figures for V3/R1 (github.com/deepseek-ai/open-infra-index,
# 202502OpenSourceWeek/day_6_one_more_thing_deepseekV3R1_inference_system_overview.md, 2025-03-01),
# for the day 2025-02-27 12:00 to 2025-02-28 12:00 (UTC+8).
DEEPSEEK_DAY = {
    "average_nodes": 226.75, "gpus_per_node": 8, "usd_per_gpu_hour": 2.0, "daily_cost_usd": 87072,
    "input_tokens": 608e9, "cached_input_tokens": 342e9, "output_tokens": 168e9,
    "prefill_tokens_per_node_s": 73.7e3, "decode_tokens_per_node_s": 14.8e3,
    "r1_price_per_mtok": {"cached_input": 0.14, "uncached_input": 0.55, "output": 2.19},
    "theoretical_revenue_usd": 562027,
}


def deepseek_day() -> dict[str, float]:
    """DeepSeek's one-day fleet cost recomputed from its published inputs, with per-token costs."""
    d = DEEPSEEK_DAY
    cost = fleet_cost_usd(d["average_nodes"] * d["gpus_per_node"], d["usd_per_gpu_hour"], 24)
    share = input_share_from_throughput(d["input_tokens"], d["prefill_tokens_per_node_s"],
                                        d["output_tokens"], d["decode_tokens_per_node_s"])
    uncached = d["input_tokens"] - d["cached_input_tokens"]
    per_m = cost_per_million(cost, d["cached_input_tokens"], uncached, d["output_tokens"], share)
    node_s_needed = (d["input_tokens"] / d["prefill_tokens_per_node_s"]
                     + d["output_tokens"] / d["decode_tokens_per_node_s"])
    prices = d["r1_price_per_mtok"]
    revenue = (d["cached_input_tokens"] * prices["cached_input"] + uncached * prices["uncached_input"]
               + d["output_tokens"] * prices["output"]) / 1e6
    return {"daily_cost_usd": cost, "input_time_share": share, "node_seconds_needed": node_s_needed,
            "node_seconds_available": d["average_nodes"] * 86400, "theoretical_revenue_usd": revenue,
            "cache_hit_rate": d["cached_input_tokens"] / d["input_tokens"], **per_m.to_dict()}
