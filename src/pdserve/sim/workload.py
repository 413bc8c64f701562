"""The simulator's side of the workload: ``pdserve bench``'s generator, reduced to ``WorkItem``s.

``bench.workloads.build_shapes`` (lengths, arrival times, Mooncake hash ids; no token lists) is the one
source of request streams for both the load generator and the simulator, so a simulated run and a
real one see the same requests for the same flags and seed.
"""
from __future__ import annotations

import argparse

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.workloads import WorkloadConfig, build_shapes
from pdserve.progress import on_terminal
from pdserve.sim.simulator import WorkItem


def work_items(config: WorkloadConfig) -> list[WorkItem]:
    return [WorkItem(s.index, s.arrival_s, s.input_len, s.output_len, tuple(s.hash_ids), s.block_size)
            for s in build_shapes(config)]


def workload_config(dataset: str = "random", num_requests: int | None = None, input_len: int = 1024,
                    output_len: int = 128, rate: float | None = None, concurrency: int | None = None,
                    burstiness: float = 1.0, time_scale: float | None = None, length_scale: float = 1.0,
                    seed: int = 0, input_len_range: tuple[int, int] | None = None,
                    output_len_range: tuple[int, int] | None = None) -> WorkloadConfig:
    """A WorkloadConfig from bench-style flags. ``dataset``: random | mooncake:FILE | azure:FILE.
    Arrivals: closed loop with ``concurrency``; else gamma (burstiness != 1) or Poisson at ``rate``;
    traces without a rate replay their own timestamps (times ``time_scale``)."""
    kind, _, path = dataset.partition(":")
    if kind in ("mooncake", "azure") and not path:
        raise ValueError(f"dataset {kind!r} needs a file: {kind}:FILE")
    if kind not in ("random", "mooncake", "azure"):
        raise ValueError(f"dataset must be random, mooncake:FILE or azure:FILE, got {dataset!r}")
    if concurrency is not None:
        arrival = ArrivalConfig(kind="closed", concurrency=concurrency)
    elif rate is None and kind != "random":
        arrival = ArrivalConfig(kind="trace", time_scale=1.0 if time_scale is None else time_scale)
    else:
        r = float("inf") if rate is None else rate
        arrival = ArrivalConfig(kind="gamma" if burstiness != 1.0 else "poisson", rate=r, burstiness=burstiness)
    return WorkloadConfig(dataset=kind, trace_path=path or None, num_requests=num_requests, input_len=input_len,
                          output_len=output_len, input_len_range=input_len_range, output_len_range=output_len_range,
                          length_scale=length_scale, seed=seed, arrival=arrival)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """``pdserve bench``'s workload and arrival flags (one implementation), plus the objectives."""
    from pdserve.bench.cli import add_workload_arguments
    add_workload_arguments(p)
    g = p.add_argument_group("objectives")
    g.add_argument("--slo-ttft", type=float, default=None, metavar="SECONDS")
    g.add_argument("--slo-tpot", type=float, default=None, metavar="SECONDS")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (the default when stderr is not a terminal)")
    p.set_defaults(progress=on_terminal())


def workload_from_args(args: argparse.Namespace):
    """(WorkloadConfig, sweep rates or None), exactly as ``pdserve bench`` reads the same flags."""
    from pdserve.bench.cli import workload_from_args as bench_workload
    for name in ("slo_ttft", "slo_tpot"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    return bench_workload(args)


def multi_turn_items(num_conversations: int, num_turns: int, first_len: int, turn_len: int, output_len: int,
                     block_size: int = 16) -> list[WorkItem]:
    """``bench.workloads.multi_turn_conversations`` as ``benchmarks/kv_store.py replay`` sends it (closed
    loop, one request at a time): turn t of every conversation, then turn t + 1; a turn's prompt is the
    conversation so far (messages and answers) and its own message. Hash ids name each ``block_size`` tokens
    of a conversation and cover the answer too, so the next turn reuses this turn's prompt and output KV."""
    items = []
    for turn in range(num_turns):
        for c in range(num_conversations):
            prompt = first_len + turn * (output_len + turn_len)
            total = prompt + output_len
            ids = tuple(c * 1_000_000 + b for b in range(-(-total // block_size)))
            items.append(WorkItem(len(items), None, prompt, output_len, ids, block_size, hashed_tokens=total))
    return items
