"""``pdserve frontend``: the HTTP frontend over running workers."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping

from pdserve.control.attainment import Objectives
from pdserve.control.controller import Bounds
from pdserve.router.policies import POLICIES
from pdserve.server.auth import API_KEY_ENV
from pdserve.server.elastic import INITIAL_LAYOUTS
from pdserve.server.limits import DEFAULT_MAX_TOKENS_CAP
from pdserve.server.monitor_args import add_monitor_args, monitor_options_from_args


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="",
                        help="comma-separated worker control addresses, e.g. tcp://127.0.0.1:5555,tcp://...")
    parser.add_argument("--ray-address", default=None,
                        help="find the workers on this Ray cluster instead (the named actors of --ray-namespace, "
                             "as `pdserve up --ray` starts them), following them as Ray restarts them")
    parser.add_argument("--ray-namespace", default=None, help="the Ray namespace of the workers (--ray-address)")
    parser.add_argument("--model", default="smollm2-135m", help="model (for the tokenizer)")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="the HTTP API's interface (default %(default)s)")
    parser.add_argument("--internal-host", default="127.0.0.1",
                        help="where workers reach this frontend's internal sockets (heartbeats)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="every request's deadline, seconds (0: none): aborted everywhere then")
    parser.add_argument("--admission-ttft-slack", type=float, default=None,
                        help="refuse (429) a request predicted to take over this many times the TTFT objective "
                             "to its first token, or whose decode worker's steps take over this many times the "
                             "TPOT objective (default: no such check)")
    parser.add_argument("--port", type=int, default=8000)
    add_api_args(parser)
    parser.add_argument("--routing", choices=POLICIES, default="prefix_aware")
    parser.add_argument("--prefix-load-weight", type=float, default=1.0,
                        help="prefix_aware: cached blocks one queued request is worth")
    parser.add_argument("--min-remote-prefill-tokens", type=int, default=0,
                        help="shorter prompts are computed on the decode worker (no transfer)")
    parser.add_argument("--worker-timeout", type=float, default=30.0,
                        help="seconds of silence after which a worker is dead (local pids are watched too)")
    parser.add_argument("--max-inflight", type=int, default=1024, help="admission bound (429 beyond it)")
    parser.add_argument("--enable-debug-endpoints", action="store_true",
                        help="POST /debug/kv_digests, /debug/check_integrity, /debug/elastic "
                             "(they need the API key when one is set)")
    parser.add_argument("--trace-file", default=None,
                        help="write an event trace (request submits, first tokens) here, for `pdserve profile --live`")
    add_objective_args(parser)
    add_monitor_args(parser)
    add_elastic_args(parser)


# What `pdserve up` aims at when no objective is given: loose enough for the default model on a CPU host
# (a lone 1k-token prompt's TTFT is ~0.5-1 s there, a lone request's TPOT ~20-30 ms); set your own.
DEFAULT_OBJECTIVES = Objectives(ttft_s=2.0, tpot_s=0.1)


def add_objective_args(parser: argparse.ArgumentParser, defaults: Objectives = Objectives()) -> None:
    """The objectives (also ``pdserve up``'s): their attainment is kept, exported (/metrics, /v1/cluster, the
    dashboard), and steers the elastic controller."""
    g = parser.add_argument_group("objectives")
    g.add_argument("--slo-ttft", type=float, default=defaults.ttft_s, metavar="S",
                   help="time to first token objective, seconds (default %(default)s)")
    g.add_argument("--slo-tpot", type=float, default=defaults.tpot_s, metavar="S",
                   help="time per output token objective, seconds (default %(default)s)")
    g.add_argument("--slo-itl-p99", type=float, default=defaults.itl_p99_s, metavar="S",
                   help="bound on the 99th percentile of inter-token latency, seconds (default %(default)s)")


def add_elastic_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("elastic prefill/decode (docs/cluster.md)")
    g.add_argument("--path-choice", action="store_true",
                   help="per request, prefill remotely or on the decode worker, by predicted TTFT")
    g.add_argument("--elastic", action="store_true", help="move cores, roles and step time between the phases")
    g.add_argument("--elastic-tick", type=float, default=2.0, help="seconds between the controller's looks")
    g.add_argument("--elastic-initial", choices=INITIAL_LAYOUTS, default="split",
                   help="split: as the workers were started; colocated: each host's cores to its decode worker")
    add_elastic_bounds_args(parser)


def add_elastic_bounds_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("elastic bounds")
    b = Bounds()
    g.add_argument("--min-prefill-workers", type=int, default=b.min_prefill_workers)
    g.add_argument("--max-prefill-workers", type=int, default=None)
    g.add_argument("--min-decode-workers", type=int, default=b.min_decode_workers)
    g.add_argument("--max-decode-workers", type=int, default=None)
    g.add_argument("--min-decode-cores", type=int, default=b.min_decode_cores)


def objectives_from_args(args: argparse.Namespace) -> Objectives:
    return Objectives(args.slo_ttft, args.slo_tpot, args.slo_itl_p99)


def bounds_from_args(args: argparse.Namespace) -> Bounds:
    big = 1 << 30
    return Bounds(args.min_prefill_workers, args.max_prefill_workers or big, args.min_decode_workers,
                  args.max_decode_workers or big, args.min_decode_cores)


def add_api_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP API's settings that ``pdserve frontend`` and ``pdserve up`` share."""
    parser.add_argument("--api-key-file", default=None,
                        help=f"file whose first line is the API key: every route but /health and the "
                             f"/dashboard page then needs 'Authorization: Bearer KEY'. Without it the key comes "
                             f"from ${API_KEY_ENV} (never from a command line, which `ps` shows)")
    parser.add_argument("--api-key", action=_RefuseKeyOnCommandLine, help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens-cap", type=_positive_int, default=DEFAULT_MAX_TOKENS_CAP,
                        help="most output tokens one request may ask for (a larger max_tokens is a 400), and "
                             "chat's default max_tokens when the context leaves more room")


