"""A pdserve worker as a Ray actor: the actor's process is the worker process.

Ray places the actor (by its pool's resources, in its pool's placement group) and starts it; the actor's
constructor builds the worker as ``pdserve worker`` would (the same arguments), bound on the node's address
(``ray.util.get_node_ip_address``, never 127.0.0.1 unless that is what Ray calls the node), with the node's
id as its KV node name (``kv.connector.node_name``: the ``auto`` connector uses shared memory between
workers of one node, TCP across nodes), then runs the worker's busy loop on a thread of its own; Ray's
calls (``record``, ``stop``) are answered meanwhile. The cluster's keys come in the actor's runtime
environment (``PDSERVE_CLUSTER_KEYS``), never on a command line: every internal socket is CURVE.

Ray restarts an actor whose process dies (``max_restarts``): the constructor runs again, on new ports, and
the frontend finds the new address through Ray (server/ray_directory.py). A worker loop that fails ends the
process, so that Ray restarts it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

logger = logging.getLogger(__name__)


class WorkerActor:
    """Wrapped by ``ray.remote`` in ``cluster/ray_launcher.py`` (this module imports no ray at import time)."""

    def __init__(self, worker_args: list[str], name: str) -> None:
        import ray

        from pdserve.kv.connector import NODE_ENV
        from pdserve.worker.main import add_worker_args, build_worker

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
        start = time.monotonic()
        context = ray.get_runtime_context()
        self.name = name
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.resources = context.get_assigned_resources()
        self.restarts = int(context.was_current_actor_reconstructed)
        os.environ[NODE_ENV] = self.node_id
        parser = argparse.ArgumentParser(f"pdserve worker ({name})")
        add_worker_args(parser)
        args = parser.parse_args([*worker_args, "--host", self.node_ip])
        if args.threads is None:  # as many torch threads as the CPUs Ray gave it (it pins nothing)
            args.threads = max(1, int(self.resources.get("CPU", 1)))
        self.worker = build_worker(args)
        self.startup_s = time.monotonic() - start
        self._thread = threading.Thread(target=self._run, name="pdserve-worker", daemon=True)
        self._thread.start()
        logger.info("%s on node %s (%s): %s, ready in %.1f s", name, self.node_ip, self.node_id[:8],
                    self.worker.address, self.startup_s)

    def record(self) -> dict:
        """Where this worker listens and where Ray placed it."""
        return {**self.worker.ready_record(), "actor": self.name, "node_id": self.node_id, "node_ip": self.node_ip,
                "resources": self.resources, "restarted": bool(self.restarts), "startup_s": round(self.startup_s, 3)}

    def stop(self) -> None:
        """Stop the loop and close the worker's sockets (and its shared-memory cache file)."""
        self.worker.stop()
        self._thread.join(30.0)
        self.worker.close()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException:
            logger.exception("%s: the worker loop failed; ending the process so that Ray restarts it", self.name)
            os._exit(1)
