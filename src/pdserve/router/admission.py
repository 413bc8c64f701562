"""Admission: refuse early (429 + Retry-After) rather than queue without bound. Pure Python.

Two bounds: requests in flight (at the frontend, and per instance), and, with objectives, the request's
predicted latency:

- TTFT: router/path.py's prediction from the workers' measured step costs and queues, times its measured
  error: the ``quantile`` of actual / predicted over the last ``CALIBRATION_WINDOW`` first tokens, once
  there are ``MIN_CALIBRATION`` of them, clamped to ``CORRECTION_BOUNDS``. The quantile is the objectives'
  attainment target (0.9 from the frontend): under overload the queue fills up to the bound, so the
  admitted requests' predictions sit at it, and with the median error half of them would miss. A request
  predicted to miss its objective by more than ``slack`` x is refused before any work is done, with a
  Retry-After of the time its queue needs to drain that far.
- TPOT: a decode worker whose current batch's decodes, with the share of each step that prompts always
  get beside them (stall-free chunking's floor, ``engine.step_budget.PrefillBudget.min_share``), already
  take over ``slack`` x the TPOT objective cannot give one more request its objective; the request is
  refused.

Admitted requests then keep their objectives under overload, instead of every request missing them in a
queue that only grows."""
from __future__ import annotations

from collections import deque

from pdserve.control.attainment import percentile
from pdserve.engine.step_budget import PrefillBudget
from pdserve.errors import OverloadedError

CALIBRATION_WINDOW = 64  # first tokens whose actual / predicted TTFT the correction is the median of
MIN_CALIBRATION = 8  # ... before which predictions are taken as they are
CORRECTION_BOUNDS = (0.5, 4.0)  # a correction outside these says the model is broken, not off
PROMPT_SHARE = PrefillBudget.min_share  # of a step, beside decodes that fill it: what prompts still get


class Admission:
    """A bound on requests in flight at the frontend, and per instance.

    ``check`` raises OverloadedError when admitting one more request would pass either bound; the
    Retry-After hint grows with how far over the bound the cluster is."""

    def __init__(self, max_inflight: int = 1024, max_inflight_per_instance: int = 256,
                 ttft_slo_s: float | None = None, slack: float = 1.0, tpot_slo_s: float | None = None,
                 quantile: float = 0.5) -> None:
        if max_inflight < 1 or max_inflight_per_instance < 1:
            raise ValueError("admission bounds must be >= 1")
        if slack <= 0:
            raise ValueError(f"slack must be > 0, got {slack}")
        if not 0 < quantile <= 1:
            raise ValueError(f"the correction's quantile must be in (0, 1], got {quantile}")
        self.max_inflight = max_inflight
        self.max_inflight_per_instance = max_inflight_per_instance
        self.ttft_slo_s = ttft_slo_s
        self.slack = slack
        self.tpot_slo_s = tpot_slo_s
        self.quantile = quantile
        self.num_refused = 0
        self._ratios: deque[float] = deque(maxlen=CALIBRATION_WINDOW)  # actual / predicted TTFT

    def observe_ttft(self, predicted_s: float | None, actual_s: float) -> None:
        """An admitted request's first token came ``actual_s`` after it was routed with this prediction."""
        if predicted_s:
            self._ratios.append(actual_s / predicted_s)

    @property
    def correction(self) -> float:
        """What predictions are multiplied by: their measured error's ``quantile`` (1.0 until enough are
        measured)."""
        if len(self._ratios) < MIN_CALIBRATION:
            return 1.0
        low, high = CORRECTION_BOUNDS
        return min(high, max(low, percentile(sorted(self._ratios), self.quantile)))

    def check_predicted(self, predicted_ttft_s: float | None, decode_step_s: float = 0.0,
                        is_queued: bool = True) -> None:
        """Raise OverloadedError when the request is predicted to miss the TTFT objective by far, or its
        decode worker's steps (``decode_step_s``, its current batch's) already miss the TPOT objective.

        The TTFT bound refuses only a request that prompts ahead of it delay (``is_queued``): one predicted
        to miss with nothing ahead gets no better by waiting, and refusing it would also keep the
        correction from ever learning again (it learns from admitted requests only)."""
        if self.ttft_slo_s is not None and predicted_ttft_s is not None and is_queued:
            predicted = predicted_ttft_s * self.correction
            limit = self.ttft_slo_s * self.slack
            if predicted > limit:
                self.num_refused += 1
                raise OverloadedError(f"predicted time to first token {predicted:.2f} s is over the "
                                      f"{self.ttft_slo_s:g} s objective", retry_after_s=predicted - limit)
        step_s = decode_step_s * (1 + PROMPT_SHARE)
        if self.tpot_slo_s is not None and step_s > self.tpot_slo_s * self.slack:
            self.num_refused += 1
            raise OverloadedError(f"the chosen decode worker's steps take {step_s * 1e3:.0f} ms, over the "
                                  f"{self.tpot_slo_s * 1e3:g} ms time-per-output-token objective",
                                  retry_after_s=1.0)

    def check(self, num_inflight: int, instance_inflight: int | None = None) -> None:
        if num_inflight >= self.max_inflight:
            raise OverloadedError(f"{num_inflight} requests in flight (limit {self.max_inflight})",
                                  retry_after_s=1.0)
        if instance_inflight is not None and instance_inflight >= self.max_inflight_per_instance:
            raise OverloadedError(f"the chosen worker has {instance_inflight} requests in flight "
                                  f"(limit {self.max_inflight_per_instance})", retry_after_s=1.0)
