from __future__ import annotations

import pytest

from pdserve.bench.metrics import (
    RequestRecord,
    Slo,
    compute_metrics,
    max_rate_meeting,
    request_latency,
    summarize,
)


def _record(
    index: int, send: float, chunks: list[float], tokens: int | None = None, error: str | None = None
):
    return RequestRecord(
        index=index,
        input_len=10,
        output_len=len(chunks),
        send_s=send,
        chunk_times_s=list(chunks),
        end_s=chunks[-1] if chunks else send + 1.0,
        output_tokens=len(chunks) if tokens is None else tokens,
        error=error,
    )


def test_request_latency_definitions():
    lat = request_latency(_record(0, 1.0, [1.5, 1.6, 1.8, 2.1]))
    assert lat is not None
    assert lat.ttft_s == pytest.approx(0.5)
    assert lat.e2e_s == pytest.approx(1.1)
    assert lat.tpot_s == pytest.approx((1.1 - 0.5) / 3)
    assert lat.itl_s == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_uses_token_count_not_chunk_count():
    # 2 chunks carrying 5 tokens (usage): TPOT divides by output_tokens - 1
    lat = request_latency(_record(0, 0.0, [1.0, 3.0], tokens=5))
    assert lat.tpot_s == pytest.approx(2.0 / 4)
    assert lat.itl_s == pytest.approx([2.0])


def test_single_token_has_no_tpot_and_meets_tpot_objective():
    lat = request_latency(_record(0, 0.0, [0.2]))
    assert lat.tpot_s is None
    assert lat.itl_s == []
    assert Slo(ttft_s=0.5, tpot_s=0.001).is_met(lat)
    assert not Slo(ttft_s=0.1).is_met(lat)


def test_failed_request_has_no_latency():
    assert request_latency(_record(0, 0.0, [0.1, 0.2], error="dropped stream")) is None
    assert request_latency(_record(0, 0.0, [])) is None


def test_summarize_percentiles():
    stats = summarize([float(x) for x in range(1, 101)])
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["min"] == 1.0 and stats["max"] == 100.0
    assert summarize([])["p99"] is None


def test_compute_metrics_throughput_attainment_goodput():
    records = [
        _record(0, 0.0, [0.1, 0.2, 0.3]),  # ttft 0.1, tpot 0.1: meets
        _record(1, 0.0, [0.5, 0.6, 0.7]),  # ttft 0.5: misses TTFT
        _record(2, 1.0, [1.2, 1.25, 1.3]),  # ttft 0.2, tpot 0.05: meets
        _record(3, 1.0, [1.1, 1.9, 2.7]),  # ttft 0.1, tpot 0.8: misses TPOT
        _record(4, 2.0, [], error="HTTP 500"),
        _record(5, 2.0, [2.1], error="dropped stream"),
    ]
    m = compute_metrics(records, duration_s=4.0, slo=Slo(ttft_s=0.25, tpot_s=0.2))
    assert (m.num_sent, m.completed, m.failed) == (6, 4, 2)
    assert m.errors == {"HTTP 500": 1, "dropped stream": 1}
    assert m.total_output_tokens == 12
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(3.0)
    assert m.total_token_throughput == pytest.approx((40 + 12) / 4)
    assert m.num_slo_met == 2
    assert m.slo_attainment == pytest.approx(2 / 6)  # failed requests count as missing
    assert m.goodput == pytest.approx(0.5)
    assert m.ttft_s["mean"] == pytest.approx((0.1 + 0.5 + 0.2 + 0.1) / 4)
    assert m.itl_s["max"] == pytest.approx(0.8)
    assert m.e2e_s["p50"] == pytest.approx(0.3 + (0.7 - 0.3) * 0.5)  # e2e 0.3, 0.7, 0.3, 1.7


def test_compute_metrics_without_objectives_counts_every_completion():
    records = [_record(0, 0.0, [0.1, 0.2]), _record(1, 0.0, [], error="timeout")]
    m = compute_metrics(records, duration_s=2.0)
    assert m.slo_attainment == pytest.approx(0.5)
    assert m.goodput == pytest.approx(0.5)


def test_compute_metrics_empty():
    m = compute_metrics([], duration_s=0.0)
    assert m.completed == 0 and m.slo_attainment == 0.0 and m.goodput == 0.0
    assert m.ttft_s["mean"] is None


def test_max_rate_meeting():
    assert max_rate_meeting([0.5, 1, 2, 4], [1.0, 0.95, 0.9, 0.5]) == 2
    assert max_rate_meeting([0.5, 1, 2, 4], [1.0, 0.95, 0.9, 0.5], target=0.95) == 1
    assert max_rate_meeting([1, 2], [0.5, 0.2]) is None
    assert max_rate_meeting([1, 2, 4], [0.95, 0.5, 0.92]) == 4  # the highest rate that meets it
