"""End to end, disaggregated (1 prefill + 1 decode worker), KV over TCP; ends by killing workers."""
from __future__ import annotations

import pytest

from cluster_helpers import local_cluster, require_model
import e2e_checks as checks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def url():
    require_model()
    with local_cluster("--prefill", "1", "--decode", "1", "--kv-connector", "tcp") as (base, _):
        yield base


def test_greedy_matches_offline(url):
    checks.check_greedy_matches_offline(url)


def test_kv_integrity(url):
    checks.check_kv_integrity(url)


def test_disconnects_free_blocks(url):
    checks.check_disconnects_free_blocks(url)


def test_worker_killed(url):  # last: it kills the cluster's workers
    checks.check_worker_killed(url)
