"""End to end, `pdserve up --ray` in auto mode (the default): the elastic controller and path choice run in
the frontend; Ray's actors are not pinned to cores, so nothing is parked or colocated at start and the
controller moves step time and roles (as on GPUs). A role change in the middle of a load of concurrent
requests, through the controller's own decision path: no request lost, every greedy output equal to the
offline engine's, every block back, the pools' bookkeeping intact."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

import e2e_checks as checks
from cluster_helpers import DTYPE, KV_CACHE, MAX_TOKENS, MODEL, offline_reference, require_model, \
    token_ids_from_logprobs, wait_idle
from ray_helpers import ray_test_cluster, ray_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    require_model()
    with ray_test_cluster({"num_cpus": 2}) as cluster:
        config = {"model": MODEL, "engine": {"kv_cache_memory": KV_CACHE, "dtype": DTYPE},
                  "serving": {"backend": "ray", "ray": {"address": cluster.address}}}
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


def test_auto_is_the_default_and_nothing_is_pinned_or_parked(url):
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
    prompt_ids, expected, _ = offline_reference()
    results: dict[int, list[int] | Exception] = {}

    def run(i):
        try:
            r = checks.client(url).completions.create(
                model=MODEL, prompt=prompt_ids[i % len(prompt_ids)], max_tokens=MAX_TOKENS, temperature=0,
                logprobs=0, extra_body={"return_tokens_as_token_ids": True})
            results[i] = token_ids_from_logprobs(r.choices[0].logprobs.tokens)
        except Exception as e:  # noqa: BLE001 - recorded and asserted on below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads[:6]:
        t.start()
    time.sleep(0.5)
    _decide(url, kind="ChangeRole", worker_id="prefill-0", role="decode")  # its running requests finish there
    _wait_roles(url, {"prefill-0": "decode", "decode-1": "decode"})
    for t in threads[6:9]:
        t.start()
    time.sleep(1.0)
    _decide(url, kind="ChangeRole", worker_id="prefill-0", role="prefill")
    for t in threads[9:]:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 12
    for i, got in results.items():
        assert got == expected[i % len(expected)], (i, got)
    h = wait_idle(url)
    assert all(w["num_free_blocks"] == w["num_blocks"] for w in h["workers"])
    integrity = httpx.post(f"{url}/debug/check_integrity", timeout=30).json()["workers"]
    assert integrity and all(v == "" for v in integrity.values()), integrity
    _wait_roles(url, {"prefill-0": "prefill", "decode-1": "decode"})
    assert "ChangeRole" in [d["kind"] for d in _cluster(url)["elastic"]["decisions"]]
