"""A Ray cluster for one test module (Ray's own test utility: nodes on this machine) and `pdserve up` on it,
stopped with SIGTERM and checked to leave nothing of itself in Ray."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from cluster_helpers import stop

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # as pdserve.cluster.ray_launcher: Ray on loopback
NODE_ARGS = dict(object_store_memory=80 * 2**20, node_ip_address="127.0.0.1")


@contextlib.contextmanager
def ray_test_cluster(*nodes: dict):
    """A head node and more, each ``{"num_cpus": N, "resources": {...}}``; this test's driver connected to it
    (to look at the actors, and kill one)."""
    os.environ.update(LOOPBACK_ENV)  # before Ray is imported: it reads it then
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    import ray
    from ray.cluster_utils import Cluster

    head, *others = nodes
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **head, **NODE_ARGS))
    for node in others:
        cluster.add_node(**node, **NODE_ARGS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextlib.contextmanager
def ray_up(config: dict, directory: Path, *argv: str):
    """`pdserve up --config` (``config`` written as a cluster file in ``directory``) with ``argv``; yields (url,
    /v1/cluster at start, log path). After SIGTERM: its actors and placement groups are gone from Ray."""
    import ray

    from pdserve.cluster.local import free_port, wait_healthy

    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = Path(os.environ.get("PDSERVE_E2E_LOG_DIR", "/tmp")) / f"pdserve-e2e-ray-{port}.log"
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--config", str(path), "--port", str(port), *argv]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, 600)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {log}:\n{log.read_text()[-4000:]}") from None
        status = httpx.get(f"{url}/v1/cluster", timeout=30).json()
        yield url, status, log
    finally:
        stop(proc, log, 60)
    namespace = status["ray"]["namespace"]
    deadline = time.monotonic() + 30
    while True:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]
        groups = [g for g in ray.util.placement_group_table().values()
                  if g["name"].startswith(namespace) and g["state"] != "REMOVED"]
        if not actors and not groups:
            break
        assert time.monotonic() < deadline, f"left in Ray after stop: actors {actors}, placement groups {groups}"
        time.sleep(0.5)
