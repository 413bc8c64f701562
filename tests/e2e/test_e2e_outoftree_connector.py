"""A KV connector that lives outside pdserve (tests/e2e/file_kv_connector.py, files instead of sockets),
registered by ``module:Class`` alone: disaggregated requests through it give the offline engine's tokens,
with the official openai client, and every block is free afterwards."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import e2e_checks as checks
from cluster_helpers import local_cluster, require_model, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    require_model()
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "PDSERVE_FILE_KV_DIR": str(tmp_path_factory.mktemp("file-kv"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with local_cluster("--prefill", "1", "--decode", "1",
                           "--kv-connector", "file_kv_connector:FileKVConnector") as (base, _):
            yield base
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_requests_travel_through_the_out_of_tree_connector(url):
    checks.check_greedy_matches_offline(url)
    h = wait_idle(url)
    decode = next(w for w in h["workers"] if w["role"] == "decode")
    assert decode["num_free_blocks"] == decode["num_blocks"]


def test_the_transfers_went_through_files(url):
    """The prefill worker reports its transfers (PrefillDone) in /metrics: the KV moved, nothing recomputed."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    sent = [line for line in text.splitlines() if line.startswith("pdserve:kv_transfer_bytes_total")]
    assert sent and float(sent[0].split()[-1]) > 0, sent
