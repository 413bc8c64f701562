"""End to end, colocated (one worker of role both): the baseline the disaggregated cluster must match."""
from __future__ import annotations

import pytest

from cluster_helpers import local_cluster, require_model
import e2e_checks as checks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    require_model()
    config = tmp_path_factory.mktemp("cluster") / "best-cluster.yaml"  # as the planner writes one
    config.write_text("model: smollm2-135m\nengine: {max_num_seqs: 32}\nserving: {mode: colocated, colocated: 1}\n"
                      "planning: {hardware: cpu-this-machine, tp: 1}\n")
    with local_cluster("--config", str(config)) as (base, _):
        yield base


def test_greedy_matches_offline(url):
    checks.check_greedy_matches_offline(url)


def test_chat_matches_offline(url):
    checks.check_chat_matches_offline(url)


def test_bad_input_then_served(url):
    checks.check_bad_input_then_served(url)


def test_disconnects_free_blocks(url):
    checks.check_disconnects_free_blocks(url)
