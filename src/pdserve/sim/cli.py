"""``pdserve sim``, ``pdserve plan`` and ``pdserve profile``: argument parsing and output only.

The lead's ``pdserve.cli`` calls ``register(subparsers)``; ``python -m pdserve.sim.cli sim ...`` works
on its own too. Each subcommand sets ``func``: ``args.func(args) -> int`` (exit code).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace

from pdserve.config import CacheConfig, SchedulerConfig
from pdserve.sim.store_args import add_store_args, store_from_args
from pdserve.sim.workload import add_workload_args, workload_from_args

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``sim``, ``plan`` and ``profile`` to an argparse subparsers object."""
    p = subparsers.add_parser("sim", help="simulate a serving cluster on a workload (no accelerators needed)",
                              description="Discrete-event simulation of a pdserve cluster: the real scheduler and "
                                          "KV manager, step times from a performance model.")
    add_workload_args(p)
    add_cluster_args(p)
    p.add_argument("--perf-model", default="analytic", help="analytic, or a file written by `pdserve profile`")
    p.add_argument("--hardware-file", default=None, help="hardware catalogue YAML (default: the built-in one)")
    p.add_argument("--sample-instances", type=int, default=None,
                   help="simulate about this many instances of a larger cluster and scale up (fast, approximate)")
    p.add_argument("--no-fast-forward", action="store_true", help="step every decode step one by one")
    p.add_argument("--check-integrity", action="store_true", help="check KV bookkeeping after every step (slow)")
    p.add_argument("--out", default=None, help="write the result JSON (pdserve bench's shape) here")
    p.set_defaults(func=run_sim)

    from pdserve.sim.plan_cli import add_plan_args
    p = subparsers.add_parser("plan", help="size a cluster for a workload and latency objectives",
                              description="Search colocated vs disaggregated, P:D split, TP, budgets and hardware "
                                          "for the cheapest cluster meeting the objectives.")
    add_workload_args(p)
    add_plan_args(p)
    p.set_defaults(func=run_plan)

    from pdserve.sim.profile import add_profile_args
    p = subparsers.add_parser("profile", help="measure this machine's engine step times and fit a perf model",
                              description="Run the real engine over a grid of batch shapes and fit the simulator's "
                                          "calibrated step-time model (use it with --perf-model FILE).")
    add_profile_args(p)
    p.set_defaults(func=run_profile)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (a --cluster file, or inline)")
    g.add_argument("--cluster", default=None, help="cluster YAML (see docs/sim.md)")
    g.add_argument("--model", default=None, help="catalogue name or config.json path")
    g.add_argument("--hardware", default="h100-sxm", help="NAME, or PREFILL_NAME,DECODE_NAME when disaggregated")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp8", "int8", "fp4"))
    g.add_argument("--tp", type=int, default=1, help="cards per instance")
    g.add_argument("--parallelism", default="tp", choices=("tp", "ep"),
                   help="tp: tensor parallel; ep: MoE experts over the cards, attention data-parallel")
    g.add_argument("--attn-tp", type=int, default=1, help="ep: attention tensor-parallel over this many cards "
                   "in each data-parallel group (TP x EP x DP)")
    g.add_argument("--moe-imbalance", type=float, default=1.0,
                   help="ep: the busiest expert rank's routed tokens over the mean (>= 1)")
    g.add_argument("--ep-overlap", action="store_true",
                   help="ep: two micro-batches per step hide the all-to-alls behind computation")
    g.add_argument("--step-overhead-ms", type=float, default=None,
                   help="engine time per step outside the kernels (default: the card's catalogue entry)")
    g.add_argument("--step-overhead-per-seq-us", type=float, default=None,
                   help="engine time per request in a step (default: the card's catalogue entry)")
    g.add_argument("--mode", default="colocated", choices=("colocated", "disaggregated", "auto"),
                   help="auto: prefill and decode pools under the elastic controller, with path choice")
    g.add_argument("--instances", type=int, default=1, help="colocated instances")
    g.add_argument("--prefill", type=int, default=1, help="prefill instances (disaggregated)")
    g.add_argument("--decode", type=int, default=1, help="decode instances (disaggregated)")
    sched, cache = SchedulerConfig(), CacheConfig()  # the engine's own defaults (settings.py)
    g.add_argument("--max-num-batched-tokens", type=int, default=sched.max_num_batched_tokens)
    g.add_argument("--max-num-seqs", type=int, default=sched.max_num_seqs)
    g.add_argument("--block-size", type=int, default=cache.block_size)
    g.add_argument("--routing", default="least_loaded", choices=("round_robin", "least_loaded", "prefix_aware"))
    g.add_argument("--no-prefix-caching", action="store_true")
    add_store_args(p)


def cluster_from_args(args: argparse.Namespace):
    from pdserve.sim.cluster import ClusterSpec, PoolSpec, load_cluster
    if args.cluster:
        spec = load_cluster(args.cluster)
        store = store_from_args(args, spec.kv_store, spec.kv_store_planning)
        return replace(spec, kv_store=store[0], kv_store_planning=store[1])
    if not args.model:
        raise ValueError("give --cluster FILE or --model NAME (with --hardware, --mode, ...)")
    hw = [h for h in args.hardware.split(",") if h]
    if not 1 <= len(hw) <= 2:
        raise ValueError("--hardware takes one name, or two (prefill,decode) in disaggregated mode")

    def pool(name: str, n: int) -> PoolSpec:
        return PoolSpec(name, n, args.tp, args.max_num_batched_tokens, args.max_num_seqs,
                        parallelism=args.parallelism, attn_tp=args.attn_tp, moe_imbalance=args.moe_imbalance,
                        ep_overlap=args.ep_overlap, step_overhead_ms=args.step_overhead_ms,
                        step_overhead_per_seq_us=args.step_overhead_per_seq_us)
    store, store_planning = store_from_args(args, {}, {})
    common = dict(precision=args.precision, block_size=args.block_size, routing=args.routing,
                  enable_prefix_caching=not args.no_prefix_caching, kv_store=store, kv_store_planning=store_planning)
    if args.mode == "colocated":
        if len(hw) != 1:
            raise ValueError("colocated mode takes one --hardware name")
        return ClusterSpec(args.model, "colocated", colocated=pool(hw[0], args.instances), **common)
    return ClusterSpec(args.model, args.mode, prefill=pool(hw[0], args.prefill), decode=pool(hw[-1], args.decode),
                       **common)


def run_sim(args: argparse.Namespace) -> int:
    from pdserve.bench.report import format_result, sweep_result, write_json
    from pdserve.bench.workloads import with_arrival
    from pdserve.sim.simulator import SimOptions, Simulator
    from pdserve.sim.workload import work_items
    try:
        spec = cluster_from_args(args)
        config, rates = workload_from_args(args)
        options = SimOptions(perf_model=args.perf_model, hardware_file=args.hardware_file,
                             fast_forward=not args.no_fast_forward, sample_instances=args.sample_instances,
                             check_integrity=args.check_integrity, progress=args.progress,
                             seed=args.seed)  # the workload's seed draws the step jitter too
        configs = [config] if not rates else [with_arrival(config, replace(config.arrival, rate=r)) for r in rates]
        sims = [Simulator(spec, work_items(c), options,
                          concurrency=c.arrival.concurrency if c.arrival.is_closed_loop else None,
                          slo=(args.slo_ttft, args.slo_tpot), workload=c.describe()) for c in configs]
    except (ValueError, OSError) as e:
        print(f"pdserve sim: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    runs = []
    for sim in sims:
        result = sim.run()
        result.update({"model": spec.model, "base_url": "sim", "length_scale": config.length_scale})
        runs.append(result)
    wall = time.perf_counter() - t0
    result = runs[0] if not rates else sweep_result(label="sim", rates=rates, runs=runs,
                                                   attainment_target=runs[0]["attainment_target"])
    print(format_result(result))
    for run in runs:
        print(format_sim(run))
    num = sum(r["num_sent"] for r in runs)
    print(f"simulated {num} requests ({sum(r['duration_s'] for r in runs):.1f} s of cluster time) "
          f"in {wall:.2f} s wall: {num / max(wall, 1e-9):.0f} requests/s")
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def format_sim(result: dict) -> str:
    sim = result["sim"]
    cost = sim["cost"]
    lines = [f"{'pool':<12}{'sim inst':>9}{'KV tokens':>11}{'busy':>7}{'prefix hit':>11}{'preempt':>9}"]
    for name, p in sim["pools"].items():
        lines.append(f"{name:<12}{p['instances_simulated']:>9}{p['kv_tokens_per_instance']:>11}"
                     f"{p['busy_fraction']:>7.0%}{p['prefix_hit_rate']:>11.1%}{p['preemptions']:>9}")
    store = sim.get("kv_store")
    if store is not None:
        computed = sum(p["prompt_tokens_computed"] for p in sim["pools"].values())
        lines.append(f"KV store: prompt tokens computed {computed}, loaded {store['loaded_tokens']}, saves dropped "
                     f"{store['dropped_saves']}; " + ", ".join(
            f"{name} hit rate {t['hit_rate'] if t['hit_rate'] is None else format(t['hit_rate'], '.1%')} "
            f"({t['found_blocks']}/{t['looked_up_blocks']} blocks), evicted {t['evicted_blocks']}"
            for name, t in store["tiers"].items()))
    if sim["scale"] != 1.0:
        lines.append(f"sampled: throughputs scaled by {sim['scale']:g}")
    lines.append(f"cards {cost['num_cards']}, ${cost['price_per_hour']:.2f}/h, {cost['power_kw_tdp']:.1f} kW (TDP); "
                 f"$/Mtok: cached in {cost['cached_input_per_mtok']:.4f}, uncached in "
                 f"{cost['uncached_input_per_mtok']:.4f}, out {cost['output_per_mtok']:.4f}, "
                 f"blended {cost['blended_per_mtok']:.4f}")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    from pdserve.sim.plan_cli import run_plan_command
    return run_plan_command(args)


def run_profile(args: argparse.Namespace) -> int:
    from pdserve.sim.profile import run_profile_command
    return run_profile_command(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
