"""End to end, colocated (one worker of role both): the baseline the disaggregated cluster must match.

The cluster is the one ``pdserve plan`` chose for this machine (one core pair, colocated), started with
``pdserve up --config best-cluster.yaml``: the planner's predicted cost sits beside the live one."""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster_helpers import MODEL, local_cluster, require_model
import e2e_checks as checks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> dict:
    """``pdserve plan`` for one unit of this machine, colocated: its best-cluster.yaml, read."""
    out = tmp_path_factory.mktemp("plan")
    subprocess.run([sys.executable, "-m", "pdserve.cli", "plan", "--model", "smollm2-135m", "--hardware",
                    "cpu-this-machine", "--cards", "1", "--modes", "colocated", "--num-requests", "20",
                    "--input-len", "128", "--output-len", "16", "--rate", "1", "--slo-ttft", "10", "--slo-tpot", "2",
                    "--out-dir", str(out), "--no-progress"], check=True, timeout=300, capture_output=True)
    return {"path": out / "best-cluster.yaml", "file": yaml.safe_load((out / "best-cluster.yaml").read_text())}


@pytest.fixture(scope="module")
def url(plan):
    require_model()
    assert plan["file"]["serving"]["mode"] == "colocated"
    with local_cluster("--config", str(plan["path"])) as (base, _):
        yield base


def test_the_plans_cost_sits_beside_the_live_cost(url, plan):
    r = checks.client(url).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8)
    assert r.usage.completion_tokens > 0  # tokens served, so the live figures exist
    time.sleep(1.0)  # one more Stats from the worker: the busy time of its last steps included
    predicted = plan["file"]["predicted"]
    cost = httpx.get(f"{url}/v1/cluster", timeout=10).raise_for_status().json()["cost"]
    planned = cost["planned"]
    assert planned["price_per_hour"] == pytest.approx(predicted["price_per_hour"])
    assert planned["goodput_rps"] == pytest.approx(predicted["predicted_goodput_rps"])
    expected = {"input": predicted["cost_per_mtok"]["uncached_input_per_mtok"],
                "cached_input": predicted["cost_per_mtok"]["cached_input_per_mtok"],
                "output": predicted["cost_per_mtok"]["output_per_mtok"],
                "blended": predicted["cost_per_mtok"]["blended_per_mtok"]}
    assert planned["cost_per_million_tokens"] == pytest.approx(expected)
    assert cost["windows"]["total"]["cost_per_million_tokens"]["output"] > 0  # the live figure beside it
    text = httpx.get(f"{url}/metrics", timeout=10).raise_for_status().text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    exported = {s.labels["kind"]: s.value for s in families["pdserve:planned_cost_per_million_tokens"].samples}
    assert exported == pytest.approx(expected)
    assert "pdserve:cost_per_million_tokens" in families


def test_greedy_matches_offline(url):
    checks.check_greedy_matches_offline(url)


def test_chat_matches_offline(url):
    checks.check_chat_matches_offline(url)


def test_bad_input_then_served(url):
    checks.check_bad_input_then_served(url)


def test_disconnects_free_blocks(url):
    checks.check_disconnects_free_blocks(url)
