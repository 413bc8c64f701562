"""Live cost: what the running cluster's devices cost, and per million tokens by kind, by the planner's rules.

A worker's price per hour is the frontend's ``--price-per-hour`` for its pool (USD per worker-hour, for
its ``uptime_s``), else that of the hardware catalogue entry its device stands for (``WorkerInfo.hardware``).
A CPU entry's price pays for ``num_cores`` cores: a CPU worker pays for its core-seconds (``Stats.core_s``,
its cores over time: the elastic controller moves cores between workers, and a parked worker holds none),
so a worker on k cores costs k / num_cores of the entry and counts as that many devices. An accelerator's
worker pays for its uptime. Its busy and prefill seconds are those of its latest ``Stats``.

``usage`` sums the workers and the frontend's token totals into a cumulative ``Usage``; ``window``
turns two of them into the figures between (``then=None``: since start): cost, device-hours by role,
tokens by kind and cost per million tokens by kind, apportioned by ``sim.cost.token_costs`` (the same
split as the planner; that module's docstring is the one description of it).

``planned`` reads the planner's predicted figures for the running layout (a cluster file's ``predicted:``,
as ``pdserve plan`` writes it) into the same kinds, so that they sit beside the live ones. The planner's
figures are at its predicted goodput (the rate its unit sustains under the objectives); the live ones are
at the load the cluster has, so an idle cluster costs more per token than planned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.sim.cost import DEFAULT_CACHED_WEIGHT, token_costs

POOLS = {"prefill": "prefill", "decode": "decode", "both": "colocated"}  # worker role -> pool name
ROLES = tuple(POOLS)
KINDS = ("input", "cached_input", "output")  # input: computed prompt tokens; cached_input: prefix-cache hits


PLANNED_KINDS = {"input": "uncached_input_per_mtok", "cached_input": "cached_input_per_mtok",
                 "output": "output_per_mtok", "blended": "blended_per_mtok"}  # our kind -> the planner's key


def planned(predicted: dict) -> dict:
    """The planner's figures (``predicted:`` of a cluster file) as {"cost_per_million_tokens": {kind: USD},
    "price_per_hour", "goodput_rps", "planned_by"}; ValueError naming what is malformed."""
    if not isinstance(predicted, dict):
        raise ValueError(f"the planned figures must be a mapping, got {type(predicted).__name__}")
    per_m = predicted.get("cost_per_mtok") or {}
    if not isinstance(per_m, dict):
        raise ValueError("the planned figures' cost_per_mtok must be a mapping of kind to USD")
    out = {"cost_per_million_tokens": {kind: _usd(per_m.get(key), f"cost_per_mtok.{key}")
                                       for kind, key in PLANNED_KINDS.items()},
           "price_per_hour": _usd(predicted.get("price_per_hour"), "price_per_hour"),
           "goodput_rps": _usd(predicted.get("predicted_goodput_rps"), "predicted_goodput_rps"),
           "planned_by": str(predicted.get("planned_by", "")) or None}
    if all(v is None for v in out["cost_per_million_tokens"].values()) and out["price_per_hour"] is None:
        raise ValueError("the planned figures give neither cost_per_mtok nor price_per_hour")
    return out


def _usd(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"the planned figures' {name} must be a number >= 0, got {value!r}")
    return float(value)


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
    price_per_hour: float  # USD per hour of this worker's device(s), now
    num_devices: float  # devices in the catalogue's unit, now (a CPU worker: its cores / the entry's num_cores)
    source: str  # "--price-per-hour", "catalogue:<entry>" or "unknown"
    core_hour_usd: float | None = None  # a CPU entry's price per core-hour (the worker pays for its core_s)
    cores_per_device: int = 0  # that entry's num_cores


def current_cores(info, stats=None) -> int:
    """The cores a worker runs on now: those it is pinned to (latest ``Stats``, else its ``WorkerInfo``;
    none while parked), else every core it may run on (``WorkerInfo.num_cores``; 0 for an accelerator)."""
    cpus = stats.cpus if stats is not None and stats.cpus is not None else info.cpus
    return len(cpus) if cpus is not None else info.num_cores


def worker_price(info, prices: dict[str, float], num_cores: int | None = None, role: str | None = None
                 ) -> WorkerPrice:
    """The price of the worker that ``info`` (a ``WorkerInfo``) describes, on ``num_cores`` cores (default:
    its ``WorkerInfo``'s) in ``role`` (default: its ``WorkerInfo``'s)."""
    from pdserve.sim.hardware import load_catalogue

    hw = load_catalogue().get(info.hardware) if info.hardware else None
    cores = current_cores(info) if num_cores is None else num_cores
    pool = POOLS.get(role or info.role, role or info.role)
    per_core = hw is not None and hw.num_cores > 0 and info.device == "cpu"
    devices = cores / hw.num_cores if per_core else 1.0
    if pool in prices or "*" in prices:
        return WorkerPrice(prices.get(pool, prices.get("*", 0.0)), devices, "--price-per-hour")
    if hw is None:
        return WorkerPrice(0.0, devices, "unknown")
    if per_core:
        return WorkerPrice(hw.price_per_hour * devices, devices, f"catalogue:{hw.name}",
                           hw.price_per_hour / hw.num_cores, hw.num_cores)
    return WorkerPrice(hw.price_per_hour, devices, f"catalogue:{hw.name}")


@dataclass(frozen=True)
class Usage:
    """Cumulative figures of the whole cluster at one moment (``time_s``: the frontend's monotonic clock).
    By role: a worker's totals count under its role now (the elastic controller may change it), so a
    window takes its busy and prefill seconds from the totals over every role."""

    time_s: float
    cost_usd: float = 0.0
    price_per_hour: float = 0.0  # of the live workers, now
    device_hours: dict[str, float] = field(default_factory=dict)  # by role
    busy_s: dict[str, float] = field(default_factory=dict)  # by role
    prefill_busy_s: dict[str, float] = field(default_factory=dict)  # by role (the worker applies prefill_time)
    tokens: dict[str, int] = field(default_factory=dict)  # by kind

    @property
    def total_busy_s(self) -> float:
        return sum(self.busy_s.values())

    @property
    def total_prefill_busy_s(self) -> float:
        return sum(self.prefill_busy_s.values())


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
        role = stats.role if stats is not None else info.role
        price = worker_price(info, prices, current_cores(info, stats), role)
        if conn.is_alive:
            price_now += price.price_per_hour
        if stats is None:
            continue
        role = role if role in hours else "both"
        if price.core_hour_usd is not None:  # a CPU worker: its cores over time
            cost += price.core_hour_usd * stats.core_s / 3600.0
            hours[role] += stats.core_s / price.cores_per_device / 3600.0
        else:
            cost += price.price_per_hour * stats.uptime_s / 3600.0
            hours[role] += price.num_devices * stats.uptime_s / 3600.0
        busy[role] += stats.busy_s
        prefill[role] += min(stats.prefill_busy_s, stats.busy_s)
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
    busy = max(0.0, now.total_busy_s - base.total_busy_s)
    prefill = max(0.0, now.total_prefill_busy_s - base.total_prefill_busy_s)
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
