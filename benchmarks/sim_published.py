"""The simulator against published GPU serving measurements: prediction errors, nothing fitted.

For every case of ``benchmarks/published_data.py`` (TensorRT-LLM's throughput tables, vLLM's latency
tests, NVIDIA NIM's concurrency sweeps) this runs ``pdserve sim``'s machinery on the same experiment: one
colocated instance of the same model, card, TP size and precision, the engine's scheduler limits and KV
memory rule, the same input/output lengths and load (every request at t=0, or a closed loop of N
users), and compares the published metrics:

* ``output_tps``: output tokens/s (all-at-once runs: over the makespan, as trtllm-bench reports it;
  closed loops: in the steady window between the N-th and the (total - N)-th completion);
* ``ttft_ms``, ``itl_ms`` (mean; ITL = TPOT, as AIPerf computes it): closed loops, over the requests
  sent in the steady window (the first N and last N requests left out; the first N, one per user, get
  output lengths spread over 1..OSL so that the users do not stay in lockstep: ``desynchronized``);
* ``e2e_ms``: the batch's latency (its last request's end), vLLM's ``benchmark_latency``.

The per-step engine overhead is the catalogue's (``hardware.yaml``); the operator times come from the
measured tables (``sim/op_data``). Error = simulated / published - 1. ``--json`` writes every case.

Usage: python benchmarks/sim_published.py [--sources trtllm,vllm,nim] [--max-requests 1500] [--json FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from published_data import CASES, DEEPSEEK, HELD_OUT, SOURCES, Case

from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.hardware import DEFAULT_CATALOGUE, load_catalogue
from pdserve.sim.models import get_model
from pdserve.sim.perf_model import BYTES_PER_PARAM, AnalyticPerfModel, BatchShape, instance_kv_blocks
from pdserve.sim.simulator import SimOptions, Simulator
from pdserve.sim.workload import work_items, workload_config

TRTLLM_KV_FRACTION = 0.95  # trtllm-bench's --kv_cache_free_gpu_mem_fraction for the perf-overview tables
NIM_KV_FRACTION = 0.9  # TensorRT-LLM's default kv_cache_free_gpu_mem_fraction
TRTLLM_BLOCK = 32  # TensorRT-LLM's tokens_per_block
RUNTIME_RESERVE = 2e9  # bytes per card TensorRT-LLM leaves outside weights and KV (activations, workspace)


def trtllm_limits(model, card, tp: int, isl: int, osl: int) -> tuple[int, int]:
    """(max batch, max tokens per step) as trtllm-bench's tuning heuristic sets them (described in its
    source, tensorrt_llm/bench/build/tuning.py): the requests of ISL+OSL tokens that fit in
    TRTLLM_KV_FRACTION of the memory left after the weights, capped at 4096 and rounded up (to 32 below
    256, 128 below 1024, else 256; at least 64); tokens: batch x (1 + ISL/OSL), capped at 32768, rounded
    up (to 256 below 4096, 512 below 8192, else 1024; at least 2048). Its KV heads per card are at least
    one."""
    kv_token = 2 * model.num_layers * max(tp, model.num_kv_heads) * model.head_dim * BYTES_PER_PARAM["fp8"]
    free = card.memory_bytes * tp - model.weight_bytes(BYTES_PER_PARAM["fp8"])
    requests = free * TRTLLM_KV_FRACTION / (kv_token * (isl + osl))
    raw_bs = min(requests, 4096)
    step = 32 if raw_bs < 256 else 128 if raw_bs < 1024 else 256
    batch = max(64, step * math.ceil(raw_bs / step))
    raw_tokens = min(raw_bs * (1 + isl / osl), 32768)
    step = 256 if raw_tokens < 4096 else 512 if raw_tokens < 8192 else 1024
    return batch, max(2048, step * math.ceil(raw_tokens / step))


def trtllm_kv_blocks(model, card, tp: int, precision: str, kv_dtype: str, fraction: float) -> int:
    """TensorRT-LLM's KV pool: ``fraction`` of each card's memory left after its weight shard and a runtime
    reserve, in blocks of TRTLLM_BLOCK tokens (KV heads split over the TP ranks)."""
    free = card.memory_bytes - model.weight_bytes(BYTES_PER_PARAM[precision]) / tp - RUNTIME_RESERVE
    per_token = model.kv_bytes_per_token(BYTES_PER_PARAM[kv_dtype]) * model.kv_shard_factor(tp)
    return int(free * fraction / (per_token * TRTLLM_BLOCK))


def no_evict_seqs(blocks: int, block_size: int, isl: int, osl: int, max_seqs: int) -> int:
    """TensorRT-LLM's default capacity policy (GUARANTEED_NO_EVICT) admits a request only when the KV
    of its whole length (input + output) fits, so it never preempts; with fixed lengths that is a cap on
    running requests, which the simulator's scheduler (vLLM-style: admit, preempt when full) gets as
    ``max_num_seqs``."""
    per_request = -(-(isl + osl) // block_size)
    return max(1, min(max_seqs, blocks // per_request))


def setup(case: Case, max_requests: int) -> tuple[ClusterSpec, int, int]:
    """The simulated experiment: (cluster, KV blocks per instance, requests)."""
    model, card = get_model(case.model), load_catalogue()[case.card]
    if case.source == "trtllm":
        batch, tokens = trtllm_limits(model, card, case.tp, case.isl, case.osl)
        blocks = instance_kv_blocks(model, card, case.tp, "fp8", TRTLLM_BLOCK, tokens, "fp8",
                                    memory_utilization=TRTLLM_KV_FRACTION)
        pool = PoolSpec(case.card, 1, case.tp, tokens, no_evict_seqs(blocks, TRTLLM_BLOCK, case.isl, case.osl, batch))
        spec = ClusterSpec(case.model, "colocated", colocated=pool, precision="fp8", kv_dtype="fp8",
                           block_size=TRTLLM_BLOCK, enable_prefix_caching=False)
        return spec, blocks, min(case.num_requests or max_requests, max_requests)
    pool = PoolSpec(case.card, 1, case.tp, **case.limits)
    if case.source == "nim":
        blocks = trtllm_kv_blocks(model, card, case.tp, case.precision, "fp8", NIM_KV_FRACTION)
        seqs = no_evict_seqs(blocks, TRTLLM_BLOCK, case.isl, case.osl, pool.max_num_seqs)
        pool = PoolSpec(case.card, 1, case.tp, pool.max_num_batched_tokens, seqs, pool.enable_chunked_prefill)
        spec = ClusterSpec(case.model, "colocated", colocated=pool, precision=case.precision, kv_dtype="fp8",
                           block_size=TRTLLM_BLOCK, enable_prefix_caching=False)
    else:  # vLLM: gpu_memory_utilization 0.9 after weights and activations (instance_kv_blocks' rule)
        blocks = instance_kv_blocks(model, card, case.tp, case.precision, 16, pool.max_num_batched_tokens)
        spec = ClusterSpec(case.model, "colocated", colocated=pool, precision=case.precision,
                           kv_dtype=case.precision, enable_prefix_caching=False)
    n = case.num_requests or max(6 * (case.concurrency or 1), 30)
    return spec, blocks, n


def desynchronized(items: list, users: int, osl: int, seed: int) -> list:
    """A closed loop whose users start in step: every user's first request (unscored) gets an output
    length drawn uniformly from 1..OSL (seeded), so that their later requests arrive at random phases, as
    in a long measurement where noise has long since broken the lockstep (a deterministic simulation of
    N identical users keeps them in waves, and their prefills queue behind each other)."""
    rng = random.Random(seed)
    out = list(items)
    for i in range(min(users, len(out))):
        out[i] = dataclasses.replace(out[i], output_len=rng.randint(1, osl))
    return out


def roofline_catalogue(directory: str) -> str:
    """The built-in catalogue without operator tables: the roofline-only baseline."""
    data = yaml.safe_load(DEFAULT_CATALOGUE.read_text(encoding="utf-8"))
    for entry in data["hardware"].values():
        entry.pop("op_tables", None)
    path = Path(directory) / "roofline-only.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


PHASE_SEEDS = 4  # closed loops: mean over this many draws of the users' phases


def simulate(case: Case, max_requests: int, hardware_file: str | None = None) -> dict[str, float]:
    """The case's metrics as the simulator predicts them (``hardware_file``: another catalogue); closed
    loops: the mean over PHASE_SEEDS draws of the users' phases."""
    if not case.concurrency:
        return _simulate_once(case, max_requests, hardware_file, 0)
    runs = [_simulate_once(case, max_requests, hardware_file, seed) for seed in range(PHASE_SEEDS)]
    return {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}


