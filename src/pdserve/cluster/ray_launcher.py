"""``pdserve up --ray [ADDRESS]``: the workers as Ray actors on a Ray cluster, the frontend on this machine.

Ray places, starts and restarts the workers; pdserve keeps its own request and KV data planes (ZMQ, shared
memory, TCP). The launcher:

1. connects to the Ray cluster at ADDRESS (or RAY_ADDRESS), or starts a local one (no dashboard, a small
   object store, on loopback: ``LOOPBACK_ENV``), in a namespace of its own (``pdserve-<id>``);
2. reserves a placement group per pool (prefill, decode, colocated) of one bundle per worker, each the
   resources the pool asks (``Placement``: CPUs, GPUs, custom resources such as one naming an accelerator
   kind, node labels), so prefill can run on one kind of node and decode on another; a pool the cluster cannot
   hold is a clear error;
3. starts one named actor per worker in its pool's group (``cluster/ray_actor.py``: the actor's process is
   the worker), with the cluster's keys in its runtime environment, and KV connector ``auto`` unless one is
   named (shared memory or CUDA IPC within a node, TCP across, chosen per pair by where Ray placed them);
4. starts the frontend here, which finds the workers through Ray (server/ray_directory.py) rather than a
   list of addresses, follows them as Ray restarts them, and shows Ray's facts in ``/v1/cluster``;
5. prints where each worker runs; on Ctrl-C or SIGTERM stops the frontend, the actors and the placement
   groups (and the local Ray cluster it started).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field

from pdserve import security
from pdserve.cluster.local import _spawn, frontend_argv, print_ready, wait_healthy
from pdserve.cluster.store_server import KINDS as STORE_KINDS
from pdserve.server.auth import API_KEY_ENV
from pdserve.server.main import frontend_env
from pdserve.server.monitor_args import monitor_options_from_args
from pdserve.settings import engine_argv, engine_config_from_args, store_argv, store_config_from_args

logger = logging.getLogger(__name__)

# Ray resolves 127.0.0.1 in a cluster address to the host's outward address unless told the cluster is a
# local one; a cluster on loopback (one machine: the one `pdserve up --ray` starts, or tests) needs this in
# every process that connects to it.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray's C++ core dumps a stack trace on SIGTERM in every process that connects to it; for pdserve's launcher
# and frontend a SIGTERM is the normal way to stop.
QUIET_STOP_ENV = {"RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # pdserve moves no data through Ray's object store
STOP_GRACE_S = 10.0
POOL_ROLES = {"prefill": "prefill", "decode": "decode", "colocated": "both"}


@dataclass(frozen=True)
class Placement:
    """What one worker of a pool asks of Ray: CPUs, GPUs, custom resources (``{"h100": 1}``: a node that
    advertises the resource), node labels (``{"accelerator": "h100"}``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    label_selector: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or any(v < 0 for v in self.resources.values()):
            raise ValueError(f"a placement asks for negative resources: {self}")

    def bundle(self) -> dict[str, float]:
        out = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        return {k: v for k, v in out.items() if v}


def placements_from(spec: dict | None) -> dict[str, Placement]:
    """``{pool: {num_cpus, num_gpus, resources, label_selector}}`` (a cluster file's ``serving.ray.pools``,
    or ``--ray-placement``'s JSON) as ``Placement``s; ValueError naming what is wrong."""
    out = {}
    for pool, fields in (spec or {}).items():
        if pool not in POOL_ROLES:
            raise ValueError(f"unknown pool {pool!r} in the Ray placement (pools: {', '.join(POOL_ROLES)})")
        try:
            out[pool] = Placement(**fields)
        except TypeError as e:
            raise ValueError(f"Ray placement of the {pool} pool: {e}") from e
    return out


@dataclass
class _Pool:
    name: str
    role: str
    placement: Placement
    group: object = None  # its placement group
    actors: list = field(default_factory=list)  # (name, handle)


class RayCluster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.namespace = getattr(args, "ray_namespace", None) or f"pdserve-{uuid.uuid4().hex[:8]}"
        self.pools: list[_Pool] = []
        self.frontend: subprocess.Popen | None = None
        self.records: dict[str, dict] = {}
        self.started_ray = False
        self._stopping = False
        self._ray = None
        self.env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}  # workers need no API key
        self.frontend_env = frontend_env(args)  # the API key, for the frontend only (ValueError: a bad key file)
        if security.ENV not in self.env:  # every internal socket on Ray is CURVE (they bind the node's address)
            self.env[security.ENV] = security.ClusterKeys.generate().to_env()

    # -- public --------------------------------------------------------------------------------------
    def start(self, ready_timeout_s: float = 600.0) -> str:
        """Connect (or start Ray), place and start the workers, start the frontend; the base URL once
        /health answers. RuntimeError or ValueError (after stopping what started) otherwise."""
        t0 = time.monotonic()
        ray = self._connect()
        logger.info("Ray: %s, namespace %s (%.1f s)", self.gcs_address, self.namespace, time.monotonic() - t0)
        self.pools = self._plan()
        deadline = time.monotonic() + ready_timeout_s
        for pool in self.pools:
            self._reserve(ray, pool, deadline)
        for pool in self.pools:
            self._start_actors(ray, pool)
        for pool in self.pools:
            for name, actor in pool.actors:
                self.records[name] = self._wait_record(ray, name, actor, deadline)
        node_ip = ray.util.get_node_ip_address()
        a = self.args
        a.internal_host = node_ip  # workers on other nodes reach the frontend's heartbeat socket here
        argv = frontend_argv(a, ["--ray-address", self.gcs_address, "--ray-namespace", self.namespace])
        self.frontend = _spawn(argv, self._frontend_env())
        url = f"http://{a.host}:{a.port}"
        wait_healthy(url, self.frontend, deadline - time.monotonic(), poll_s=0.2)
        self.startup_s = time.monotonic() - t0
        return url

    def placement_lines(self) -> list[str]:
        """Where each worker runs: one line per worker."""
        lines = []
        for pool in self.pools:
            for name, _ in pool.actors:
                r = self.records.get(name, {})
                resources = ", ".join(f"{k} {v:g}" for k, v in sorted(r.get("resources", {}).items()))
                lines.append(f"  {r.get('worker_id', name):<12} {pool.role:<8} node {r.get('node_ip', '?')} "
                             f"({r.get('node_id', '?')[:8]})  {resources}  {r.get('address', '?')}")
        return lines

    def wait(self) -> int:
        """Until a signal (0) or the frontend's exit (its code). Ray restarts dead workers by itself."""
        while not self._stopping:
            code = self.frontend.poll() if self.frontend is not None else None
            if code is not None:
                logger.error("the frontend exited with code %s", code)
                return code or 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        """Stop the frontend, then every actor and placement group of this cluster; idempotent."""
        self._stopping = True
        if self.frontend is not None and self.frontend.poll() is None:
            self.frontend.send_signal(signal.SIGTERM)
            try:
                self.frontend.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.frontend.kill()
                self.frontend.wait()
        ray = self._ray
        if ray is None:
            return
        from ray.util.placement_group import remove_placement_group

        actors = [actor for pool in self.pools for _, actor in pool.actors]
        stops = [actor.stop.remote() for actor in actors]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=STOP_GRACE_S)  # sockets and /dev/shm files closed
        for actor in actors:
            ray.kill(actor, no_restart=True)
        for pool in self.pools:
            if pool.group is not None:
                remove_placement_group(pool.group)
        self.pools = []
        ray.shutdown()  # a local cluster this launcher started stops with it
        self._ray = None

    # -- private -------------------------------------------------------------------------------------
    def _connect(self):
        address = self.args.ray or os.environ.get("RAY_ADDRESS") or None
        self.started_ray = address is None
        os.environ.update(QUIET_STOP_ENV)
        self.env.update(QUIET_STOP_ENV)
        if address is None or security.is_loopback(address.rsplit(":", 1)[0].removeprefix("ray://")):
            os.environ.update(LOOPBACK_ENV)
            self.env.update(LOOPBACK_ENV)
        import ray

        self._ray = ray
        options = dict(namespace=self.namespace, logging_level=logging.WARNING,
                       runtime_env={"env_vars": self._actor_env()})
        if address is None:  # a local cluster on this machine's cores, on loopback
            ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     _node_ip_address="127.0.0.1", **options)
        else:
            ray.init(address=address, **options)
        self.gcs_address = ray.get_runtime_context().gcs_address
        # What Ray settled for this cluster (a local start turns token authentication on, RAY_AUTH_MODE)
        # goes to the frontend too, which connects to it.
        self.env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_")})
        return ray

    def _actor_env(self) -> dict[str, str]:
        """What every actor's process gets in its environment: the cluster's keys, and the pdserve this
        launcher runs (its source folder, for a checkout that is not installed on the nodes)."""
        import pdserve

        env = {security.ENV: self.env[security.ENV]}
        src = os.path.dirname(os.path.dirname(os.path.abspath(pdserve.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        for key in ("PDSERVE_CACHE", "PDSERVE_FAULTS", "PDSERVE_KV_VERIFY", "PDSERVE_CPU_KERNELS", *LOOPBACK_ENV):
            if key in self.env:
                env[key] = self.env[key]
        return env

    def _frontend_env(self) -> dict[str, str]:
        return {**self.env, **self.frontend_env}

    def _plan(self) -> list[_Pool]:
        a = self.args
        placements = getattr(a, "ray_placements", None) or {}
        counts = {"colocated": a.colocated} if a.colocated else {"prefill": a.prefill, "decode": a.decode}
        return [_Pool(name, POOL_ROLES[name], placements.get(name, Placement())) for name, n in counts.items() if n > 0]

    def _count(self, pool: _Pool) -> int:
        a = self.args
        return a.colocated if pool.name == "colocated" else getattr(a, pool.name)

    def _reserve(self, ray, pool: _Pool, deadline: float) -> None:
        from ray.util.placement_group import placement_group

        n = self._count(pool)
        bundle = pool.placement.bundle()
        labels = [dict(pool.placement.label_selector)] * n if pool.placement.label_selector else None
        strategy = getattr(self.args, "ray_strategy", None) or "PACK"
        pool.group = placement_group([dict(bundle) for _ in range(n)], strategy=strategy,
                                     name=f"{self.namespace}-{pool.name}", bundle_label_selector=labels)
        ready, _ = ray.wait([pool.group.ready()], timeout=max(1.0, min(60.0, deadline - time.monotonic())))
        if not ready:
            raise RuntimeError(f"Ray cannot place the {pool.name} pool: {n} x {bundle}"
                               f"{' on nodes labelled ' + str(pool.placement.label_selector) if labels else ''}; "
                               f"the cluster has {ray.available_resources()} available "
                               f"(of {ray.cluster_resources()})")

    def _start_actors(self, ray, pool: _Pool) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from pdserve.cluster.ray_actor import WorkerActor

        remote = ray.remote(WorkerActor)
        p = pool.placement
        for i in range(self._count(pool)):
            index = sum(self._count(q) for q in self.pools[:self.pools.index(pool)]) + i
            name = f"{pool.role}-{index}"
            options = dict(name=name, num_cpus=p.num_cpus, num_gpus=p.num_gpus, resources=dict(p.resources),
                           max_restarts=getattr(self.args, "ray_max_restarts", 10), max_task_retries=0,
                           max_concurrency=4,  # record/stop are answered while the worker loop runs
                           scheduling_strategy=PlacementGroupSchedulingStrategy(pool.group, i))
            if p.label_selector:
                options["label_selector"] = dict(p.label_selector)
            actor = remote.options(**options).remote(self._worker_args(pool, name), name)
            pool.actors.append((name, actor))
            logger.info("started actor %s (%s)", name, ", ".join(f"{k} {v:g}" for k, v in p.bundle().items()))

    def _worker_args(self, pool: _Pool, name: str) -> list[str]:
        a = self.args
        overrides = (getattr(a, "pool_settings", None) or {}).get(pool.name, {})
        connector = a.kv_connector if getattr(a, "kv_connector_given", False) else "auto"
        argv = ["--role", pool.role, "--kv-connector", connector, "--worker-id", name,
                *engine_argv(engine_config_from_args(a, **overrides))]
        if not getattr(a, "kv_layerwise", True):
            argv.append("--no-kv-layerwise")
        if getattr(a, "kv_host_memory", None) is not None:  # a namespace from `pdserve up`'s parser
            if getattr(a, "kv_remote", "") in STORE_KINDS:
                raise ValueError(f"pdserve up --ray starts no KV store server: give --kv-remote the URL of one "
                                 f"every node reaches (redis://HOST:PORT), not {a.kv_remote!r}")
            argv += store_argv(store_config_from_args(a))
        return argv

    def _wait_record(self, ray, name: str, actor, deadline: float) -> dict:
        from ray.exceptions import RayActorError

        ref = actor.record.remote()
        while True:
            ready, _ = ray.wait([ref], timeout=1.0)
            if ready:
                try:
                    record = ray.get(ref)
                except RayActorError as e:
                    raise RuntimeError(f"worker {name} failed to start: {e}") from None
                logger.info("%s ready on node %s in %.1f s", name, record["node_ip"], record["startup_s"])
                return record
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} not ready in time")


def run_ray_up(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cluster = RayCluster(args)
    except ValueError as e:
        logger.error("%s", e)
        return 1

    def _on_signal(signum, frame):
        cluster._stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        monitor_options_from_args(args)
        url = cluster.start()
        signal.signal(signal.SIGTERM, _on_signal)  # ours again: ray.init installs its own
        signal.signal(signal.SIGINT, _on_signal)
        print_ready(url, args, cluster.frontend_env)
        print(f"\nRay {cluster.gcs_address}, namespace {cluster.namespace} (started in {cluster.startup_s:.1f} s); "
              "workers:\n" + "\n".join(cluster.placement_lines()), flush=True)
        print(json.dumps({"event": "ray_ready", "namespace": cluster.namespace, "gcs_address": cluster.gcs_address,
                          "startup_s": round(cluster.startup_s, 3)}), flush=True)
        return cluster.wait()
    except (RuntimeError, ValueError) as e:
        logger.error("%s", e)
        return 1
    finally:
        cluster.stop()