def frontend_env(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """For a launcher (``pdserve up``): what its frontend's environment adds to the launcher's, the API key
    from ``--api-key-file`` or ``$PDSERVE_API_KEY`` (``{}`` without a key; ValueError for a bad key file or
    an empty key)."""
    from pdserve.server.auth import load_api_key

    key = load_api_key(getattr(args, "api_key_file", None), environ)
    return {API_KEY_ENV: key} if key else {}


def frontend_api_argv(args: argparse.Namespace) -> list[str]:
    """For a launcher: the frontend flags of ``add_api_args`` but the key file (the key goes by
    ``frontend_env``)."""
    return ["--max-tokens-cap", str(args.max_tokens_cap)]


def run_frontend(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve.server.app import create_app
    from pdserve.server.client import FrontendClient, FrontendOptions
    from pdserve.server.auth import load_api_key

    try:
        api_key = load_api_key(args.api_key_file)
    except ValueError as e:
        print(f"pdserve frontend: {e}", file=sys.stderr)
        return 2

    try:
        monitor_options = monitor_options_from_args(args)
        if not args.workers and not args.ray_address:
            raise ValueError("give the workers' addresses (--workers) or where to find them (--ray-address)")
        if args.ray_address and not args.ray_namespace:
            raise ValueError("--ray-address needs --ray-namespace (the namespace `pdserve up --ray` printed)")
    except ValueError as e:
        print(f"pdserve frontend: error: {e}", file=sys.stderr)
        return 2
    directory = None
    if args.ray_address:
        from pdserve.server.ray_directory import RayDirectory

        directory = RayDirectory(args.ray_address, args.ray_namespace)
        directory.connect()  # on the main thread (Ray wants it there); uvicorn's signal handlers come after
    options = FrontendOptions(tuple(a.strip() for a in args.workers.split(",") if a.strip()),
                              routing=args.routing, prefix_load_weight=args.prefix_load_weight,
                              min_remote_prefill_tokens=args.min_remote_prefill_tokens,
                              worker_timeout_s=args.worker_timeout, max_inflight=args.max_inflight,
                              trace_path=args.trace_file, objectives=objectives_from_args(args),
                              path_choice=args.path_choice, elastic=args.elastic, elastic_tick_s=args.elastic_tick,
                              elastic_initial=args.elastic_initial, bounds=bounds_from_args(args),
                              internal_host=args.internal_host, request_timeout_s=args.request_timeout or None,
                              admission_ttft_slack=args.admission_ttft_slack)
    client = FrontendClient(options, directory=directory)

    def load():
        from pdserve.model.loader import checkpoint_path
        from pdserve.model.tokenizer import load_tokenizer

        info = client.model_info()
        eos = tuple(info.eos_token_ids) if info else ()
        return load_tokenizer(args.tokenizer or checkpoint_path(args.model), eos)

    app = create_app(client, args.served_model_name or args.model, load, api_key=api_key,
                     enable_debug=args.enable_debug_endpoints, monitor_options=monitor_options,
                     max_tokens_cap=args.max_tokens_cap)
    uvicorn.run(app, host=args.host, port=args.port, log_level=getattr(args, "log_level", "info"),
                access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("pdserve frontend")
    add_frontend_args(parser)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return run_frontend(args)


class _RefuseKeyOnCommandLine(argparse.Action):
    """``--api-key`` (once accepted) is an error that does not echo the key; without it argparse would read
    ``--api-key KEY`` as an abbreviation of ``--api-key-file``."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not accepted: a key on a command line is visible to every user of "
                     f"the machine (ps). Set ${API_KEY_ENV} or give --api-key-file")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
