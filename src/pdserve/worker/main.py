"""``pdserve worker``: start one worker process and report where it listens."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from pdserve.protocol import ROLES
from pdserve.runtime import add_cpu_args, apply_cpu_args, freeze_startup_objects, keep_freed_memory
from pdserve.settings import add_engine_flags, add_store_flags, engine_config_from_args, store_config_from_args

logger = logging.getLogger(__name__)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=ROLES, default="both")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="control port (default: chosen by the OS)")
    parser.add_argument("--kv-connector", "--kv-transfer", dest="kv_connector", default="shm",
                        help="KV connector: how prefill workers write into this worker's cache (decode/both "
                             "roles): shm (same host), tcp, or module:Class for an out-of-tree connector")
    parser.add_argument("--kv-port", type=int, default=0, help="KV data-plane port (default: chosen by the OS)")
    parser.add_argument("--kv-layerwise", action=argparse.BooleanOptionalAction, default=True,
                        help="prefill: send a prompt's KV layer by layer as each is computed, overlapping the "
                             "transfer with the compute (default); --no-kv-layerwise: the whole request at the end")
    parser.add_argument("--worker-id", default="", help="name in logs and metrics (default role@host:port)")
    parser.add_argument("--transfer-timeout", type=float, default=30.0,
                        help="seconds a decode worker waits for KV before computing the prompt itself")
    parser.add_argument("--ready-file", default=None, help="also write the ready record (JSON) here")
    parser.add_argument("--log-stats-interval", type=float, default=10.0, help="seconds between stats lines")
    parser.add_argument("--trace-file", default=None,
                        help="write an event trace (steps, transfers) here, for `pdserve profile --live`")
    add_engine_flags(parser)
    add_store_flags(parser)
    add_cpu_args(parser)


def run_worker(args: argparse.Namespace) -> int:
    worker = build_worker(args)
    record = json.dumps(worker.ready_record())
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            f.write(record)
        import os
        os.replace(args.ready_file + ".tmp", args.ready_file)
    print(record, flush=True)

    def _stop(signum, frame):
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        worker.run()
    finally:
        worker.close()
        logger.info("worker %s stopped", worker.worker_id)
    return 0


def build_worker(args: argparse.Namespace):
    """The worker ``pdserve worker``'s arguments describe, built and ready to run (a launcher that runs
    workers in processes of its own, such as Ray's actors, calls this too)."""
    from pdserve.engine.core import EngineCore
    from pdserve.worker.process import Worker, WorkerOptions

    cores = apply_cpu_args(args)
    keep_freed_memory()  # before the engine allocates anything: no page faults on per-step temporaries
    config = engine_config_from_args(args)
    options = WorkerOptions(role=args.role, host=args.host, port=args.port, kv_connector=args.kv_connector,
                            kv_port=args.kv_port, kv_layerwise=args.kv_layerwise, worker_id=args.worker_id,
                            transfer_timeout_s=args.transfer_timeout, log_stats_interval_s=args.log_stats_interval,
                            trace_path=args.trace_file, cpus=tuple(cores) if cores else None,
                            kv_store=store_config_from_args(args))
    worker = Worker(None, options, engine_factory=lambda alloc: EngineCore(config, alloc, record_kv_events=True))
    if cores:
        logger.info("worker %s pinned to cores %s", worker.worker_id, cores)
    freeze_startup_objects()  # the engine is built: no full GC pass walks it in the middle of a step
    return worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("pdserve worker")
    add_worker_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
