"""Benchmark metrics from per-request records. Pure: synthetic timestamps in, numbers out.

Definitions (as vLLM's benchmark_serving):

- TTFT: first content chunk time - send time;
- TPOT: (e2e - TTFT) / (output_tokens - 1), for requests with more than one output token;
- ITL: gaps between consecutive content chunks of a request (all requests pooled);
- e2e: end of the response stream - send time;
- request / output token throughput: completed requests / output tokens over the run's duration;
- a request meets the objectives when TTFT <= slo_ttft_s and TPOT <= slo_tpot_s (a missing objective
  always holds; a one-token request has no TPOT and meets the TPOT objective);
- SLO attainment: requests meeting both / all *sent* requests (failed ones count as missing);
- goodput: requests meeting both / duration (requests/s).

Each latency summary is ``{"mean", "p50", "p90", "p99"}`` in seconds (plus min, max, std), ``None``
values when nothing was measured.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_ATTAINMENT = 0.9
PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the load generator saw of one request. Times in seconds from the start of the run.

    ``chunk_times_s``: arrival of every content chunk. ``error``: None on success, else a short
    category ("HTTP 500", "timeout", "dropped stream", ...) used to count failures.
    """

    index: int
    input_len: int
    output_len: int  # requested
    send_s: float
    chunk_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    error_detail: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None and bool(self.chunk_times_s)


@dataclass(frozen=True)
class RequestLatency:
    """Latencies of one successful request; ``tpot_s`` None for single-token outputs."""

    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    itl_s: list[float]


@dataclass(frozen=True)
class Slo:
    """Latency objectives; None: no objective."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def is_met(self, latency: RequestLatency) -> bool:
        is_ttft_ok = self.ttft_s is None or latency.ttft_s <= self.ttft_s
        is_tpot_ok = self.tpot_s is None or latency.tpot_s is None or latency.tpot_s <= self.tpot_s
        return is_ttft_ok and is_tpot_ok


def request_latency(record: RequestRecord) -> RequestLatency | None:
    """Latencies of a successful request; None for a failed one or one without any content chunk."""
    if not record.is_ok:
        return None
    first = record.chunk_times_s[0]
    end = record.end_s if record.end_s is not None else record.chunk_times_s[-1]
    ttft = first - record.send_s
    e2e = end - record.send_s
    tpot = (e2e - ttft) / (record.output_tokens - 1) if record.output_tokens > 1 else None
    itl = np.diff(record.chunk_times_s).tolist()
    return RequestLatency(ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, itl_s=itl)


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99, min, max, std (linear-interpolated percentiles); None when empty."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES), "min", "max", "std"]
    if len(values) == 0:
        return dict.fromkeys(keys)
    arr = np.asarray(values, dtype=float)
    pcts = np.percentile(arr, PERCENTILES)
    out = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, pcts, strict=True)})
    out.update({"min": float(arr.min()), "max": float(arr.max()), "std": float(arr.std())})
    return out


@dataclass
class BenchMetrics:
    num_sent: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    num_slo_met: int
    slo_attainment: float
    goodput: float
    errors: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compute_metrics(
    records: Sequence[RequestRecord], duration_s: float, slo: Slo | None = None
) -> BenchMetrics:
    """Aggregate metrics over the requests that were sent (``records``) in ``duration_s`` seconds."""
    slo = slo or Slo()
    latencies = [lat for lat in map(request_latency, records) if lat is not None]
    ok_records = [r for r in records if r.is_ok]
    failed = len(records) - len(ok_records)
    num_met = sum(slo.is_met(lat) for lat in latencies)
    output_tokens = sum(r.output_tokens for r in ok_records)
    input_tokens = sum(r.input_len for r in ok_records)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    errors = Counter(r.error or "no content" for r in records if not r.is_ok)
    return BenchMetrics(
        num_sent=len(records),
        completed=len(ok_records),
        failed=failed,
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=per_s(len(ok_records)),
        output_throughput=per_s(output_tokens),
        total_token_throughput=per_s(input_tokens + output_tokens),
        ttft_s=summarize([lat.ttft_s for lat in latencies]),
        tpot_s=summarize([lat.tpot_s for lat in latencies if lat.tpot_s is not None]),
        itl_s=summarize([gap for lat in latencies for gap in lat.itl_s]),
        e2e_s=summarize([lat.e2e_s for lat in latencies]),
        num_slo_met=num_met,
        slo_attainment=num_met / len(records) if records else 0.0,
        goodput=per_s(num_met),
        errors=dict(sorted(errors.items())),
    )


def max_rate_meeting(
    rates: Sequence[float], attainments: Sequence[float], target: float = DEFAULT_ATTAINMENT
) -> float | None:
    """The highest rate whose SLO attainment is >= ``target``; None if no rate meets it."""
    meeting = [r for r, a in zip(rates, attainments, strict=True) if a >= target and not math.isnan(a)]
    return max(meeting) if meeting else None
