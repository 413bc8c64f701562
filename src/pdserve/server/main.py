"""``pdserve frontend``: the HTTP frontend over running workers."""
from __future__ import annotations

import argparse
import logging
import sys

from pdserve.router.policies import POLICIES
from pdserve.server.limits import DEFAULT_MAX_TOKENS_CAP
from pdserve.server.security import API_KEY_ENV


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", required=True,
                        help="comma-separated worker control addresses, e.g. tcp://127.0.0.1:5555,tcp://...")
    parser.add_argument("--model", default="smollm2-135m", help="model (for the tokenizer)")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1")
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
                        help="POST /debug/kv_digests (needs the API key when one is set)")
    parser.add_argument("--trace-file", default=None,
                        help="write an event trace (request submits, first tokens) here, for `pdserve profile --live`")


def add_api_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP API's settings that ``pdserve frontend`` and ``pdserve up`` share."""
    parser.add_argument("--api-key-file", default=None,
                        help=f"file whose first line is the API key: every route but /health then needs "
                             f"'Authorization: Bearer KEY'. Without it the key comes from ${API_KEY_ENV} "
                             f"(never from a command line, which `ps` shows)")
    parser.add_argument("--api-key", action=_RefuseKeyOnCommandLine, help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens-cap", type=_positive_int, default=DEFAULT_MAX_TOKENS_CAP,
                        help="most output tokens one request may ask for (a larger max_tokens is a 400), and "
                             "chat's default max_tokens when the context leaves more room")


def frontend_env(args: argparse.Namespace) -> dict[str, str] | None:
    """For a launcher (``pdserve up``): the frontend's environment, carrying the API key from
    ``--api-key-file`` or a cluster file's ``api_key`` (None: inherit; ValueError for a bad key file)."""
    import os

    from pdserve.server.security import load_api_key

    key = load_api_key(getattr(args, "api_key_file", None)) or getattr(args, "api_key", None)
    return {**os.environ, API_KEY_ENV: key} if key else None


def frontend_api_argv(args: argparse.Namespace) -> list[str]:
    """For a launcher: the frontend flags of ``add_api_args`` but the key file (the key goes by
    ``frontend_env``)."""
    return ["--max-tokens-cap", str(args.max_tokens_cap)]


def run_frontend(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve.server.app import create_app
    from pdserve.server.client import FrontendClient, FrontendOptions
    from pdserve.server.security import load_api_key

    try:
        api_key = load_api_key(args.api_key_file)
    except ValueError as e:
        print(f"pdserve frontend: {e}", file=sys.stderr)
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

    app = create_app(client, args.served_model_name or args.model, load, api_key=api_key,
                     enable_debug=args.enable_debug_endpoints, max_tokens_cap=args.max_tokens_cap)
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
