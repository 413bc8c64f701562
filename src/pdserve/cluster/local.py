"""``pdserve up``: workers and a frontend as subprocesses of one launcher on this machine.

Workers start first (each pinned to its share of the cores unless ``--no-pin``), report their addresses in a ready
file, then the frontend starts with those addresses. Ctrl-C or SIGTERM stops every child (SIGTERM, then
SIGKILL after a grace period); children also get SIGTERM if the launcher itself dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pdserve import security
from pdserve.cluster.startup import StartupProgress, summary
from pdserve.kv.shm import remove_stale_files
from pdserve.progress import PROGRESS_FILE_ENV
from pdserve.runtime import die_with_parent
from pdserve.server.auth import API_KEY_ENV
from pdserve.server.main import frontend_api_argv, frontend_env
from pdserve.server.monitor_args import monitor_args_to_argv, monitor_options_from_args
from pdserve.settings import engine_argv, engine_config_from_args, store_argv, store_config_from_args

logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0


RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)  # after the 1st, 2nd, ... crash in a row
CRASH_LOOP = (5, 120.0)  # this many crashes within this many seconds: not restarted again


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    ready_file: Path | None = None
    record: dict | None = None
    argv: list[str] | None = None  # a worker's command line (restarts reuse it, on the same ports)
    env: dict | None = None
    crashes: list[float] = field(default_factory=list)  # when it exited on its own
    restart_at: float | None = None
    gave_up: bool = False


class LocalCluster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.frontend_env = frontend_env(args)  # the API key, for the frontend only (ValueError: a bad key file)
        self.children: list[Child] = []
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pdserve-up-"))
        self._stopping = False
        self.progress = StartupProgress()
        self.store_server = None  # the KV store server started for --kv-remote redis|mooncake (cluster/store_server.py)
        # Beyond loopback every internal socket needs the cluster's keys: made here, handed down in the
        # environment (security.py)
        self.env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}  # workers need no API key
        if not security.is_loopback(getattr(args, "internal_host", "127.0.0.1")) and security.ENV not in self.env:
            self.env[security.ENV] = security.ClusterKeys.generate().to_env()

    # -- public --------------------------------------------------------------------------------------
    def start(self, ready_timeout_s: float = 600.0) -> str:
        """Start everything; return the base URL once /health answers 200. Raises RuntimeError (after
        stopping what started) when a child exits or the cluster is not ready in time."""
        roles = self._roles()
        self._start_store_server()
        placements = split_cores(sorted(os.sched_getaffinity(0)), len(roles))
        for i, role in enumerate(roles):
            self._start_worker(i, role, None if self.args.no_pin else placements[i])
        deadline = time.monotonic() + ready_timeout_s
        for child in self.children:
            self._wait_ready(child, deadline)
        addresses = ",".join(c.record["address"] for c in self.children)
        self._start_frontend(addresses)
        url = f"http://{self.args.host}:{self.args.port}"
        self._wait_health(url, deadline)
        self.progress.frontend_ready()
        return url

    def wait(self) -> int:
        """Block until a signal or until the frontend exits; return its exit code (0 on a signal)."""
        frontend = self.children[-1]
        while not self._stopping:
            code = frontend.proc.poll()
            if code is not None:
                logger.error("the frontend exited with code %s", code)
                return code or 1
            for child in self.children[:-1]:
                self._supervise(child)
            time.sleep(0.2)
        return 0

    def _supervise(self, child: Child) -> None:
        """A worker that exited on its own is started again on the same ports (the frontend reconnects and
        re-admits it), after a backoff; one that keeps crashing is left down, with a clear message."""
        now = time.monotonic()
        if child.gave_up or child.argv is None:
            return
        if child.restart_at is None:
            if child.proc.poll() is None:
                return
            child.crashes = [t for t in child.crashes if now - t < CRASH_LOOP[1]] + [now]
            remove_stale_files()  # its KV cache file in /dev/shm
            if len(child.crashes) >= CRASH_LOOP[0]:
                child.gave_up = True
                logger.error("%s crashed %d times within %.0f s (last exit code %s); not restarting it: the "
                             "cluster serves without it (see its log above)", child.name, len(child.crashes),
                             CRASH_LOOP[1], child.proc.returncode)
                return
            delay = RESTART_BACKOFF_S[min(len(child.crashes), len(RESTART_BACKOFF_S)) - 1]
            logger.error("%s exited with code %s; restarting it in %.0f s", child.name, child.proc.returncode, delay)
            child.restart_at = now + delay
        elif now >= child.restart_at:
            child.restart_at = None
            child.proc = _spawn(self._restart_argv(child), child.env)
            logger.info("restarted %s (pid %d)", child.name, child.proc.pid)

    def _restart_argv(self, child: Child) -> list[str]:
        """The worker's command line on the ports it had (its record), so addresses stay valid."""
        argv = list(child.argv)
        record = child.record or {}
        for flag, key in (("--port", "address"), ("--kv-port", "kv_address")):
            address = record.get(key)
            if address:
                argv += [flag, address.rsplit(":", 1)[1]]
        return argv

    def stop(self) -> None:
        """SIGTERM every child, wait up to STOP_GRACE_S, SIGKILL the rest; idempotent."""
        self._stopping = True
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", child.name, STOP_GRACE_S)
                child.proc.kill()
                child.proc.wait()
        remove_stale_files()  # KV cache files of workers that were killed
        if self.store_server is not None:
            self.store_server.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def worker_argv(self, i: int, role: str, cpus: str | None, ready_file: Path) -> list[str]:
        """The command line of worker ``i``: the engine flags, with its pool's engine settings from a cluster
        file (``args.pool_settings``: {prefill|decode|colocated: {setting: value}}) on top."""
        pool = "colocated" if role == "both" else role
        overrides = (getattr(self.args, "pool_settings", None) or {}).get(pool, {})
        argv = [sys.executable, "-m", "pdserve.worker.main", "--role", role, "--host", self.args.internal_host,
                "--kv-connector", self.args.kv_connector, "--ready-file", str(ready_file),
                "--worker-id", f"{role}-{i}", *engine_argv(engine_config_from_args(self.args, **overrides))]
        if getattr(self.args, "kv_host_memory", None) is not None:  # a namespace from `pdserve up`'s parser
            argv += store_argv(store_config_from_args(self.args))
        if cpus is not None:
            argv += ["--cpus", cpus]
        if not getattr(self.args, "kv_layerwise", True):
            argv.append("--no-kv-layerwise")
        if getattr(self.args, "trace_dir", None):
            argv += ["--trace-file", str(Path(self.args.trace_dir) / f"worker-{role}-{i}.jsonl")]
        return argv

    # -- private -------------------------------------------------------------------------------------
    def initial_layout(self) -> str:
        """Where ``--mode auto`` starts: colocated on one host (each phase gets every core when the other has
        nothing to do; measured here, a prefill/decode split of two cores loses 2.5-4x in goodput at loose
        objectives, docs/benchmarks.md); the controller splits when the objectives ask for it."""
        return "colocated" if len(self._roles()) <= 2 else "split"

    def _roles(self) -> list[str]:
        a = self.args
        if a.colocated:
            if a.prefill_given or a.decode_given:
                raise ValueError("give --colocated, or --prefill/--decode, not both")
            return ["both"] * a.colocated
        if a.prefill < 0 or a.decode < 1:
            raise ValueError("a disaggregated cluster needs --decode >= 1 (and --prefill >= 0)")
        return ["prefill"] * a.prefill + ["decode"] * a.decode

    def _start_store_server(self) -> None:
        """``--kv-remote redis|mooncake``: start that server here; the workers get its URL."""
        from pdserve.cluster.store_server import KINDS, StoreServer

        kind = getattr(self.args, "kv_remote", "")
        if kind not in KINDS:
            return
        self.store_server = StoreServer(kind, self.args.internal_host, self.args.kv_remote_memory, self.tmpdir)
        self.args.kv_remote = self.store_server.start()

    def _start_worker(self, i: int, role: str, cpus: str | None) -> None:
        ready, progress = self.tmpdir / f"worker-{i}.json", self.tmpdir / f"progress-{i}.jsonl"
        self.progress.add_worker(f"{role}-{i}", progress, ready)
        env = {**self.env, PROGRESS_FILE_ENV: str(progress)}
        argv = self.worker_argv(i, role, cpus, ready)
        self.children.append(Child(f"worker {role}-{i}", _spawn(argv, env), ready, argv=argv, env=env))
        logger.info("started worker %s-%d%s", role, i, f" on core {cpus}" if cpus is not None else "")

    def _start_frontend(self, addresses: str) -> None:
        argv = frontend_argv(self.args, ["--workers", addresses], self.initial_layout())
        self.children.append(Child("frontend", _spawn(argv, {**self.env, **self.frontend_env})))

    def _wait_ready(self, child: Child, deadline: float) -> None:
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} while starting")
            self.progress.poll()
            if child.ready_file.exists():
                child.record = json.loads(child.ready_file.read_text())
                return
            time.sleep(0.1)
        raise RuntimeError(f"{child.name} not ready in time")

    def _wait_health(self, url: str, deadline: float) -> None:
        wait_healthy(url, self.children[-1].proc, deadline - time.monotonic(), poll_s=0.2)


