"""Service-level objectives and their rolling attainment per phase. Pure Python.

``Objectives``: TTFT and TPOT objectives (seconds; None: not set) and, optionally, a bound on the 99th
percentile of inter-token latency. ``Attainment`` keeps the last ``window_s`` seconds of finished requests
(bounded: at most ``max_samples``) and answers what share met each objective: TTFT (a request's first
token), TPOT (its mean time per output token after the first), ITL (its worst gap, against the ITL bound).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Objectives:
    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_p99_s: float | None = None  # bound on the 99th percentile of gaps between tokens
    target: float = 0.9  # the share of requests that must meet them (DistServe's goodput)

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "itl_p99_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"objective {name} must be > 0, got {value}")
        if not 0 < self.target <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.target}")

    @property
    def is_set(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None


@dataclass(frozen=True)
class Sample:
    t: float  # when the request finished
    ttft_s: float
    tpot_s: float | None  # None: one output token
    max_itl_s: float
    itls: tuple[float, ...] = ()


@dataclass(frozen=True)
class PhaseAttainment:
    """Shares over the window (None: no request, or no objective for that phase)."""

    num_requests: int
    ttft: float | None
    tpot: float | None
    both: float | None  # TTFT and TPOT both met: the goodput share
    itl_p99_s: float | None
    ttft_p90_s: float | None
    tpot_p90_s: float | None


@dataclass
class Attainment:
    objectives: Objectives
    window_s: float = 30.0
    max_samples: int = 4096
    _samples: deque = field(default_factory=deque)

    def record(self, sample: Sample) -> None:
        self._samples.append(sample)
        while len(self._samples) > self.max_samples:
            self._samples.popleft()

    def window(self, now: float) -> PhaseAttainment:
        while self._samples and self._samples[0].t < now - self.window_s:
            self._samples.popleft()
        samples = list(self._samples)
        o = self.objectives
        if not samples:
            return PhaseAttainment(0, None, None, None, None, None, None)
        ttft_ok = [s.ttft_s <= o.ttft_s for s in samples] if o.ttft_s is not None else None
        tpot_ok = [s.tpot_s is None or s.tpot_s <= o.tpot_s for s in samples] if o.tpot_s is not None else None
        both = [(ttft_ok[i] if ttft_ok else True) and (tpot_ok[i] if tpot_ok else True) for i in range(len(samples))]
        itls = sorted(x for s in samples for x in s.itls)
        tpots = sorted(s.tpot_s for s in samples if s.tpot_s is not None)
        return PhaseAttainment(
            len(samples), _share(ttft_ok), _share(tpot_ok), _share(both) if o.is_set else None,
            percentile(itls, 0.99), percentile(sorted(s.ttft_s for s in samples), 0.9), percentile(tpots, 0.9))


def _share(flags: list[bool] | None) -> float | None:
    return None if flags is None else sum(flags) / len(flags)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of ``sorted_values`` (None when empty)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]
