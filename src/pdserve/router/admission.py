"""Admission: refuse early (429 + Retry-After) rather than queue without bound. Pure Python."""
from __future__ import annotations

from pdserve.errors import OverloadedError


class Admission:
    """A bound on requests in flight at the frontend, and per instance.

    ``check`` raises OverloadedError when admitting one more request would pass either bound; the
    Retry-After hint grows with how far over the bound the cluster is."""

    def __init__(self, max_inflight: int = 1024, max_inflight_per_instance: int = 256) -> None:
        if max_inflight < 1 or max_inflight_per_instance < 1:
            raise ValueError("admission bounds must be >= 1")
        self.max_inflight = max_inflight
        self.max_inflight_per_instance = max_inflight_per_instance

    def check(self, num_inflight: int, instance_inflight: int | None = None) -> None:
        if num_inflight >= self.max_inflight:
            raise OverloadedError(f"{num_inflight} requests in flight (limit {self.max_inflight})",
                                  retry_after_s=1.0)
        if instance_inflight is not None and instance_inflight >= self.max_inflight_per_instance:
            raise OverloadedError(f"the chosen worker has {instance_inflight} requests in flight "
                                  f"(limit {self.max_inflight_per_instance})", retry_after_s=1.0)