def run_up(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per health probe
    try:
        cluster = LocalCluster(args)
    except ValueError as e:  # a bad API key file
        logger.error("%s", e)
        return 1

    def _on_signal(signum, frame):
        cluster._stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        monitor_options_from_args(args)  # bad prices or objectives fail before any worker starts
        url = cluster.start()
        print_ready(url, args, cluster.frontend_env)
        return cluster.wait()
    except (RuntimeError, ValueError) as e:
        logger.error("%s", e)
        return 1
    finally:
        cluster.progress.close()
        cluster.stop()


def frontend_argv(a: argparse.Namespace, workers: list[str], initial_layout: str = "split") -> list[str]:
    """The frontend's command line for ``pdserve up``'s arguments; ``workers``: how it finds them
    (``--workers ADDRESSES``, or Ray's ``--ray-address/--ray-namespace``)."""
    argv = [sys.executable, "-m", "pdserve.server.main", *workers, "--model", a.model,
            "--host", a.host, "--port", str(a.port), "--routing", a.routing,
            "--min-remote-prefill-tokens", str(a.min_remote_prefill_tokens),
            "--worker-timeout", str(a.worker_timeout), "--internal-host", a.internal_host,
            "--request-timeout", str(a.request_timeout)]
    if a.admission_ttft_slack:
        argv += ["--admission-ttft-slack", str(a.admission_ttft_slack)]
    if a.served_model_name:
        argv += ["--served-model-name", a.served_model_name]
    argv += frontend_api_argv(a)
    if a.enable_debug_endpoints:
        argv.append("--enable-debug-endpoints")
    if a.trace_dir:
        argv += ["--trace-file", str(Path(a.trace_dir) / "frontend.jsonl")]
    for flag, value in (("--slo-ttft", a.slo_ttft), ("--slo-tpot", a.slo_tpot), ("--slo-itl-p99", a.slo_itl_p99)):
        if value is not None:
            argv += [flag, str(value)]
    if a.mode == "auto":
        argv += ["--elastic", "--path-choice", "--elastic-initial", initial_layout,
                 "--min-prefill-workers", str(a.min_prefill_workers), "--min-decode-workers",
                 str(a.min_decode_workers), "--min-decode-cores", str(a.min_decode_cores)]
        for flag, value in (("--max-prefill-workers", a.max_prefill_workers),
                            ("--max-decode-workers", a.max_decode_workers)):
            if value is not None:
                argv += [flag, str(value)]
    return argv + monitor_args_to_argv(a)


def print_ready(url: str, args: argparse.Namespace, frontend_env: dict[str, str]) -> None:
    """The screen a launcher prints once its cluster answers (``startup.summary``), reading /v1/cluster with
    the frontend's API key."""
    api_key = frontend_env.get(API_KEY_ENV)
    print(summary(url, _cluster_status(url, api_key), args.served_model_name or args.model, api_key,
                  max_tokens=min(16, args.max_tokens_cap), api_key_file=args.api_key_file), flush=True)


def _spawn(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, preexec_fn=_die_with_parent, stdout=subprocess.DEVNULL, env=env)


def _cluster_status(url: str, api_key: str | None) -> dict | None:
    """/v1/cluster of the cluster just started, for its summary (None if it cannot be read)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return httpx.get(f"{url}/v1/cluster", headers=headers, timeout=10.0).raise_for_status().json()
    except (httpx.HTTPError, ValueError) as e:
        logger.warning("cannot read %s/v1/cluster for the summary: %s", url, e)
        return None


def _die_with_parent() -> None:
    die_with_parent()


def split_cores(cores: list[int], num_workers: int) -> list[str]:
    """Each worker's cores as a ``--cpus`` list: the cores split evenly (one colocated worker gets them
    all, so it is measured on the same hardware as a prefill + decode pair), or round robin when there
    are more workers than cores."""
    n = len(cores)
    if num_workers > n:
        return [str(cores[i % n]) for i in range(num_workers)]
    return [",".join(str(c) for c in cores[i * n // num_workers:(i + 1) * n // num_workers])
            for i in range(num_workers)]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll ``url``/health until it answers 200. RuntimeError if ``proc`` (the frontend, or a ``pdserve
    up`` that owns it) exits first or ``timeout_s`` runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before {url}/health "
                               "answered")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(poll_s)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


def free_port() -> int:
    """A free port on 127.0.0.1 in 20000-30000: below the OS's ephemeral range and ZMQ's random ports
    (49152+), so workers binding OS-chosen ports cannot take it before the frontend binds it."""
    for port in random.sample(range(20000, 30000), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-30000")
