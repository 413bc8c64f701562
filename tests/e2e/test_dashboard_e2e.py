"""End to end: live cost, /v1/cluster, the Grafana board's metrics and the dashboard page in a real browser,
on a disaggregated cluster (1 prefill + 1 decode worker) driven with the official ``openai`` client.

The browser is Debian's chromium (the Makefile installs it) driven by Playwright (tests/e2e/dashboard_checks.py); the
screenshot goes to ``$PDSERVE_DASHBOARD_SCREENSHOT`` when set, else into the test's tmp dir. The elastic
controller's part of the dashboard and of the Grafana board is checked on a mode-auto cluster in
test_e2e_auto.py.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from cluster_helpers import MODEL, local_cluster, require_model, wait_idle
from dashboard_checks import AUTO_ONLY_METRICS, dashboard_page, grafana_metric_names, metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DECODE_PRICE = 0.5  # --price-per-hour decode=0.5; the prefill worker is priced from the catalogue
LONG = ("In a quiet valley between two mountains there was a village whose people kept bees, and every spring "
        "the bees flew over the meadows to gather nectar from the flowers that grew along the river. ")


@pytest.fixture(scope="module")
def cluster():
    require_model()
    started = time.monotonic()
    with local_cluster("--prefill", "1", "--decode", "1", "--slo-ttft", "10", "--slo-tpot", "2",
                       "--price-per-hour", f"decode={DECODE_PRICE}") as (url, _):
        yield {"url": url, "launched_s": started, "healthy_s": time.monotonic()}


def _openai(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _send(url: str, prompts: list[str], max_tokens: int = 8) -> dict[str, int]:
    """Send each prompt (completions and chat), return the summed usage as the server reported it."""
    client = _openai(url)
    total = {"prompt": 0, "cached": 0, "completion": 0}
    for i, prompt in enumerate(prompts):
        if i % 2:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
        else:
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        total["prompt"] += r.usage.prompt_tokens
        details = r.usage.prompt_tokens_details
        total["cached"] += (details.cached_tokens or 0) if details else 0
        total["completion"] += r.usage.completion_tokens
    return total


def _status(url: str) -> dict:
    return httpx.get(f"{url}/v1/cluster", timeout=10).raise_for_status().json()


def test_cost_matches_a_hand_computation(cluster):
    from pdserve.sim.hardware import load_catalogue

    url = cluster["url"]
    usage = _send(url, [LONG * 3, LONG * 3, "The capital of France is", LONG * 3 + "Once", "Name three colors."])
    wait_idle(url)
    time.sleep(1.0)  # one more Stats from each worker: busy time of the last steps included
    status = _status(url)
    elapsed_max = time.monotonic() - cluster["launched_s"]
    elapsed_min = time.monotonic() - cluster["healthy_s"] - 1.0  # Stats are up to 0.5 s old
    catalogue = load_catalogue()

    cost = busy = prefill = 0.0
    hours = {"prefill": 0.0, "decode": 0.0, "both": 0.0}
    for w in status["workers"]:
        assert w["device"] == "cpu" and w["num_cores"] >= 1 and w["hardware"] == "cpu-this-machine"
        hw = catalogue[w["hardware"]]
        assert elapsed_min <= w["uptime_s"] <= elapsed_max
        assert 0 < w["busy_s"] <= w["uptime_s"] and 0 <= w["prefill_busy_s"] <= w["busy_s"]
        # pinned to its cores from start to end (no elastic controller here): its core-seconds are those
        assert w["core_s"] == pytest.approx(w["num_cores"] * w["uptime_s"], rel=1e-6)
        price = DECODE_PRICE if w["role"] == "decode" else hw.price_per_hour * w["num_cores"] / hw.num_cores
        assert w["price_per_hour"] == pytest.approx(price)
        if w["role"] == "decode":  # a given price is per worker-hour
            cost += price * w["uptime_s"] / 3600
        else:  # a catalogue CPU entry's price, per core-hour
            cost += hw.price_per_hour / hw.num_cores * w["core_s"] / 3600
        hours[w["role"]] += w["core_s"] / hw.num_cores / 3600
        busy += w["busy_s"]
        if w["role"] == "prefill":  # the planner's rule (sim/cost.py prefill_time), applied by the worker
            assert w["prefill_busy_s"] == pytest.approx(w["busy_s"])
        prefill += w["prefill_busy_s"]
    assert sorted(w["role"] for w in status["workers"]) == ["decode", "prefill"]

    total = status["cost"]["windows"]["total"]
    cached, uncached, output = usage["cached"], usage["prompt"] - usage["cached"], usage["completion"]
    assert total["tokens"] == {"input": uncached, "cached_input": cached, "output": output}
    assert total["cost_usd"] == pytest.approx(cost, rel=1e-9)
    assert total["device_hours"] == pytest.approx(hours, rel=1e-9)
    share = prefill / busy
    assert total["input_time_share"] == pytest.approx(share, rel=1e-9)
    per_uncached = cost * share / (uncached + 0.1 * cached)
    expected = {"input": per_uncached * 1e6, "cached_input": per_uncached * 0.1 * 1e6 if cached else None,
                "output": cost * (1 - share) / output * 1e6}
    assert total["cost_per_million_tokens"] == pytest.approx(expected, rel=1e-9)

    exported = metrics(url)
    tokens = {s.labels["kind"]: s.value for s in exported["pdserve:tokens_total"]}
    assert tokens == {"input": uncached, "cached_input": cached, "output": output}
    per_m = {(s.labels["kind"], s.labels["window"]): s.value for s in exported["pdserve:cost_per_million_tokens"]}
    assert per_m[("output", "total")] > 0 and math.isfinite(per_m[("input", "total")])
    judged = exported["pdserve:slo_requests_total"][0].value
    assert judged == 5 and status["slo"]["attainment_total"]["num_requests"] == 5


def test_every_grafana_metric_exists(cluster):
    names = grafana_metric_names()
    assert len(names) >= 15 and AUTO_ONLY_METRICS <= names
    _send(cluster["url"], ["The capital of France is"])  # every histogram and counter has samples
    exported = set(metrics(cluster["url"]))
    missing = sorted(names - exported - AUTO_ONLY_METRICS)
    assert not missing, f"the Grafana board queries metrics that /metrics does not export: {missing}"


def test_dashboard_in_a_real_browser(cluster, tmp_path):
    url = cluster["url"]
    shot = Path(os.environ.get("PDSERVE_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    with dashboard_page(url) as (page, errors):
        shown = page.eval_on_selector_all("#workers tbody tr[data-worker]", "rows => rows.map(r => r.dataset.worker)")
        assert sorted(shown) == sorted(w["worker_id"] for w in _status(url)["workers"])
        page.wait_for_function("document.getElementById('tokens').textContent !== '-'", timeout=30_000)
        before = page.inner_text("#tokens")

        _send(url, [LONG, "Name three colors.", "The capital of France is"])
        wait_idle(url)
        totals = _status(url)["cost"]["windows"]["total"]["tokens"]
        expected = f"{totals['input']} · {totals['cached_input']} · {totals['output']}"
        assert expected != before
        page.wait_for_function("t => document.getElementById('tokens').textContent === t", arg=expected,
                               timeout=30_000)
        page.wait_for_function("document.getElementById('ttft').textContent !== '-'", timeout=30_000)
        page.wait_for_function("document.querySelectorAll('#chart-rates path.series').length > 0", timeout=30_000)
        assert "elastic controller is off" in page.inner_text("#decisions")
        assert "disaggregated" in page.inner_text("#mode")
        assert all(" · core" in page.inner_text(f"#workers tr[data-worker='{w}']") for w in shown)  # pinned
        page.screenshot(path=str(shot), full_page=True)
    assert not errors, f"console errors on the dashboard: {errors}"
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
