"""The frontend's view of the cluster over time: samples of what /metrics exports, windows over them.

Every ``sample_interval_s`` the monitor takes a ``Snapshot``: the cost ``Usage`` (server/cost.py), the
finished-request count, the TTFT and TPOT histogram buckets and the objective counters, all read from the
``Metrics`` object that /metrics renders (no second source of truth). ``window(seconds)`` gives the
figures between the latest snapshot and the one ``seconds`` before it (or the oldest kept): rates, TTFT and
TPOT percentiles (interpolated in the histogram buckets, as Prometheus's ``histogram_quantile``), SLO
attainment and cost. Each sample also appends one point (the ``point_window_s`` figures) to a bounded
history that /v1/cluster and the dashboard show. ``CostCollector`` exports the cost gauges to /metrics.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdserve.server import cost as live_cost
from pdserve.server.metrics import RequestTotals
from pdserve.sim.cost import DEFAULT_CACHED_WEIGHT

logger = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)
WINDOWS_S = {"1m": 60.0, "5m": 300.0}  # the rolling windows of pdserve:cost_per_million_tokens


@dataclass(frozen=True)
class MonitorOptions:
    prices: tuple[tuple[str, float], ...] = ()  # (pool or "*", USD per worker-hour): --price-per-hour
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    cached_weight: float = DEFAULT_CACHED_WEIGHT
    sample_interval_s: float = 2.0
    history_len: int = 450  # points kept (15 minutes at 2 s)
    point_window_s: float = 30.0  # each history point's figures are over this window
    planned: dict | None = None  # the planner's figures for this layout (server/cost.py ``planned``)

    def __post_init__(self) -> None:
        for name in ("slo_ttft_s", "slo_tpot_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not self.sample_interval_s > 0 or self.history_len < 2 or not self.point_window_s > 0:
            raise ValueError("sample_interval_s and point_window_s must be > 0 and history_len >= 2")
        if not 0 <= self.cached_weight <= 1:
            raise ValueError(f"cached_weight must be in [0, 1], got {self.cached_weight}")

    @property
    def has_objectives(self) -> bool:
        return self.slo_ttft_s is not None or self.slo_tpot_s is not None


@dataclass(frozen=True)
class Snapshot:
    usage: live_cost.Usage
    num_requests: float
    ttft: tuple[tuple[float, float], ...]  # (upper bound, cumulative count) per bucket, +Inf last
    tpot: tuple[tuple[float, float], ...]
    slo: tuple[int, int, int, int] = (0, 0, 0, 0)  # judged, met ttft, met tpot, met both

    @property
    def time_s(self) -> float:
        return self.usage.time_s


@dataclass
class ClusterMonitor:
    client: object  # server.client.FrontendClient (its ``conns``)
    options: MonitorOptions = field(default_factory=MonitorOptions)
    metrics: object | None = None  # server.metrics.Metrics, once attached

    def __post_init__(self) -> None:
        self.prices = dict(self.options.prices)
        longest = max(*WINDOWS_S.values(), self.options.point_window_s)
        self._snapshots: deque[Snapshot] = deque(maxlen=int(longest / self.options.sample_interval_s) + 2)
        self._history: deque[dict] = deque(maxlen=self.options.history_len)

    def attach(self, metrics) -> None:
        """Read from ``metrics`` (and export the cost gauges there); set its objectives."""
        self.metrics = metrics
        if self.options.has_objectives:
            metrics.set_objectives(self.options.slo_ttft_s, self.options.slo_tpot_s)
        metrics.registry.register(CostCollector(self))

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.options.sample_interval_s)

    def snapshot(self, time_s: float | None = None) -> Snapshot:
        """The cluster's cumulative figures now (not kept)."""
        m = self.metrics
        now = time.monotonic() if time_s is None else time_s
        t = m.totals if m is not None else RequestTotals()
        u = live_cost.usage(list(self.client.conns.values()), t, self.prices, now)
        if m is None:
            return Snapshot(u, 0.0, (), ())
        return Snapshot(u, _counter_sum(m.requests), _buckets(m.ttft), _buckets(m.tpot),
                        (t.slo_judged, t.slo_met_ttft, t.slo_met_tpot, t.slo_met_both))

    def sample(self, time_s: float | None = None) -> None:
        """Keep a snapshot and append a history point."""
        self._snapshots.append(self.snapshot(time_s))
        point = self.window(self.options.point_window_s)
        point["unix_s"] = time.time()
        live = [c.stats for c in self.client.conns.values() if c.is_alive and c.stats is not None]
        point["load"] = {"num_running": sum(s.num_running for s in live),
                         "num_waiting": sum(s.num_waiting + s.num_awaiting_kv for s in live)}
        self._history.append(point)

    def window(self, seconds: float | None, now: Snapshot | None = None) -> dict:
        """Figures over the ``seconds`` before ``now`` (default: the latest kept snapshot, or a fresh one
        when none is kept), from the kept snapshots; ``seconds`` None: since start."""
        if now is None:
            now = self._snapshots[-1] if self._snapshots else self.snapshot()
        then = None if seconds is None else self.at_or_before(now.time_s - seconds)
        out = {"cost": live_cost.window(now.usage, then.usage if then else None, self.options.cached_weight)}
        span = now.time_s - then.time_s if then is not None else None
        out["seconds"] = span
        out["rates"] = _rates(now, then, span)
        out["latency"] = {"ttft_s": _quantiles(now.ttft, then.ttft if then else None),
                          "tpot_s": _quantiles(now.tpot, then.tpot if then else None)}
        judged, met_ttft, met_tpot, met_both = (a - b for a, b in zip(now.slo, then.slo if then else (0,) * 4))
        out["slo_attainment"] = None if not judged else {"both": met_both / judged, "ttft": met_ttft / judged,
                                                         "tpot": met_tpot / judged, "num_requests": judged}
        return out

    def history(self, since_unix_s: float | None = None) -> list[dict]:
        return [p for p in self._history if since_unix_s is None or p["unix_s"] > since_unix_s]

    def at_or_before(self, time_s: float) -> Snapshot | None:
        """The latest kept snapshot taken at or before ``time_s``, else the oldest one."""
        best = None
        for snap in self._snapshots:
            if snap.time_s <= time_s + 1e-9:
                best = snap
            else:
                break
        if best is None and len(self._snapshots) > 1:
            best = self._snapshots[0]
        return best


