"""Simulator speed and the error of its speed-ups, measured in one run.

1. fast-forward vs plain stepping on the same run (round robin: must be identical; prints the speed-up);
2. sampling: a 64-instance cluster simulated in full vs an 8-instance slice (prints the errors);
3. scale: a 1000-card cluster (Llama-3.1-8B, 1000 x H100 TP1) serving a Poisson stream near capacity
   for one simulated hour, through a slice of --sample instances (default 1); prints simulated requests
   per wall-second and the wall time (target: under 5 minutes).

Usage: python benchmarks/sim_speed.py [--hours 1.0] [--cards 1000] [--rate-per-card 20] [--sample 1] [--quick]
"""
from __future__ import annotations

import argparse
import time

from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.simulator import SimOptions, Simulator, WorkItem
from pdserve.sim.workload import work_items, workload_config

SLO = (1.0, 0.05)
INPUT_LEN, OUTPUT_LEN = 1024, 256


def colocated(n: int, routing: str) -> ClusterSpec:
    return ClusterSpec("llama-3.1-8b", "colocated", colocated=PoolSpec("h100-sxm", n, 1, 2048, 256), routing=routing)


def timed(spec, items, **opts):
    t0 = time.perf_counter()
    r = Simulator(spec, items, SimOptions(**opts), slo=SLO).run()
    return r, time.perf_counter() - t0


def err(a: float, b: float) -> str:
    return f"{(b - a) / a:+.1%}" if a else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--cards", type=int, default=1000)
    ap.add_argument("--rate-per-card", type=float, default=20.0,
                    help="load per card (req/s); `pdserve plan` finds ~20.8 sustained per H100 here")
    ap.add_argument("--sample", type=int, default=1, help="instances simulated in part 3")
    ap.add_argument("--sections", default="1,2,3", help="which parts to run")
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    args = ap.parse_args()
    rate = args.rate_per_card
    sections = {int(x) for x in args.sections.split(",")}

    if 1 in sections:
        fast_forward_check(args, rate)
    if 2 in sections:
        sampling_check(args, rate)
    if 3 in sections:
        scale_check(args, rate)


def fast_forward_check(args, rate: float) -> None:
    n1 = 800 if args.quick else 4000
    items = work_items(workload_config(num_requests=n1, input_len=INPUT_LEN, output_len=OUTPUT_LEN, rate=8 * rate))
    plain, t_plain = timed(colocated(8, "round_robin"), items, fast_forward=False)
    fast, t_fast = timed(colocated(8, "round_robin"), items, fast_forward=True)
    same = all(plain[k] == fast[k] for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "goodput"))
    print(f"[1] fast-forward, 8 instances, {n1} requests: plain {t_plain:.2f} s, fast {t_fast:.2f} s "
          f"(x{t_plain / t_fast:.2f}); identical results: {same}")


def sampling_check(args, rate: float) -> None:
    """Sampling error: 64 instances in full vs slices of 8 and 1."""
    n2 = 3000 if args.quick else 20000
    items = work_items(workload_config(num_requests=n2, input_len=INPUT_LEN, output_len=OUTPUT_LEN, rate=64 * rate))
    for routing in ("round_robin", "least_loaded"):
        full, t_full = timed(colocated(64, routing), items)
        for k in (8, 1):
            part, t_part = timed(colocated(64, routing), items, sample_instances=k)
            print(f"[2] sampling ({routing}), 64 instances, {n2} requests: full {t_full:.1f} s, slice of {k} "
                  f"{t_part:.1f} s; "
                  f"errors of the slice: throughput {err(full['request_throughput'], part['request_throughput'])}, "
                  f"TTFT mean {err(full['ttft_s']['mean'], part['ttft_s']['mean'])} "
                  f"p90 {err(full['ttft_s']['p90'], part['ttft_s']['p90'])}, "
                  f"TPOT mean {err(full['tpot_s']['mean'], part['tpot_s']['mean'])} "
                  f"p90 {err(full['tpot_s']['p90'], part['tpot_s']['p90'])}, "
                  f"attainment {full['slo_attainment']:.3f} vs {part['slo_attainment']:.3f}")


def scale_check(args, rate: float) -> None:
    """1000 cards, one simulated hour, through a slice."""
    hours = 0.05 if args.quick else args.hours
    n_inst, k = args.cards, args.sample
    slice_rate = rate * k
    num = int(slice_rate * hours * 3600)
    shapes = work_items(workload_config(num_requests=num, input_len=INPUT_LEN, output_len=OUTPUT_LEN, rate=slice_rate,
                                        seed=1))
    # Index j of the slice stream is request (j // k) * n + j % k of the whole stream: exactly the
    # requests the simulator keeps for an instance slice of size k.
    items = [WorkItem((j // k) * n_inst + j % k, s.arrival_s, s.input_len, s.output_len) for j, s in enumerate(shapes)]
    spec = colocated(n_inst, "least_loaded")
    result, wall = timed(spec, items, sample_instances=k, progress=not args.quick)
    print(f"[3] {n_inst} cards (Llama-3.1-8B, H100 TP1), {rate * n_inst:.0f} req/s offered for "
          f"{hours:g} simulated h: {num} requests simulated in {wall:.1f} s wall = {num / wall:.0f} simulated "
          f"requests/wall-s ({num * result['sim']['scale'] / wall:.0f} cluster requests/wall-s); "
          f"attainment {result['slo_attainment']:.3f}, goodput {result['goodput']:.0f} req/s, "
          f"TTFT p90 {result['ttft_s']['p90'] * 1e3:.0f} ms, TPOT p90 {result['tpot_s']['p90'] * 1e3:.1f} ms; "
          f"target < 300 s: {'met' if wall < 300 else 'MISSED'}")


if __name__ == "__main__":
    main()
