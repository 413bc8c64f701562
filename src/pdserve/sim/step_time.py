"""How long a simulated instance's steps take: the one call the simulator makes (``StepTime``).

The time is the performance model's (``PerfModel.step_time_s`` of the step's ``BatchShape``). A model that
was calibrated against a live deployment (``pdserve profile --live``) may carry that deployment's overheads
(``sim/overheads.py``: the worker loop between steps, contention between workers of a host, the host's step
jitter, a cold step after an idle spell, a request joining the batch); they are an add-on for reproducing a
measured host (the accuracy benchmark), applied here and nowhere else. Without them a step takes exactly what
the model says, and decode-only stretches can be fast-forwarded.
"""
from __future__ import annotations

from collections.abc import Sequence

from pdserve.sim.cost import step_prefill_share
from pdserve.sim.overheads import COLD_IDLE_S, StepNoise, StepOverhead
from pdserve.sim.perf_model import BatchShape, PerfModel


class StepTime:
    """One instance's step times: its perf model and, from a live calibration, its role's overheads."""

    def __init__(self, perf: PerfModel, overhead: StepOverhead | None = None, seed: str = "") -> None:
        self.perf = perf
        self.overhead = overhead
        self.noise = StepNoise(overhead, seed) if overhead is not None and overhead.jitter else None

    @property
    def is_contention_sensitive(self) -> bool:
        """Whether a step's time depends on whether another worker of the host is in a step."""
        return self.overhead is not None and self.overhead.is_contention_sensitive

    @property
    def can_fast_forward(self) -> bool:
        """Whether decode-only steps may be committed ahead (not when each step draws its own jitter)."""
        return self.noise is None and not self.is_contention_sensitive

    def step_s(self, shape: BatchShape, chunks: Sequence, now: float, idle_since: float,
               is_contended: bool = False) -> float:
        """Seconds of a step of these scheduled chunks (``shape`` = ``BatchShape.from_chunks(chunks)``)
        starting at ``now``, the instance idle since ``idle_since``; ``is_contended``: another worker of the
        host is in a step."""
        dt = self.perf.step_time_s(shape)
        o = self.overhead
        if o is None:
            return dt
        prefill_part = self.perf.prefill_part_s(shape) if shape.num_prefill_tokens else 0.0
        num_joining = sum(1 for c in chunks if c.num_tokens == 1 and c.start == c.request.num_prompt_tokens)
        factor = self.noise.factor(now) if self.noise is not None else 1.0
        return o.time_s(dt, shape.num_samples, is_contended, prefill_part, num_joining, factor,
                        now - idle_since >= COLD_IDLE_S)

    def decode_steps_s(self, batch: Sequence, num_steps: int, now: float, idle_since: float) -> list[float] | None:
        """End times of ``num_steps`` decode-only steps of the running ``batch`` from ``now``, or None when
        the next step must be taken on its own (its cost is not that of a plain decode step)."""
        o = self.overhead
        if o is not None and o.join_s and any(r.num_computed_tokens == r.num_prompt_tokens for r in batch):
            return None  # a request's first decode costs a join
        if o is not None and o.cold_s and now - idle_since >= COLD_IDLE_S:
            return None  # so does the first step after an idle spell
        b = len(batch)
        ctx = sum(r.num_computed_tokens + 1 for r in batch)
        longest = max(r.num_computed_tokens + 1 for r in batch)
        ends, t = [], now
        for i in range(num_steps):
            dt = self.perf.decode_step_time_s(b, ctx + b * i, longest + i)
            t += dt if o is None else o.time_s(dt, b)
            ends.append(t)
        return ends

    def prefill_share(self, shape: BatchShape) -> float:
        """Fraction of a step's time spent on its prefill tokens (for cost attribution: ``sim/cost.py``)."""
        return step_prefill_share(self.perf, shape)
