"""End to end, ``pdserve up --mode auto`` (the default): a prefill and a decode worker under the elastic
controller. Cores move and roles change in the middle of a load of concurrent requests (through the
controller's own decision path, ``POST /debug/elastic``): no request is lost, every greedy output equals
the offline engine's (float32), every block comes back and the pools' bookkeeping holds. A worker killed
right after its role change: every request ends, with tokens or a clear error, nothing hangs. The dashboard
shows the controller's decisions and the parked worker, whose core-seconds (its cost) stop growing."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

import e2e_checks as checks
from cluster_helpers import MODEL, health, local_cluster, offline_reference, require_model
from dashboard_checks import AUTO_ONLY_METRICS, dashboard_page, grafana_metric_names, metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def url():
    require_model()
    with local_cluster("--mode", "auto", "--slo-tpot", "0.5", "--slo-ttft", "10") as (base, _):
        yield base


def _cluster(url: str) -> dict:
    return httpx.get(f"{url}/v1/cluster", timeout=10).json()


def _workers(url: str) -> dict:
    return {w["role"] if w["role"] != "both" else "decode": w for w in _cluster(url)["workers"]}


def _decide(url: str, **decision) -> None:
    r = httpx.post(f"{url}/debug/elastic", json=decision, timeout=10)
    assert r.status_code == 200, r.text


def _wait(pred, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_starts_colocated_with_a_step_target(url):
    c = _cluster(url)
    assert c["mode"] == "auto" and c["path_choice"] and c["elastic"]["objectives"]["tpot_s"] == 0.5
    w = _workers(url)
    cores = sorted(os.sched_getaffinity(0))
    _wait(lambda: _workers(url)["prefill"]["cores"] == [] and _workers(url)["decode"]["cores"] == cores,
          "the prefill worker's cores did not move to the decode worker")
    assert w["decode"]["step_target_s"] == pytest.approx(0.45)
    kinds = [d["kind"] for d in c["elastic"]["decisions"]]
    assert "SetStepTarget" in kinds


def test_dashboard_shows_the_controller_and_a_parked_worker_costs_nothing(url):
    checks.client(url).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                          temperature=0)  # a path-choice prediction, a busy decode worker
    cores = sorted(os.sched_getaffinity(0))
    def parked_and_reported(w: dict) -> bool:  # the router parks it at once; the worker's stats follow
        return w["core_s"] > 0 and bool(w.get("is_parked")) and w["num_cores"] == 0

    _wait(lambda: parked_and_reported(_workers(url)["prefill"]), "the prefill worker did not report being parked")
    parked = _workers(url)["prefill"]
    assert parked["num_cores"] == 0 and parked["price_per_hour"] == 0.0 and parked["device"] == "cpu"
    decode = _workers(url)["decode"]
    assert decode["num_cores"] == len(cores) and decode["price_per_hour"] > 0
    # the parked worker's core-seconds stay as they were while the decode worker's grow
    _wait(lambda: _workers(url)["decode"]["uptime_s"] > decode["uptime_s"] + 1.0, "no fresh stats")
    later = _workers(url)
    assert later["prefill"]["uptime_s"] > parked["uptime_s"] and later["prefill"]["core_s"] == parked["core_s"]
    assert later["decode"]["core_s"] > decode["core_s"]
    c = _cluster(url)
    assert c["cost"]["price_per_hour"] == pytest.approx(decode["price_per_hour"])
    assert c["elastic"]["decisions"] and c["attainment"]["num_requests"] >= 1
    assert "pdserve:elastic_decisions_total" in metrics(url)  # a Grafana panel's (the rest: next test)
    with dashboard_page(url) as (page, errors):
        assert "auto" in page.inner_text("#mode")
        page.wait_for_selector("#decisions li[data-kind='SetStepTarget']", timeout=30_000)
        assert "objectives TTFT" in page.inner_text("#elastic-status")
        assert "parked" in page.inner_text(f"#workers tr[data-worker='{parked['worker_id']}']")
    assert not errors, f"console errors on the dashboard: {errors}"


def test_cores_and_roles_move_under_load_and_nothing_is_lost(url):
    load = checks.GreedyLoad(url, 18)
    load.start(9)
    w = _workers(url)
    decode, prefill = w["decode"]["worker_id"], w["prefill"]["worker_id"]
    cores = sorted(os.sched_getaffinity(0))
    # a core to the prefill worker (split), mid-load
    _decide(url, kind="MoveCores", src=decode, dst=prefill, src_cores=cores[:-1] or cores,
            dst_cores=cores[-1:])
    load.start(3)
    # the prefill worker becomes a decode worker and back: its running requests finish where they are
    _decide(url, kind="ChangeRole", worker_id=prefill, role="decode")
    load.start(3)
    time.sleep(1.0)
    _decide(url, kind="ChangeRole", worker_id=prefill, role="prefill")
    _decide(url, kind="SetStepTarget", worker_id=decode, step_target_s=0.05)
    load.check()  # the rest start now
    kinds = [d["kind"] for d in _cluster(url)["elastic"]["decisions"]]
    assert {"MoveCores", "ChangeRole", "SetStepTarget"} <= set(kinds)
    # the path choice reports its choices and how far its predictions were from the TTFTs that came
    text = httpx.get(f"{url}/metrics", timeout=10).text
    paths = {line.split("\"")[1]: float(line.split()[-1]) for line in text.splitlines()
             if line.startswith("pdserve:prefill_path_total{")}
    assert sum(paths.values()) >= 18, paths
    ratios = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("pdserve:ttft_prediction_ratio_count")]
    assert sum(ratios) >= 1, text[:2000]
    # with a prefill worker on a core, path choice predicted TTFTs: every Grafana metric exists here
    missing = (grafana_metric_names() & AUTO_ONLY_METRICS) - set(metrics(url))
    assert not missing, missing


def test_a_worker_killed_during_a_role_change(url):  # last: it kills a worker
    prompt_ids, _, _ = offline_reference()
    w = _workers(url)
    victim = w["prefill"]
    results: list = []

    def request():
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt_ids[1],
                                                          "max_tokens": 24, "temperature": 0}, timeout=120)
            results.append(r.status_code)
        except httpx.HTTPError as e:  # a hang shows up here as a timeout
            results.append(e)

    _decide(url, kind="ChangeRole", worker_id=victim["worker_id"], role="decode")
    threads = [threading.Thread(target=request) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(150)
    assert len(results) == 6 and all(code in (200, 503) for code in results), results
    _wait(lambda: not next(x for x in health(url)["workers"] if x["worker_id"] == victim["worker_id"])["alive"],
          "the dead worker still shows alive")
    assert health(url)["status"] == "ok"
    checks.check_greedy_matches_offline(url)  # the survivor serves everything
