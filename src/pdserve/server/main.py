"""``pdserve frontend``: the HTTP frontend over running workers."""
from __future__ import annotations

import argparse
import logging
import sys

from pdserve.router.policies import POLICIES
from pdserve.server.monitor_args import add_monitor_args, monitor_options_from_args


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", required=True,
                        help="comma-separated worker control addresses, e.g. tcp://127.0.0.1:5555,tcp://...")
    parser.add_argument("--model", default="smollm2-135m", help="model (for the tokenizer)")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    parser.add_argument("--routing", choices=POLICIES, default="prefix_aware")
    parser.add_argument("--prefix-load-weight", type=float, default=1.0,
                        help="prefix_aware: cached blocks one queued request is worth")
    parser.add_argument("--min-remote-prefill-tokens", type=int, default=0,
                        help="shorter prompts are computed on the decode worker (no transfer)")
    parser.add_argument("--worker-timeout", type=float, default=30.0,
                        help="seconds of silence after which a worker is dead (local pids are watched too)")
    parser.add_argument("--max-inflight", type=int, default=1024, help="admission bound (429 beyond it)")
    parser.add_argument("--enable-debug-endpoints", action="store_true", help="POST /debug/kv_digests")
    parser.add_argument("--trace-file", default=None,
                        help="write an event trace (request submits, first tokens) here, for `pdserve profile --live`")
    add_monitor_args(parser)


def run_frontend(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve.server.app import create_app
    from pdserve.server.client import FrontendClient, FrontendOptions

    try:
        monitor_options = monitor_options_from_args(args)
    except ValueError as e:
        print(f"pdserve frontend: error: {e}", file=sys.stderr)
        return 2
    options = FrontendOptions(tuple(a.strip() for a in args.workers.split(",") if a.strip()),
                              routing=args.routing, prefix_load_weight=args.prefix_load_weight,
                              min_remote_prefill_tokens=args.min_remote_prefill_tokens,
                              worker_timeout_s=args.worker_timeout, max_inflight=args.max_inflight,
                              trace_path=args.trace_file)
    client = FrontendClient(options)

    def load():
        from pdserve.model.loader import checkpoint_path
        from pdserve.model.tokenizer import load_tokenizer

        info = client.model_info()
        eos = tuple(info.eos_token_ids) if info else ()
        return load_tokenizer(args.tokenizer or checkpoint_path(args.model), eos)

    app = create_app(client, args.served_model_name or args.model, load, api_key=args.api_key,
                     enable_debug=args.enable_debug_endpoints, monitor_options=monitor_options)
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


if __name__ == "__main__":
    sys.exit(main())
