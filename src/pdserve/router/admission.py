"""Admission: refuse early (429 + Retry-After) rather than queue without bound. Pure Python.

Two bounds: requests in flight (at the frontend, and per instance), and, with a TTFT objective, the
request's predicted TTFT (router/path.py's prediction from the workers' measured step costs and queues):
a request predicted to miss its objective by more than ``ttft_slack`` x is refused before any work is done,
with a Retry-After of the time its queue needs to drain that far. Admitted requests then keep their
objective under overload, instead of every request missing it in a queue that only grows."""
from __future__ import annotations

from pdserve.errors import OverloadedError


class Admission:
    """A bound on requests in flight at the frontend, and per instance.

    ``check`` raises OverloadedError when admitting one more request would pass either bound; the
    Retry-After hint grows with how far over the bound the cluster is."""

    def __init__(self, max_inflight: int = 1024, max_inflight_per_instance: int = 256,
                 ttft_slo_s: float | None = None, ttft_slack: float = 1.0) -> None:
        if max_inflight < 1 or max_inflight_per_instance < 1:
            raise ValueError("admission bounds must be >= 1")
        if ttft_slack <= 0:
            raise ValueError(f"ttft_slack must be > 0, got {ttft_slack}")
        self.max_inflight = max_inflight
        self.max_inflight_per_instance = max_inflight_per_instance
        self.ttft_slo_s = ttft_slo_s
        self.ttft_slack = ttft_slack
        self.num_refused = 0

    def check_predicted(self, predicted_ttft_s: float | None) -> None:
        """Raise OverloadedError when the request is predicted to miss the TTFT objective by far."""
        if self.ttft_slo_s is None or predicted_ttft_s is None:
            return
        limit = self.ttft_slo_s * self.ttft_slack
        if predicted_ttft_s > limit:
            self.num_refused += 1
            raise OverloadedError(f"predicted time to first token {predicted_ttft_s:.2f} s is over the "
                                  f"{self.ttft_slo_s:g} s objective", retry_after_s=predicted_ttft_s - limit)

    def check(self, num_inflight: int, instance_inflight: int | None = None) -> None:
        if num_inflight >= self.max_inflight:
            raise OverloadedError(f"{num_inflight} requests in flight (limit {self.max_inflight})",
                                  retry_after_s=1.0)
        if instance_inflight is not None and instance_inflight >= self.max_inflight_per_instance:
            raise OverloadedError(f"the chosen worker has {instance_inflight} requests in flight "
                                  f"(limit {self.max_inflight_per_instance})", retry_after_s=1.0)
