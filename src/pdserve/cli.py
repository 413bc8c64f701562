"""The ``pdserve`` command: pull | generate | up | worker | frontend | bench | profile | sim | plan."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from pdserve.errors import PdserveError

# Subpackages that add their own subcommands through ``register(subparsers)``.
_PLUGINS = ("pdserve.cluster.cli", "pdserve.bench.cli", "pdserve.sim.cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PdserveError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("pull", help="fetch the default model (SmolLM2-135M-Instruct GGUF) into the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("generate", help="generate text offline with one engine")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    from pdserve.settings import add_engine_flags

    add_engine_flags(p)
    p.set_defaults(func=_cmd_generate)

    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise
            continue
        module.register(sub)
    return parser


def _cmd_pull(args: argparse.Namespace) -> int:
    from pdserve.model.registry import pull_default_model

    path = pull_default_model(progress=not args.quiet)
    print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pdserve.settings import engine_config_from_args
    from pdserve.engine.llm import LLM
    from pdserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.sampling_seed, max_tokens=args.max_tokens)
    llm = LLM.from_engine_config(engine_config_from_args(args))
    if args.chat:
        results = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        results = llm.generate(args.prompt, params)
    for prompt, result in zip(args.prompt, results):
        out = result.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            print(out.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
