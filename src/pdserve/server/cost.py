"""Live cost: what the running cluster's devices cost, and per million tokens by kind, by the planner's rules.

A worker's price per hour is the frontend's ``--price-per-hour`` for its pool (USD per worker-hour), else
that of the hardware catalogue entry its device stands for (``WorkerInfo.hardware``; a CPU entry's price
pays for ``num_cores`` cores, so a worker on k cores costs k / num_cores of it and counts as that many
devices). Its hours are its ``uptime_s``, its busy and prefill seconds those of its latest ``Stats``.

``usage`` sums the workers and the frontend's token totals into a cumulative ``Usage``; ``window``
turns two of them into the figures between (``then=None``: since start): cost, device-hours by role,
tokens by kind and cost per million tokens by kind, apportioned by ``sim.cost.token_costs`` (the same
split as the planner; that module's docstring is the one description of it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.sim.cost import DEFAULT_CACHED_WEIGHT, prefill_time, token_costs

POOLS = {"prefill": "prefill", "decode": "decode", "both": "colocated"}  # worker role -> pool name
ROLES = tuple(POOLS)
KINDS = ("input", "cached_input", "output")  # input: computed prompt tokens; cached_input: prefix-cache hits


def parse_prices(values: list[str] | tuple[str, ...]) -> dict[str, float]:
    """``--price-per-hour`` values: ``USD`` (every worker) or ``POOL=USD`` (pool: prefill, decode,
    colocated) -> {pool or "*": USD per worker-hour}. ValueError on anything else."""
    out: dict[str, float] = {}
    for value in values:
        pool, _, price = value.rpartition("=")
        pool = pool.strip() or "*"
        if pool != "*" and pool not in POOLS.values():
            raise ValueError(f"--price-per-hour {value!r}: the pool must be one of {sorted(POOLS.values())}")
        try:
            usd = float(price)
        except ValueError:
            raise ValueError(f"--price-per-hour {value!r}: expected USD per hour, e.g. 2.5 or decode=1.8") from None
        if not (usd >= 0 and math.isfinite(usd)):
            raise ValueError(f"--price-per-hour {value!r}: the price must be a finite number >= 0")
        out[pool] = usd
    return out


@dataclass(frozen=True)
class WorkerPrice:
    price_per_hour: float  # USD per hour of this worker's device(s)
    num_devices: float  # devices in the catalogue's unit (a CPU worker: its cores / the entry's num_cores)
    source: str  # "--price-per-hour", "catalogue:<entry>" or "unknown"


def worker_price(info, prices: dict[str, float]) -> WorkerPrice:
    """The price of the worker that ``info`` (a ``WorkerInfo``) describes."""
    from pdserve.sim.hardware import load_catalogue

    hw = load_catalogue().get(info.hardware) if info.hardware else None
    devices = 1.0
    if hw is not None and hw.num_cores and info.num_cores:
        devices = info.num_cores / hw.num_cores
    pool = POOLS.get(info.role, info.role)
    if pool in prices or "*" in prices:
        return WorkerPrice(prices.get(pool, prices.get("*", 0.0)), devices, "--price-per-hour")
    if hw is None:
        return WorkerPrice(0.0, devices, "unknown")
    return WorkerPrice(hw.price_per_hour * devices, devices, f"catalogue:{hw.name}")


@dataclass(frozen=True)
class Usage:
    """Cumulative figures of the whole cluster at one moment (``time_s``: the frontend's monotonic clock)."""

    time_s: float
    cost_usd: float = 0.0
    price_per_hour: float = 0.0  # of the live workers, now
    device_hours: dict[str, float] = field(default_factory=dict)  # by role
    busy_s: dict[str, float] = field(default_factory=dict)  # by role
    prefill_busy_s: dict[str, float] = field(default_factory=dict)  # by role, prefill_time's rule applied
    tokens: dict[str, int] = field(default_factory=dict)  # by kind


def usage(conns, totals, prices: dict[str, float], time_s: float) -> Usage:
    """``conns``: the frontend client's connections (with ``info``, ``stats``, ``is_alive``); ``totals``:
    ``Metrics.totals``. A dead worker keeps what it had run up."""
    cost = price_now = 0.0
    hours = dict.fromkeys(ROLES, 0.0)
    busy = dict.fromkeys(ROLES, 0.0)
    prefill = dict.fromkeys(ROLES, 0.0)
    for conn in conns:
        info, stats = conn.info, conn.stats
        if info is None:
            continue
        price = worker_price(info, prices)
        if conn.is_alive:
            price_now += price.price_per_hour
        if stats is None:
            continue
        role = info.role if info.role in hours else "both"
        cost += price.price_per_hour * stats.uptime_s / 3600.0
        hours[role] += price.num_devices * stats.uptime_s / 3600.0
        busy[role] += stats.busy_s
        prefill[role] += prefill_time(role, stats.busy_s, stats.prefill_busy_s)
    tokens = {kind: getattr(totals, kind) for kind in KINDS}
    return Usage(time_s, cost, price_now, hours, busy, prefill, tokens)


def window(now: Usage, then: Usage | None, cached_weight: float = DEFAULT_CACHED_WEIGHT) -> dict:
    """The figures between ``then`` and ``now`` (``then`` None: since start) as plain JSON values;
    a cost per million tokens of a kind with no tokens in the window is None."""
    base = then or Usage(now.time_s)

    def delta(a: dict, b: dict) -> dict:
        return {k: max(0.0, v - b.get(k, 0)) for k, v in a.items()}

    cost = max(0.0, now.cost_usd - base.cost_usd)
    tokens = {k: int(v) for k, v in delta(now.tokens, base.tokens).items()}
    busy = sum(delta(now.busy_s, base.busy_s).values())
    prefill = sum(delta(now.prefill_busy_s, base.prefill_busy_s).values())
    per_m = token_costs(cost, min(prefill, busy), busy, tokens["cached_input"], tokens["input"], tokens["output"],
                        cached_weight)
    figures = {"input": per_m.uncached_input, "cached_input": per_m.cached_input, "output": per_m.output}
    return {
        "seconds": (now.time_s - then.time_s) if then is not None else None,
        "cost_usd": cost,
        "device_hours": delta(now.device_hours, base.device_hours),
        "busy_s": busy,
        "prefill_busy_s": min(prefill, busy),
        "input_time_share": prefill / busy if busy > 0 else None,
        "tokens": tokens,
        "cost_per_million_tokens": {k: (figures[k] if tokens[k] else None) for k in KINDS},
        "cached_weight": cached_weight,
    }
