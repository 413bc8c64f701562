"""End to end with internal sockets on every interface (`pdserve up --internal-host 0.0.0.0`): the launcher's
cluster keys reach every process through the environment, every internal socket speaks CURVE (control, KV
data plane, heartbeats), requests are served exactly as on loopback, and a raw connection to a worker's
control port without the keys gets nothing."""
from __future__ import annotations

import pytest
import zmq

import e2e_checks as checks
from cluster_helpers import health, local_cluster, require_model

from pdserve import protocol as p

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def url():
    require_model()
    with local_cluster("--prefill", "1", "--decode", "1", "--internal-host", "0.0.0.0") as (base, _):
        yield base


def test_served_over_authenticated_internal_sockets(url):
    checks.check_greedy_matches_offline(url)
    assert all(w["alive"] for w in health(url)["workers"])  # heartbeats arrive


def test_a_raw_connection_without_keys_gets_nothing(url):
    worker = health(url)["workers"][0]
    port = int(worker["address"].rsplit(":", 1)[1])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send(p.encode(p.Hello("intruder")))
        sock.send(p.encode(p.Shutdown()))
        assert not sock.poll(3000)
    finally:
        sock.close(0)
        ctx.term()
    assert all(w["alive"] for w in health(url)["workers"])  # the Shutdown never arrived
