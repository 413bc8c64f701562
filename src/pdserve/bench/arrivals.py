"""Arrival processes for the load generator: when each request is sent.

Open loop (times fixed in advance, independent of the server's speed):

- ``poisson``: exponential inter-arrival gaps at ``rate`` requests/s (``rate=inf``: all at t=0);
- ``gamma``: gamma-distributed gaps with the same mean ``1/rate`` and shape ``burstiness``
  (``burstiness < 1`` is burstier than Poisson, ``> 1`` more regular; ``1`` is Poisson);
- ``trace``: the trace's own timestamps, relative to its first request, multiplied by ``time_scale``
  (``0.5`` replays twice as fast).

Closed loop (``closed``): ``concurrency`` requests in flight at all times; a new one is sent as soon as
one finishes, so there are no arrival times (``None``).

Everything here is pure and seeded: the same config and seed give the same times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ARRIVAL_KINDS = ("poisson", "gamma", "trace", "closed")


@dataclass(frozen=True)
class ArrivalConfig:
    """How requests arrive. Only the fields of the chosen ``kind`` matter."""

    kind: str = "poisson"
    rate: float = math.inf  # requests/s, poisson and gamma
    burstiness: float = 1.0  # gamma shape, gamma only
    time_scale: float = 1.0  # multiplies trace timestamps, trace only
    concurrency: int = 1  # requests in flight, closed only

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(f"arrival kind must be one of {ARRIVAL_KINDS}, got {self.kind!r}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 (inf: all at once), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness}")
        if not (self.time_scale >= 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be a finite number >= 0, got {self.time_scale}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.kind == "gamma" and math.isinf(self.rate):
            raise ValueError("gamma arrivals need a finite rate")

    @property
    def is_closed_loop(self) -> bool:
        return self.kind == "closed"

    def describe(self) -> dict[str, object]:
        """The settings that matter for this kind, for result files and tables."""
        if self.kind == "closed":
            return {"arrival": "closed", "concurrency": self.concurrency}
        if self.kind == "trace":
            return {"arrival": "trace", "time_scale": self.time_scale}
        out: dict[str, object] = {"arrival": self.kind, "rate": _json_rate(self.rate)}
        if self.kind == "gamma":
            out["burstiness"] = self.burstiness
        return out


def arrival_times(
    config: ArrivalConfig,
    num_requests: int,
    seed: int,
    trace_timestamps_s: Sequence[float] | None = None,
) -> list[float] | None:
    """Send times in seconds from the start of the run, non-decreasing; ``None`` for closed loop.

    ``trace_timestamps_s`` is required for ``kind="trace"`` (one per request, any origin).
    """
    if config.kind == "closed":
        return None
    if config.kind == "trace":
        if trace_timestamps_s is None:
            raise ValueError("trace arrivals need a trace dataset (mooncake:FILE or azure:FILE)")
        return trace_arrivals(trace_timestamps_s[:num_requests], config.time_scale)
    rng = np.random.default_rng([seed, 0xA771])
    if config.kind == "poisson":
        return poisson_arrivals(num_requests, config.rate, rng)
    return gamma_arrivals(num_requests, config.rate, config.burstiness, rng)


def poisson_arrivals(num_requests: int, rate: float, rng: np.random.Generator) -> list[float]:
    """First request at 0, then exponential gaps of mean ``1/rate``; ``rate=inf``: all at 0."""
    if math.isinf(rate):
        return [0.0] * num_requests
    return gamma_arrivals(num_requests, rate, 1.0, rng)


def gamma_arrivals(
    num_requests: int, rate: float, burstiness: float, rng: np.random.Generator
) -> list[float]:
    """First request at 0, then gamma gaps of shape ``burstiness`` and mean ``1/rate``."""
    if num_requests <= 0:
        return []
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def trace_arrivals(timestamps_s: Sequence[float], time_scale: float) -> list[float]:
    """Trace timestamps relative to the earliest one, times ``time_scale``."""
    if not timestamps_s:
        return []
    origin = min(timestamps_s)
    return [(t - origin) * time_scale for t in timestamps_s]


def _json_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate
