"""`pdserve bench`: the load generator's command line.

    pdserve bench --base-url URL [--model M] --dataset random|mix|mooncake:FILE|azure:FILE|dist:FMT:FILE
                  [--rate R | --rates R1,R2,... | --concurrency C] [--slo-ttft S --slo-tpot S]
                  [--out FILE.json] [--plot-dir DIR] ...
    pdserve bench compare a.json b.json [...] [--out-dir DIR]

``register(subparsers)`` adds the subcommand to pdserve's CLI; ``python -m pdserve.bench.cli`` runs it alone.

(Over 400 lines: it is flags and their checks, one per workload and load shape, read as one list; the load
generator, workloads and reports are loadgen.py, workloads.py and report.py.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import logging
import math
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.loadgen import EndpointConfig, discover_model, run_load
from pdserve.bench.metrics import DEFAULT_ATTAINMENT, Slo, compute_metrics
from pdserve.bench.report import (
    format_compare,
    format_result,
    load_result,
    run_result,
    sweep_result,
    write_json,
)
from pdserve.bench.workloads import PromptBuilder, WorkloadConfig, build_shapes, with_arrival
from pdserve.progress import on_terminal
from pdserve.runtime import freeze_startup_objects

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with its nested ``compare`` action) to ``subparsers``; sets ``args.func``."""
    parser = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible endpoint (pdserve, vLLM, llama.cpp)",
        description="Streaming load generator for /v1/completions; records per-token arrival times.",
    )
    add_bench_arguments(parser)
    actions = parser.add_subparsers(dest="bench_action", metavar="{compare}")
    compare = actions.add_parser("compare", help="compare result files: table and plots, one line per system")
    compare.add_argument("results", nargs="+", metavar="RESULT.json", help="files written by --out")
    compare.add_argument("--out-dir", default=None, help="write comparison plots (PNG) here")
    compare.add_argument("--labels", type=_str_list, default=None, help="comma-separated names, one per file")
    parser.set_defaults(func=functools.partial(_dispatch, parser, compare))
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("endpoint")
    target.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (or .../v1)")
    target.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    target.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    target.add_argument("--label", default=None, help="system name in tables and plots (default: model@host)")
    target.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos=true"
    )
    target.add_argument(
        "--warmup", type=int, default=2, metavar="N",
        help="requests sent one at a time before measuring, with other prompts of the workload's first "
        "lengths; not recorded (default %(default)s; 0 for none)",
    )
    add_workload_arguments(parser)
    _add_objective_and_output_arguments(parser)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload and arrival flags (shared with anything that replays the same request stream,
    e.g. the simulator); read them back with ``workload_from_args``."""
    wl = parser.add_argument_group("workload")
    wl.add_argument(
        "--dataset",
        type=_dataset,
        default=("random", None, None),
        help="random | mix | mooncake:FILE | azure:FILE (trace replay) | dist:mooncake:FILE | "
        "dist:azure:FILE (lengths drawn from the trace, random prompts) (default: random)",
    )
    wl.add_argument(
        "--num-requests", type=positive_int, default=None, help="default: 100, or the whole trace"
    )
    wl.add_argument(
        "--input-len", type=positive_int, default=1024, help="random: prompt tokens (default 1024)"
    )
    wl.add_argument(
        "--output-len", type=positive_int, default=128, help="random: output tokens (default 128)"
    )
    wl.add_argument(
        "--input-len-range", type=_int_range, default=None, metavar="LO,HI", help="random: uniform"
    )
    wl.add_argument(
        "--output-len-range", type=_int_range, default=None, metavar="LO,HI", help="random: uniform"
    )
    wl.add_argument(
        "--mix",
        type=_mix,
        default=(),
        metavar="IN:OUT[:W],...",
        help="mix: components picked with probability ~ W (default 1), e.g. 2048:16:1,128:256:1",
    )
    wl.add_argument(
        "--length-scale", type=_positive_float, default=1.0, help="multiply all lengths (default 1)"
    )
    wl.add_argument(
        "--output-len-scale", type=_positive_float, default=None, help="scale outputs by this instead"
    )
    wl.add_argument("--vocab-size", type=positive_int, default=49152, help="token ids in [1000, V-1000)")
    wl.add_argument("--seed", type=int, default=0)

    arr = parser.add_argument_group("arrivals (default: trace timestamps for trace replay, else all at once)")
    rate = arr.add_mutually_exclusive_group()
    rate.add_argument(
        "--rate", type=_rate, default=None, help="requests/s, Poisson (or gamma); 'inf' = all at once"
    )
    rate.add_argument("--rates", type=_rate_list, default=None, metavar="R1,R2,...",
                      help="rate sweep (each rate with prompts of its own, none a prefix hit of an earlier rate's)")
    rate.add_argument(
        "--concurrency", type=positive_int, default=None, help="closed loop: requests in flight"
    )
    arr.add_argument("--burstiness", type=_positive_float, default=1.0, help="gamma shape; 1 = Poisson")
    arr.add_argument("--time-scale", type=_nonnegative_float, default=None, help="multiply trace timestamps")


def workload_from_args(args: Any) -> tuple[WorkloadConfig, list[float] | None]:
    """The workload (arrivals included) and a sweep's rates (None: one run) from flags added by
    ``add_workload_arguments``. Raises ValueError on inconsistent flags or an unreadable trace."""
    dataset, trace_format, trace_path = args.dataset
    is_replay = dataset in ("mooncake", "azure")
    if args.time_scale is not None and not is_replay:
        raise ValueError("--time-scale applies to trace replay (mooncake:FILE or azure:FILE) only")
    if args.time_scale is not None and (args.rate is not None or args.rates or args.concurrency):
        raise ValueError("--time-scale replays trace timestamps; it excludes --rate/--rates/--concurrency")
    if dataset == "mix" and not args.mix:
        raise ValueError("--dataset mix needs --mix IN:OUT[:W],...")
    if args.mix and dataset != "mix":
        raise ValueError("--mix needs --dataset mix")
    kind = "gamma" if args.burstiness != 1.0 else "poisson"
    if args.concurrency is not None:
        arrival = ArrivalConfig(kind="closed", concurrency=args.concurrency)
    elif args.rate is not None:
        kind = kind if math.isfinite(args.rate) else "poisson"
        arrival = ArrivalConfig(kind=kind, rate=args.rate, burstiness=args.burstiness)
    elif args.rates:
        arrival = ArrivalConfig(kind=kind, rate=args.rates[0], burstiness=args.burstiness)
    elif is_replay:
        arrival = ArrivalConfig(kind="trace", time_scale=1.0 if args.time_scale is None else args.time_scale)
    else:
        arrival = ArrivalConfig(kind="poisson")
    workload = WorkloadConfig(
        dataset=dataset,
        trace_path=trace_path,
        trace_format=trace_format,
        num_requests=args.num_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        input_len_range=args.input_len_range,
        output_len_range=args.output_len_range,
        mix=args.mix,
        length_scale=args.length_scale,
        output_length_scale=args.output_len_scale,
        vocab_size=args.vocab_size,
        seed=args.seed,
        arrival=arrival,
    )
    try:
        build_shapes(workload)  # surface trace format errors now, as argument errors
    except OSError as e:
        raise ValueError(str(e)) from e
    return workload, args.rates


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="pdserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


# ---------------------------------------------------------------------------------------------------


def _add_objective_and_output_arguments(parser: argparse.ArgumentParser) -> None:
    slo = parser.add_argument_group("objectives and limits")
    slo.add_argument("--slo-ttft", type=_positive_float, default=None, metavar="SECONDS")
    slo.add_argument("--slo-tpot", type=_positive_float, default=None, metavar="SECONDS")
    slo.add_argument(
        "--attainment", type=_fraction, default=DEFAULT_ATTAINMENT, help="sweep target (default 0.9)"
    )
    slo.add_argument("--max-duration", type=_positive_float, default=None, metavar="SECONDS", help="per run")
    slo.add_argument("--request-timeout", type=_positive_float, default=600.0, metavar="SECONDS")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, metavar="FILE.json", help="write the result JSON here")
    out.add_argument("--plot-dir", default=None, metavar="DIR", help="write PNG plots here")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar (the default when stderr is not a terminal)")
    parser.set_defaults(progress=on_terminal())


def _dispatch(parser: argparse.ArgumentParser, compare_parser: argparse.ArgumentParser, args: Any) -> int:
    if getattr(args, "bench_action", None) == "compare":
        return _compare(compare_parser, args)
    return _bench(parser, args)


def _bench(parser: argparse.ArgumentParser, args: Any) -> int:
    try:
        workload, rates = workload_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the table
    if args.plot_dir and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot-dir needs matplotlib (pip install matplotlib)")
    if args.base_url is None:
        parser.error("--base-url is required")
    model = args.model
    if model is None:
        try:
            model = discover_model(args.base_url, args.api_key)
        except RuntimeError as e:
            parser.error(str(e))
    try:
        endpoint = EndpointConfig(args.base_url, model, args.api_key, args.ignore_eos, args.request_timeout)
    except ValueError as e:
        parser.error(str(e))
    label = args.label or f"{model}@{urlparse(args.base_url).netloc}"
    slo = Slo(args.slo_ttft, args.slo_tpot)
    if args.warmup > 0:
        _warm_up(workload, endpoint, args.warmup, args.max_duration)
    freeze_startup_objects()  # no full GC pass over the client's libraries delays a timestamp mid-run
    if rates is None:
        result = _run_once(workload, endpoint, slo, args, label, desc=label)
        completed = result["completed"]
    else:
        runs = []
        for i, rate in enumerate(rates):
            arrival = ArrivalConfig(kind=workload.arrival.kind, rate=rate, burstiness=args.burstiness)
            run = _run_once(  # prompts of its own at each rate (salt i): none is a hit of an earlier rate's
                with_arrival(workload, arrival), endpoint, slo, args, label, desc=f"{rate:g} req/s", salt=i
            )
            logger.info(
                "rate %g req/s: attainment %.1f%%, goodput %.3g req/s",
                rate,
                100 * run["slo_attainment"],
                run["goodput"],
            )
            runs.append(run)
            if args.out:  # keep what is done if a later rate is interrupted
                partial = sweep_result(
                    label=label, rates=rates[: len(runs)], runs=runs, attainment_target=args.attainment
                )
                write_json(args.out, partial)
        result = sweep_result(label=label, rates=rates, runs=runs, attainment_target=args.attainment)
        completed = sum(run["completed"] for run in runs)
    print(format_result(result))
    if args.out:
        print(f"result: {write_json(args.out, result)}")
    if args.plot_dir:
        from pdserve.bench.plots import write_plots  # matplotlib only when plotting

        for path in write_plots(result, args.plot_dir):
            print(f"plot: {path}")
    if completed == 0:
        logger.error("no request completed; is the server at %s up?", args.base_url)
        return 1
    return 0


def _warm_up(workload: WorkloadConfig, endpoint: EndpointConfig, num_requests: int,
             max_duration_s: float | None) -> None:
    """Send the workload's first request shapes one at a time with prompts of another seed (so they
    leave nothing in the server's prefix cache that the measured requests could reuse), bounded in time
    like a run."""
    other = dataclasses.replace(workload, seed=workload.seed + 7919)
    shapes = build_shapes(other)[:num_requests]
    run_load(shapes, PromptBuilder(other).prompt_token_ids, endpoint, concurrency=1,
             max_duration_s=max_duration_s, show_progress=False, progress_desc="warm-up")


def _run_once(
    workload: WorkloadConfig, endpoint: EndpointConfig, slo: Slo, args: Any, label: str, desc: str, salt: int = 0
) -> dict[str, Any]:
    shapes = build_shapes(workload)
    builder = PromptBuilder(workload, salt)
    concurrency = workload.arrival.concurrency if workload.arrival.is_closed_loop else None
    load = run_load(
        shapes,
        builder.prompt_token_ids,
        endpoint,
        concurrency=concurrency,
        max_duration_s=args.max_duration,
        show_progress=args.progress,
        progress_desc=desc,
    )
    metrics = compute_metrics(load.records, load.duration_s, slo)
    return run_result(
        label=label,
        endpoint=endpoint,
        workload=workload.describe(),
        slo=slo,
        attainment_target=args.attainment,
        max_duration_s=args.max_duration,
        load=load,
        metrics=metrics,
    )


def _compare(parser: argparse.ArgumentParser, args: Any) -> int:
    try:
        results = [load_result(path) for path in args.results]
    except ValueError as e:
        parser.error(str(e))
    if args.labels:
        if len(args.labels) != len(results):
            parser.error(f"--labels has {len(args.labels)} names for {len(results)} files")
        for result, label in zip(results, args.labels, strict=True):
            result["label"] = label
    print(format_compare(results))
    if args.out_dir:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--out-dir needs matplotlib (pip install matplotlib)")
        from pdserve.bench.plots import write_compare_plots

        for path in write_compare_plots(results, args.out_dir):
            print(f"plot: {path}")
    return 0


def _dataset(text: str) -> tuple[str, str | None, str | None]:
    """'random' | 'mix' | 'mooncake:FILE' | 'azure:FILE' | 'dist:FMT:FILE' -> (dataset, format, path)."""
    if text in ("random", "mix"):
        return text, None, None
    name, _, rest = text.partition(":")
    trace_format = name
    if name == "dist":
        trace_format, _, rest = rest.partition(":")
    if trace_format not in ("mooncake", "azure") or not rest:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected random, mix, mooncake:FILE, azure:FILE, dist:mooncake:FILE, dist:azure:FILE"
        )
    if not Path(rest).is_file():
        raise argparse.ArgumentTypeError(f"trace file not found: {rest}")
    return name, trace_format, rest


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("not a number: nan")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _rate(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"rate must be > 0 (or inf), got {text!r}")
    return value


def _rate_list(text: str) -> list[float]:
    rates = [_rate(part) for part in text.split(",") if part.strip()]
    if not rates or any(math.isinf(r) for r in rates):
        raise argparse.ArgumentTypeError(f"expected finite rates R1,R2,..., got {text!r}")
    return sorted(set(rates))


def _int_range(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}")
    lo, hi = (positive_int(p.strip()) for p in parts)
    if lo > hi:
        raise argparse.ArgumentTypeError(f"LO must be <= HI, got {text!r}")
    return lo, hi


def _mix(text: str) -> tuple[tuple[int, int, float], ...]:
    components = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) not in (2, 3):
            raise argparse.ArgumentTypeError(f"mix component {part!r}: expected IN:OUT or IN:OUT:WEIGHT")
        weight = _positive_float(fields[2]) if len(fields) == 3 else 1.0
        components.append((positive_int(fields[0]), positive_int(fields[1]), weight))
    return tuple(components)


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


if __name__ == "__main__":
    sys.exit(main())
