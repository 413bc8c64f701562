"""Subcommands ``up``, ``worker`` and ``frontend`` for the ``pdserve`` command (``register``)."""
from __future__ import annotations

import argparse
import sys

from pdserve.cluster.args import add_engine_args
from pdserve.router.policies import POLICIES
from pdserve.server.monitor_args import add_monitor_args


def register(subparsers) -> None:
    from pdserve.server.main import add_frontend_args, run_frontend
    from pdserve.worker.main import add_worker_args, run_worker

    p = subparsers.add_parser("up", help="start a local cluster: workers and the HTTP frontend")
    add_up_args(p)
    p.set_defaults(func=run_up_with_config)

    p = subparsers.add_parser("worker", help="start one worker (engine behind ZMQ)")
    add_worker_args(p)
    p.set_defaults(func=run_worker)

    p = subparsers.add_parser("frontend", help="start the HTTP frontend over running workers")
    add_frontend_args(p)
    p.set_defaults(func=run_frontend)


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="cluster YAML file (flags given here override it)")
    p.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=None, help="decode workers (default 1)")
    p.add_argument("--colocated", type=int, default=0, help="colocated workers (role both) instead")
    p.add_argument("--kv-transfer", choices=("shm", "tcp"), default="shm")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--routing", choices=POLICIES, default="prefix_aware")
    p.add_argument("--min-remote-prefill-tokens", type=int, default=0)
    p.add_argument("--worker-timeout", type=float, default=30.0)
    p.add_argument("--no-pin", action="store_true", help="do not pin each worker to its own core")
    p.add_argument("--enable-debug-endpoints", action="store_true")
    p.add_argument("--trace-dir", default=None,
                   help="every process writes an event trace here (for `pdserve profile --live`)")
    add_monitor_args(p)
    add_engine_args(p)


def run_up_with_config(args: argparse.Namespace) -> int:
    from pdserve.cluster.local import run_up

    return run_up(apply_up_config(args))


def apply_up_config(args: argparse.Namespace) -> argparse.Namespace:
    """``pdserve up``'s arguments with its ``--config`` file applied (flags given win) and the worker
    counts settled; per-pool scheduler settings land in ``args.pool_scheduler``."""
    from pdserve.cluster.config import load_cluster_file

    args.pool_scheduler = {}
    if args.config:
        settings = load_cluster_file(args.config)
        defaults = _parser_defaults()
        given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}  # on the command line
        pools = settings.pop("pool_scheduler", {})
        for key, value in settings.items():
            if key not in given:
                setattr(args, key, value)
        # Per-pool scheduler settings apply to that pool's workers, unless a flag sets them for all.
        args.pool_scheduler = {pool: {k: v for k, v in s.items() if k not in given} for pool, s in pools.items()}
    args.prefill_given = args.prefill is not None
    args.decode_given = args.decode is not None
    args.prefill = 1 if args.prefill is None else args.prefill
    args.decode = 1 if args.decode is None else args.decode
    if args.colocated:
        args.prefill_given = args.prefill_given and args.prefill > 0
        args.decode_given = args.decode_given and args.decode > 0
    return args


def _parser_defaults() -> dict:
    p = argparse.ArgumentParser()
    add_up_args(p)
    return vars(p.parse_args([]))


def main(argv: list[str] | None = None) -> int:
    """``python -m pdserve.cluster.cli up|worker|frontend ...`` (same as ``pdserve ...``)."""
    import logging

    parser = argparse.ArgumentParser("pdserve")
    parser.add_argument("--log-level", default="info")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