def _simulate_once(case: Case, max_requests: int, hardware_file: str | None, seed: int) -> dict[str, float]:
    spec, blocks, n = setup(case, max_requests)
    items = work_items(workload_config(num_requests=n, input_len=case.isl, output_len=case.osl, seed=0,
                                       concurrency=case.concurrency))
    if case.concurrency:
        items = desynchronized(items, case.concurrency, case.osl, seed)
    options = SimOptions(num_blocks=blocks, hardware_file=hardware_file)
    result = Simulator(spec, items, options, concurrency=case.concurrency).run()
    reqs = [r for r in result["requests"] if r["error"] is None]
    if case.concurrency is None:
        return {"output_tps": result["output_throughput"], "e2e_ms": max(r["e2e_s"] for r in reqs) * 1e3,
                "requests": n, "blocks": blocks}
    c = case.concurrency
    ends = sorted(r["send_s"] + r["e2e_s"] for r in reqs)
    lo, hi = ends[c - 1], ends[len(ends) - c - 1] if len(ends) > 2 * c else ends[-1]
    steady = sorted(reqs, key=lambda r: r["send_s"])[c:len(reqs) - c] or reqs
    done = sum(r["output_tokens"] for r in reqs if lo < r["send_s"] + r["e2e_s"] <= hi)
    return {"ttft_ms": statistics.fmean(r["ttft_s"] for r in steady) * 1e3,
            "itl_ms": statistics.fmean(r["tpot_s"] for r in steady) * 1e3,
            "output_tps": done / (hi - lo) if hi > lo else result["output_throughput"], "requests": n,
            "blocks": blocks}


