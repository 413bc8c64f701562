"""Shared by the dashboard's e2e checks (test_dashboard_e2e.py, test_e2e_auto.py): the page in a real browser
(Debian's chromium, which the Makefile installs, driven by Playwright), /metrics as samples, and the metric names
the Grafana board queries."""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve.json"
# What only a cluster with the elastic controller and path choice exports (checked in test_e2e_auto.py).
AUTO_ONLY_METRICS = {"pdserve:elastic_decisions_total", "pdserve:ttft_prediction_ratio_bucket"}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


@contextlib.contextmanager
def dashboard_page(url: str) -> Iterator[tuple[object, list[str]]]:
    """(page showing ``url``/dashboard with its first workers drawn, the console errors seen so far)."""
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/dashboard")
            page.wait_for_selector("#workers tbody tr[data-worker]", timeout=30_000)
            yield page, errors
        finally:
            browser.close()


def grafana_metric_names() -> set[str]:
    """Every metric name the Grafana board's queries and variables use."""
    board = json.loads(GRAFANA.read_text())
    queries = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    queries += [v["definition"] for v in board["templating"]["list"] if v.get("definition")]
    return {n for q in queries for n in re.findall(r"\b(?:vllm|pdserve):[A-Za-z0-9_:]+", q)}


def metrics(url: str) -> dict[str, list]:
    """/metrics as {sample name: samples}."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out
