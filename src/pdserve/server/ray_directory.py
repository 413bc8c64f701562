"""Where the frontend finds its workers on a Ray cluster: the named actors of a namespace.

``pdserve up --ray`` starts each worker as a named actor in a namespace of its own and the frontend with
``--ray-address/--ray-namespace``. The frontend connects to Ray as a driver and asks every actor of the
namespace where it listens (``WorkerActor.record``), again every ``REFRESH_S``: a worker that Ray restarted
(on new ports, maybe on another node) shows up with its new address and the frontend re-admits it there. It
also keeps Ray's view of the cluster (nodes, resources) for ``/v1/cluster``'s ``ray`` section.

``poll`` blocks (Ray calls): the frontend runs it on a thread (``asyncio.to_thread``); ``status`` only reads
what the last poll saw.
"""
from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)

REFRESH_S = 2.0  # how often each worker is asked again where it listens
NODES_REFRESH_S = 5.0


class RayDirectory:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._ray = None
        self._handles: dict[str, object] = {}  # actor name -> handle
        self._pending: dict[str, tuple[object, float]] = {}  # actor name -> (record ref, asked at)
        self._asked_at: dict[str, float] = {}
        self._records: dict[str, dict] = {}  # actor name -> its last record
        self._down: set[str] = set()  # actors whose last call failed (logged once until they answer)
        self._nodes: list[dict] = []
        self._resources: dict = {}
        self._nodes_at = 0.0
        self._lock = threading.Lock()

    def connect(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, namespace=self.namespace, logging_level=logging.WARNING,
                     log_to_driver=False)
        self._ray = ray

    def poll(self) -> list[dict]:
        """Every worker's latest record (address, worker id, node, resources); blocks on Ray for up to a
        second. Workers being (re)started answer once they are up."""
        ray = self._ray
        if ray is None:
            self.connect()
            ray = self._ray
        from ray.exceptions import RayActorError, RayError

        now = time.monotonic()
        names = [a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors()]
        for name in names:
            if name not in self._handles:
                try:
                    self._handles[name] = ray.get_actor(name, namespace=self.namespace)
                except ValueError:  # gone meanwhile
                    continue
            if name not in self._pending and now - self._asked_at.get(name, 0.0) >= REFRESH_S:
                self._pending[name] = (self._handles[name].record.remote(), now)
                self._asked_at[name] = now
        if self._pending:
            refs = {ref: name for name, (ref, _) in self._pending.items()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=1.0)
            for ref in ready:
                name = refs[ref]
                del self._pending[name]
                try:
                    record = ray.get(ref)
                except RayActorError as e:  # died: Ray restarts it (or not); asked again later
                    if name not in self._down:
                        self._down.add(name)
                        logger.info("worker actor %s is down: %s", name, str(e).splitlines()[0])
                    continue
                except RayError as e:
                    logger.warning("worker actor %s did not answer: %s", name, e)
                    continue
                self._down.discard(name)
                with self._lock:
                    old = self._records.get(name)
                    if old is not None and old.get("address") != record.get("address"):
                        logger.warning("worker %s moved: %s -> %s (node %s)", name, old.get("address"),
                                       record.get("address"), record.get("node_ip"))
                    self._records[name] = record
        if now - self._nodes_at >= NODES_REFRESH_S:
            self._nodes_at = now
            nodes = [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "alive": n["Alive"],
                      "resources": _plain(n.get("Resources", {})), "labels": n.get("Labels", {})} for n in ray.nodes()]
            resources = {"total": _plain(ray.cluster_resources()), "available": _plain(ray.available_resources())}
            with self._lock:
                self._nodes, self._resources = nodes, resources
        with self._lock:
            return [dict(r) for r in self._records.values()]

    def status(self) -> dict:
        """Ray's facts for ``/v1/cluster``: the cluster, its nodes and resources, and where each worker runs."""
        with self._lock:
            workers = {r.get("worker_id", name): {"actor": name, "node_id": r.get("node_id"),
                                                  "node_ip": r.get("node_ip"), "resources": r.get("resources"),
                                                  "restarted": r.get("restarted", False),
                                                  "address": r.get("address")}
                       for name, r in self._records.items()}
            return {"address": self.address, "namespace": self.namespace, "nodes": list(self._nodes),
                    "resources": dict(self._resources), "workers": workers}

    def close(self) -> None:
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()


def _plain(resources: dict) -> dict:
    """Resources without Ray's per-placement-group bookkeeping entries (``CPU_group_<id>``, ``bundle_group_...``)."""
    return {k: v for k, v in resources.items() if "_group_" not in k}