def deepseek_node_throughput(hardware_file: str | None = None) -> dict[str, float]:
    """DeepSeek-V3 on H800 nodes (FP8, EP, two micro-batches overlapping the all-to-alls), per node:
    decode output tokens/s at the largest per-card batch whose step meets the per-user speed at the
    published mean context; prefill input tokens/s (cache hits included) for prompts of 4096 tokens with
    the published hit rate, 16 per card per step."""
    model, card = get_model("deepseek-v3"), load_catalogue(hardware_file)["h800"]
    d, p = DEEPSEEK["decode"], DEEPSEEK["prefill"]
    pm = AnalyticPerfModel(model, card, tp=d["ep"], precision="fp8", parallelism="ep", ep_overlap=True)
    best = 0.0
    for b in range(1, 512):
        n = d["ep"] * b
        t = pm.step_time_s(BatchShape(num_decode=n, decode_ctx=n * d["context"], num_samples=n))
        if t > d["tpot_s"]:
            break
        best = 8 * b / t
    pm = AnalyticPerfModel(model, card, tp=p["ep"], precision="fp8", parallelism="ep", ep_overlap=True)
    new = round(p["prompt"] * (1 - p["hit"]))
    cached, k = p["prompt"] - new, p["ep"] * p["prompts_per_card"]
    shape = BatchShape(k * new, k * (new * cached + new * (new + 1) / 2), k * p["prompt"], 0, 0, k, 0, k)
    return {"decode": best, "prefill": 8 * p["prompts_per_card"] * p["prompt"] / pm.step_time_s(shape)}


