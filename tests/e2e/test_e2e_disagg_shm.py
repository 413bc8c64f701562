"""End to end, disaggregated (1 prefill + 1 decode worker), KV over shared memory."""
from __future__ import annotations

import pytest

from cluster_helpers import local_cluster, require_model
import e2e_checks as checks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def url():
    require_model()
    with local_cluster("--prefill", "1", "--decode", "1", "--kv-connector", "shm") as (base, _):
        yield base


def test_greedy_matches_offline(url):
    checks.check_greedy_matches_offline(url)


def test_seeded_sampling_matches_offline(url):
    checks.check_seeded_matches_offline(url)


def test_chat_matches_offline(url):
    checks.check_chat_matches_offline(url)


def test_kv_integrity(url):
    checks.check_kv_integrity(url)


def test_bad_input_then_served(url):
    checks.check_bad_input_then_served(url)


def test_disconnects_free_blocks(url):
    checks.check_disconnects_free_blocks(url)
