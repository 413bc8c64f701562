"""Subcommands ``up``, ``worker`` and ``frontend`` for the ``pdserve`` command (``register``)."""
from __future__ import annotations

import argparse
import json
import sys

import msgspec

from pdserve.config import parse_size
from pdserve.settings import add_engine_flags, add_store_flags
from pdserve.router.policies import POLICIES
from pdserve.server.main import DEFAULT_OBJECTIVES, add_api_args, add_elastic_bounds_args, add_objective_args
from pdserve.server.monitor_args import add_monitor_args

MODES = ("auto", "colocated", "disaggregated")


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

    p = subparsers.add_parser("keys", help="print a fresh set of cluster keys (CURVE) for internal sockets",
                              description="Print a cluster's keys as the value of PDSERVE_CLUSTER_KEYS: give every "
                                          "worker and frontend of one cluster the same value in its environment when "
                                          "their internal sockets are not on loopback (pdserve up does it itself).")
    p.set_defaults(func=_print_keys)


def _print_keys(args: argparse.Namespace) -> int:
    from pdserve.security import ClusterKeys

    print(ClusterKeys.generate().to_env())
    return 0


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="cluster file (YAML, docs/cluster.md; `pdserve plan` writes one); flags given here win")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="auto (the default without a layout flag): a prefill and a decode worker whose cores, roles "
                        "and step time the elastic controller moves as the load changes, each request's prompt "
                        "computed where it is predicted fastest; colocated and disaggregated: fixed layouts "
                        "(the default with --colocated N, or with --prefill N / --decode M)")
    p.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=None, help="decode workers (default 1)")
    p.add_argument("--colocated", type=int, default=0, help="colocated workers (role both) instead")
    p.add_argument("--kv-connector", "--kv-transfer", dest="kv_connector", default=None,
                   help="how KV moves from prefill to decode workers: shm (default: same host), tcp, auto (the "
                        "default with --ray: shared memory within a node, TCP across), or module:Class for an "
                        "out-of-tree connector (kv/registry.py)")
    p.add_argument("--kv-layerwise", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill workers send a prompt's KV layer by layer as it is computed (default); "
                        "--no-kv-layerwise: the whole request once computed")
    p.add_argument("--host", default="127.0.0.1", help="the HTTP API's interface (default %(default)s)")
    p.add_argument("--internal-host", default="127.0.0.1",
                   help="the interface of the workers' and frontend's internal sockets (default %(default)s: "
                        "loopback; elsewhere they require the cluster's keys, docs/cluster.md)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="every request's deadline, seconds: aborted everywhere then, the client told")
    p.add_argument("--admission-ttft-slack", type=float, default=1.0,
                   help="refuse up front (429, Retry-After) a request predicted to take over this many times the "
                        "TTFT objective to its first token (the prediction corrected by its measured error), "
                        "or whose decode worker's steps take over this many times the TPOT objective "
                        "(default %(default)s; 0: never)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    add_api_args(p)  # the key: $PDSERVE_API_KEY or --api-key-file, handed to the frontend in its environment
    p.add_argument("--routing", choices=POLICIES, default="prefix_aware")
    p.add_argument("--min-remote-prefill-tokens", type=int, default=0)
    p.add_argument("--worker-timeout", type=float, default=30.0)
    p.add_argument("--no-pin", action="store_true", help="do not pin each worker to its own core")
    p.add_argument("--enable-debug-endpoints", action="store_true")
    p.add_argument("--trace-dir", default=None,
                   help="every process writes an event trace here (for `pdserve profile --live`)")
    g = p.add_argument_group("Ray (docs/ray.md)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the workers as Ray actors: on the Ray cluster at ADDRESS, or (no ADDRESS) the one in "
                        "RAY_ADDRESS, else a local one started here")
    g.add_argument("--ray-namespace", default=None, help="the Ray namespace of this cluster's actors (default: new)")
    g.add_argument("--ray-placement", default=None, metavar="JSON",
                   help='what each pool\'s workers ask of Ray, e.g. \'{"prefill": {"num_cpus": 8, "num_gpus": 1, '
                        '"resources": {"h100": 1}}, "decode": {"label_selector": {"accelerator": "h200"}}}\'')
    g.add_argument("--ray-strategy", default=None, choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                   help="placement groups' strategy (default PACK)")
    add_objective_args(p, defaults=DEFAULT_OBJECTIVES)
    add_monitor_args(p)
    add_elastic_bounds_args(p)
    add_engine_flags(p)
    add_store_flags(p)
    p.add_argument("--kv-remote-memory", type=parse_size, default=2 * 2**30,
                   help="the memory of the KV store server started for --kv-remote redis|mooncake (default 2GiB)")


def run_up_with_config(args: argparse.Namespace) -> int:
    try:
        args = apply_up_config(args)
    except ValueError as e:
        print(f"pdserve up: error: {e}", file=sys.stderr)
        return 2
    if args.ray is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # not imported here: Ray reads its settings at import
            print("pdserve up: error: --ray needs Ray: pip install 'pdserve[ray]'", file=sys.stderr)
            return 2
        from pdserve.cluster.ray_launcher import run_ray_up

        return run_ray_up(args)
    from pdserve.cluster.local import run_up

    error = _check_local_devices(args)
    if error:  # before any process starts: each worker would fail with it
        print(f"pdserve up: error: {error}", file=sys.stderr)
        return 2
    return run_up(args)


def _check_local_devices(args: argparse.Namespace) -> str | None:
    """Why a worker on this machine could not run on the ``--device`` it is given (the command line's or a
    pool's in the cluster file), or None."""
    from pdserve.devices import resolve_backend
    from pdserve.errors import DeviceError

    specs = {getattr(args, "device", "auto"), *(s["device"] for s in args.pool_settings.values() if "device" in s)}
    for spec in sorted(specs):
        try:
            resolve_backend(spec)
        except DeviceError as e:
            return str(e)
    return None


def apply_up_config(args: argparse.Namespace) -> argparse.Namespace:
    """``pdserve up``'s arguments with its ``--config`` file applied (flags given with a value other than their
    default win) and
    the worker counts settled; per-pool engine settings land in ``args.pool_settings``."""
    from pdserve import cluster_file

    args.pool_settings = {}
    defaults = _parser_defaults()
    given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}  # on the command line
    if args.config:
        f = cluster_file.load(args.config)
        s = f.serving
        layout = {"colocated": s.colocated, "prefill": None, "decode": None} if s.mode == "colocated" else \
            {"colocated": 0, "prefill": s.prefill, "decode": s.decode}
        values = {"model": f.model, **f.engine, **layout, "mode": s.mode, "kv_connector": s.kv_connector,
                  "kv_layerwise": s.kv_layerwise, "routing": s.routing,
                  "min_remote_prefill_tokens": s.min_remote_prefill_tokens, "host": s.host, "port": s.port,
                  "price_per_hour": s.price_per_hour_flags(), **s.kv_store_settings(),
                  "planned": _planned(f.predicted, args.config)}
        for key, value in values.items():
            if key not in given and value is not None:
                setattr(args, key, value)
        # Per-pool engine settings apply to that pool's workers, unless a flag sets them for all.
        args.pool_settings = {pool: {k: v for k, v in settings.items() if k not in given}
                              for pool, settings in s.pools.items()}
        if s.backend == "ray" or s.ray is not None:
            r = s.ray or cluster_file.RaySettings()
            if args.ray is None:
                args.ray = r.address or ""
            for key, value in (("ray_namespace", r.namespace), ("ray_strategy", r.strategy)):
                if getattr(args, key) is None:
                    setattr(args, key, value)
            args.ray_max_restarts = r.max_restarts
            if args.ray_placement is None and r.pools:
                args.ray_placement = json.dumps({pool: msgspec.to_builtins(p) for pool, p in r.pools.items()})
    args.kv_connector_given = args.kv_connector is not None
    if args.kv_connector is None:
        args.kv_connector = "auto" if args.ray is not None else "shm"
    if args.ray is not None:
        from pdserve.cluster.ray_launcher import placements_from

        try:
            spec = json.loads(args.ray_placement) if args.ray_placement else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"--ray-placement is not JSON: {e}") from None
        args.ray_placements = placements_from(spec)
    args.prefill_given = args.prefill is not None
    args.decode_given = args.decode is not None
    if args.mode is None:
        args.mode = "colocated" if args.colocated else \
            "disaggregated" if args.prefill_given or args.decode_given else "auto"
    args.prefill = 1 if args.prefill is None else args.prefill
    args.decode = 1 if args.decode is None else args.decode
    if args.mode == "colocated" and not args.colocated:
        args.colocated = 1
    if args.colocated:
        if args.mode == "auto":
            raise ValueError("--mode auto runs prefill and decode workers; --colocated N is a fixed layout")
        args.prefill_given = args.prefill_given and args.prefill > 0
        args.decode_given = args.decode_given and args.decode > 0
    return args


def _planned(predicted: dict, path: str) -> str | None:
    """The cluster file's ``predicted:`` for the frontend's ``--planned`` (JSON), when it gives a cost or a price
    (a file the planner wrote does); ValueError naming the file when its figures are malformed."""
    import json

    from pdserve.server.cost import planned

    if not predicted or not ({"cost_per_mtok", "price_per_hour"} & set(predicted)):
        return None
    try:
        planned(predicted)
    except ValueError as e:
        raise ValueError(f"{path}: predicted: {e}") from None
    return json.dumps(predicted)


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