UNSCORED = {"deepseek"}  # a day's average per node, not a capacity: shown, left out of "all"
METRIC_CLASS = {"ttft_ms": "TTFT", "itl_ms": "TPOT", "e2e_ms": "TPOT", "output_tps": "throughput"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--max-requests", type=int, default=1500,
                    help="simulate at most this many of a throughput run's requests (default %(default)s)")
    ap.add_argument("--json", help="write every case's published and simulated figures here")
    ap.add_argument("--no-baseline", action="store_true", help="skip the roofline-only baseline runs")
    args = ap.parse_args()
    baseline = None if args.no_baseline else roofline_catalogue(tempfile.mkdtemp(prefix="sim-published-"))
    wanted = set(args.sources.split(","))
    unknown = wanted - set(SOURCES)
    if unknown:
        ap.error(f"unknown sources {sorted(unknown)}; known: {', '.join(SOURCES)}")
    for key in sorted(wanted):
        s = SOURCES[key]
        print(f"[{key}]{' (held out)' if key == HELD_OUT else ''} {s.name} -- {s.url} ({s.date})")
    print(f"\n{'source':<9}{'model':<15}{'card':<10}{'tp':>3}{'prec':>5}{'ISL/OSL':>11}{'load':>7}"
          f"{'metric':>11}{'published':>11}{'simulated':>11}{'error':>8}{'roofline':>10}{'wall s':>7}")
    rows = []
    for case in CASES:
        if case.source not in wanted:
            continue
        t0 = time.monotonic()
        sim = simulate(case, args.max_requests)
        wall = time.monotonic() - t0
        base = simulate(case, args.max_requests, baseline) if baseline else {}
        load = f"c={case.concurrency}" if case.concurrency else "all"
        for metric, published in case.published.items():
            err = sim[metric] / published - 1
            base_err = base[metric] / published - 1 if base else None
            rows.append({"source": case.source, "model": case.model, "card": case.card, "tp": case.tp,
                         "precision": case.precision, "isl": case.isl, "osl": case.osl,
                         "concurrency": case.concurrency, "metric": metric, "published": published,
                         "simulated": sim[metric], "error": err, "roofline_error": base_err})
            base_text = f"{base_err:>+10.1%}" if base else f"{'-':>10}"
            print(f"{case.source:<9}{case.model:<15}{case.card:<10}{case.tp:>3}{case.precision:>5}"
                  f"{f'{case.isl}/{case.osl}':>11}{load:>7}{metric:>11}{published:>11.1f}{sim[metric]:>11.1f}"
                  f"{err:>+8.1%}{base_text}{wall:>7.1f}", flush=True)
    if "deepseek" in wanted:
        sim, base = deepseek_node_throughput(), deepseek_node_throughput(baseline) if baseline else {}
        for phase in ("decode", "prefill"):
            published = DEEPSEEK[phase]["published_tps_node"]
            err = sim[phase] / published - 1
            base_err = base[phase] / published - 1 if base else None
            rows.append({"source": "deepseek", "model": "deepseek-v3", "card": "h800", "tp": DEEPSEEK[phase]["ep"],
                         "precision": "fp8", "metric": "output_tps", "phase": phase, "published": published,
                         "simulated": sim[phase], "error": err, "roofline_error": base_err})
            base_text = f"{base_err:>+10.1%}" if base else f"{'-':>10}"
            print(f"{'deepseek':<9}{'deepseek-v3':<15}{'h800':<10}{DEEPSEEK[phase]['ep']:>3}{'fp8':>5}{phase:>11}"
                  f"{'node':>7}{'tok/s':>11}{published:>11.1f}{sim[phase]:>11.1f}{err:>+8.1%}{base_text}{0:>7.1f}")
    for field, title in (("error", "operator tables"), ("roofline_error", "roofline only (baseline, same run)")):
        if field == "roofline_error" and baseline is None:
            continue
        print(f"\nMAPE (mean |error|), {title}, by source and kind of figure:")
        print("| source | TTFT | TPOT | throughput |\n|---|---|---|---|")
        for key in [k for k in SOURCES if k in wanted] + ["all"]:
            cells = []
            for kind in ("TTFT", "TPOT", "throughput"):
                errs = [abs(r[field]) for r in rows if METRIC_CLASS[r["metric"]] == kind
                        and (r["source"] == key or (key == "all" and r["source"] not in UNSCORED))]
                cells.append(f"{statistics.fmean(errs):.1%} (n={len(errs)}, max {max(errs):.1%})" if errs else "-")
            name = f"{key} (held out)" if key == HELD_OUT else f"{key} (not in all)" if key in UNSCORED else key
            print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"sources": {k: vars(v) for k, v in SOURCES.items()}, "held_out": HELD_OUT, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