class CostCollector:
    """The cost figures for /metrics, computed at scrape time from the monitor's snapshots."""

    def __init__(self, monitor: ClusterMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator:
        mon = self.monitor
        now = mon.snapshot()
        per_m = GaugeMetricFamily("pdserve:cost_per_million_tokens",
                                  "USD per million tokens by kind, apportioned as the planner does (sim/cost.py)",
                                  labels=["kind", "window"])
        for name, seconds in (*WINDOWS_S.items(), ("total", None)):
            then = None if seconds is None else mon.at_or_before(now.time_s - seconds)
            if seconds is not None and then is None:
                continue  # no sample old enough yet
            figures = live_cost.window(now.usage, then.usage if then else None, mon.options.cached_weight)
            for kind, value in figures["cost_per_million_tokens"].items():
                per_m.add_metric([kind, name], math.nan if value is None else value)
        yield per_m
        plan = mon.options.planned
        if plan is not None:
            planned = GaugeMetricFamily("pdserve:planned_cost_per_million_tokens",
                                        "USD per million tokens by kind that the planner predicted for this layout "
                                        "at its predicted goodput", labels=["kind"])
            for kind, value in plan["cost_per_million_tokens"].items():
                if value is not None:
                    planned.add_metric([kind], value)
            yield planned
            if plan["price_per_hour"] is not None:
                yield GaugeMetricFamily("pdserve:planned_price_per_hour", "USD per hour the planner predicted for "
                                        "this layout", value=plan["price_per_hour"])
        u = now.usage
        yield CounterMetricFamily("pdserve:cost_usd", "What the workers' devices cost since they started, USD",
                                  value=u.cost_usd)
        yield GaugeMetricFamily("pdserve:price_per_hour", "USD per hour of the live workers' devices",
                                value=u.price_per_hour)
        hours = CounterMetricFamily("pdserve:device_hours", "Device-hours by worker role (a CPU worker: its "
                                    "cores over the catalogue entry's)", labels=["role"])
        for role, value in u.device_hours.items():
            hours.add_metric([role], value)
        yield hours
        busy = CounterMetricFamily("pdserve:busy_seconds", "Seconds in engine steps by role and phase",
                                   labels=["role", "phase"])
        for role, value in u.busy_s.items():
            prefill = min(u.prefill_busy_s.get(role, 0.0), value)
            busy.add_metric([role, "prefill"], prefill)
            busy.add_metric([role, "decode"], value - prefill)
        yield busy


def _counter_sum(counter) -> float:
    return sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))


def _buckets(histogram) -> tuple[tuple[float, float], ...]:
    """Cumulative bucket counts of a histogram, summed over its label sets."""
    sums: dict[float, float] = {}
    for metric in histogram.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                bound = float(s.labels["le"])
                sums[bound] = sums.get(bound, 0.0) + s.value
    return tuple(sorted(sums.items()))


def _quantiles(now, then) -> dict[str, float | None]:
    base = dict(then or ())
    counts = [(bound, count - base.get(bound, 0.0)) for bound, count in now]
    return {f"p{round(q * 100)}": _histogram_quantile(q, counts) for q in QUANTILES}


def _histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile: linear inside the bucket; the highest finite bound for +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _rates(now: Snapshot, then: Snapshot | None, span: float | None) -> dict:
    if then is None or not span:
        return {"requests_per_s": None, "tokens_per_s": dict.fromkeys(live_cost.KINDS)}
    tokens = {k: max(0, now.usage.tokens.get(k, 0) - then.usage.tokens.get(k, 0)) / span for k in live_cost.KINDS}
    return {"requests_per_s": max(0.0, now.num_requests - then.num_requests) / span, "tokens_per_s": tokens}
