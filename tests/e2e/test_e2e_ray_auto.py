"""End to end, `pdserve up --ray` in auto mode (its default without a layout flag): the elastic controller and
path choice run in the frontend; Ray's actors are not pinned to cores, so nothing is parked or colocated at
start and the controller moves step time and roles (as on GPUs). A role change in the middle of a load of
concurrent requests, through the controller's own decision path: no request lost, every greedy output equal
to the offline engine's, every block back, the pools' bookkeeping intact."""
from __future__ import annotations

import time

import httpx
import pytest

import e2e_checks as checks
from cluster_helpers import DTYPE, KV_CACHE, MODEL, require_model
from ray_helpers import ray_test_cluster, ray_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    require_model()
    with ray_test_cluster({"num_cpus": 2}) as cluster:
        config = {"model": MODEL, "engine": {"kv_cache_memory": KV_CACHE, "dtype": DTYPE},
                  "serving": {"mode": "auto", "backend": "ray", "ray": {"address": cluster.address}}}
        with ray_up(config, tmp_path_factory.mktemp("ray-auto"), "--enable-debug-endpoints", "--slo-tpot", "0.5",
                    "--slo-ttft", "10") as (base, _, _):
            yield base


def _cluster(url: str) -> dict:
    return httpx.get(f"{url}/v1/cluster", timeout=10).json()


def _decide(url: str, **decision) -> None:
    r = httpx.post(f"{url}/debug/elastic", json=decision, timeout=10)
    assert r.status_code == 200, r.text


def _roles(url: str) -> dict[str, str]:
    return {w["worker_id"]: w["role"] for w in _cluster(url)["workers"]}


def _wait_roles(url: str, want: dict[str, str], timeout_s: float = 30.0) -> None:
    """Until the workers report these roles (a stats message sent before a change may still arrive after it)."""
    deadline = time.monotonic() + timeout_s
    while _roles(url) != want:
        assert time.monotonic() < deadline, _roles(url)
        time.sleep(0.2)


def test_the_controller_runs_and_nothing_is_pinned_or_parked(url):
    c = _cluster(url)
    assert c["mode"] == "auto" and c["path_choice"] and c["elastic"]["objectives"]["tpot_s"] == 0.5
    assert _roles(url) == {"prefill-0": "prefill", "decode-1": "decode"}
    deadline = time.monotonic() + 30
    while True:
        workers = {w["worker_id"]: w for w in _cluster(url)["workers"]}
        if workers["decode-1"]["step_target_s"] == pytest.approx(0.45):
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)
    for w in workers.values():
        assert w["cores"] is None and not w["is_parked"], w  # Ray accounts for the CPUs; no core moves
    assert "MoveCores" not in [d["kind"] for d in _cluster(url)["elastic"]["decisions"]]


def test_a_role_changes_under_load_and_nothing_is_lost(url):
    load = checks.GreedyLoad(url, 12)
    load.start(6)
    time.sleep(0.5)
    _decide(url, kind="ChangeRole", worker_id="prefill-0", role="decode")  # its running requests finish there
    _wait_roles(url, {"prefill-0": "decode", "decode-1": "decode"})
    load.start(3)
    time.sleep(1.0)
    _decide(url, kind="ChangeRole", worker_id="prefill-0", role="prefill")
    load.check()  # the rest start now; every request ends with the offline tokens, every block back
    _wait_roles(url, {"prefill-0": "prefill", "decode-1": "decode"})
    assert "ChangeRole" in [d["kind"] for d in _cluster(url)["elastic"]["decisions"]]
