import pytest

from pdserve.sim.cost import DEEPSEEK_DAY, cost_per_million, deepseek_day, fleet_cost_usd


def test_deepseek_published_day_reproduces():
    d = deepseek_day()
    assert d["daily_cost_usd"] == pytest.approx(87072, abs=0.5)
    assert d["cache_hit_rate"] == pytest.approx(0.563, abs=0.001)
    # The published per-node throughputs account for the published node-hours (within 0.1%).
    assert d["node_seconds_needed"] == pytest.approx(d["node_seconds_available"], rel=1e-3)
    # The published theoretical revenue at R1 prices (within 0.05%: token counts are rounded).
    assert d["theoretical_revenue_usd"] == pytest.approx(DEEPSEEK_DAY["theoretical_revenue_usd"], rel=5e-4)
    # Per-token costs add back up to the day's cost.
    total = (342e9 * d["cached_input_per_mtok"] + 266e9 * d["uncached_input_per_mtok"]
             + 168e9 * d["output_per_mtok"]) / 1e6
    assert total == pytest.approx(87072, rel=1e-9)
    assert d["blended_per_mtok"] == pytest.approx(87072 / 776e3, rel=1e-9)


def test_cost_split():
    assert fleet_cost_usd(8, 2.0, 24) == 384
    c = cost_per_million(100.0, 0, 1e6, 1e6, 0.25)
    assert (c.uncached_input, c.output, c.blended) == pytest.approx((25.0, 75.0, 50.0))
    with pytest.raises(ValueError):
        cost_per_million(1.0, 0, 1, 1, 1.5)
