"""The analytic model against published GPU serving measurements (prediction errors, nothing fitted).

Source: TensorRT-LLM's performance overview (NVIDIA/TensorRT-LLM, docs/source/performance/perf-overview.md,
v1.0 docs, commit 00f37686aa854010d68bcbd0f4ab000221541ca6): ``trtllm-bench throughput`` (PyTorch
backend), every request queued at once, fixed input/output lengths (ISL/OSL), ModelOpt FP8 checkpoints,
"Total Output Throughput (tokens/sec)" of the whole TP group. This script simulates the same experiment
with ``pdserve sim``'s machinery: one colocated instance of the same card and TP size, FP8 weights, FP8
KV cache, the same request count (capped with ``--max-requests``: the simulator's cost grows with
it), all requests at t=0, and the scheduler limits trtllm-bench's heuristic picks for that run
(``trtllm_limits``: the batch that fits the KV cache at ISL+OSL, rounded up, at most 4096; tokens per
step batch x (1 + ISL/OSL), at most 32768). Output throughput = output tokens / makespan, as
trtllm-bench reports it.

What differs, and is not modelled: TensorRT-LLM overlaps the scheduler with the GPU and captures CUDA
graphs (our per-step overhead is the catalogue's 1 ms); its attention and GEMM efficiencies are
its own (ours: the catalogue's 0.6 compute, 0.8 memory, 0.5 attention, from data sheets and first
principles, not from these tables).

Usage: python benchmarks/sim_published.py [--models llama-3.1-8b,llama-3.1-70b] [--max-requests 3000]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.hardware import load_catalogue
from pdserve.sim.models import get_model
from pdserve.sim.perf_model import BYTES_PER_PARAM, instance_kv_blocks
from pdserve.sim.simulator import SimOptions, Simulator
from pdserve.sim.workload import work_items, workload_config

SOURCE = ("TensorRT-LLM perf-overview (v1.0 docs, NVIDIA/TensorRT-LLM@00f37686, "
          "docs/source/performance/perf-overview.md), FP8, trtllm-bench throughput, PyTorch backend")
KV_FRACTION = 0.95  # trtllm-bench's --kv_cache_free_gpu_mem_fraction for these tables
BLOCK_SIZE = 32  # TensorRT-LLM's default tokens_per_block
# trtllm-bench's request count per ISL/OSL (the same document)
NUM_REQUESTS = {(128, 128): 30000, (128, 2048): 3000, (128, 4096): 1500, (1000, 2000): 1500, (2048, 128): 3000,
                (2048, 2048): 1500, (5000, 500): 1500, (1000, 1000): 3000, (500, 2000): 3000}

# (model, card, tp) -> {(ISL, OSL): published total output tokens/s}
PUBLISHED = {
    ("llama-3.1-8b", "h100-sxm", 1): {
        (128, 128): 28312, (128, 2048): 22714, (128, 4096): 14325, (500, 2000): 17660, (1000, 1000): 15220,
        (1000, 2000): 13899, (2048, 128): 3450, (2048, 2048): 9305, (5000, 500): 3459},
    ("llama-3.1-8b", "h200", 1): {
        (128, 128): 27911, (128, 2048): 26221, (128, 4096): 18027, (500, 2000): 20770, (1000, 1000): 17744,
        (1000, 2000): 16828, (2048, 128): 3538, (2048, 2048): 12194, (5000, 500): 3902},
    # Llama 3.3 70B has Llama 3.1 70B's shape
    ("llama-3.1-70b", "h200", 1): {
        (128, 128): 3803, (128, 2048): 4336, (128, 4096): 2872, (500, 2000): 3666, (1000, 1000): 2909,
        (1000, 2000): 2994, (2048, 128): 442, (2048, 2048): 2003, (5000, 500): 566},
    ("llama-3.1-70b", "h100-sxm", 2): {
        (128, 128): 6378, (128, 2048): 6651, (128, 4096): 4199, (500, 2000): 5222, (1000, 1000): 4205,
        (1000, 2000): 4146, (2048, 128): 762, (2048, 2048): 3082, (5000, 500): 898},
}


def trtllm_limits(model, card, tp: int, isl: int, osl: int) -> tuple[int, int]:
    """(max batch, max tokens per step) as trtllm-bench's tuning heuristic sets them (described in its
    source, tensorrt_llm/bench/build/tuning.py): the requests of ISL+OSL tokens that fit in
    KV_FRACTION of the memory left after the weights, capped at 4096 and rounded up (to 32 below 256, 128
    below 1024, else 256; at least 64); tokens: batch x (1 + ISL/OSL), capped at 32768, rounded up (to 256
    below 4096, 512 below 8192, else 1024; at least 2048). Its KV heads per card are at least one."""
    kv_token = 2 * model.num_layers * max(tp, model.num_kv_heads) * model.head_dim * BYTES_PER_PARAM["fp8"]
    free = card.memory_bytes * tp - model.weight_bytes(BYTES_PER_PARAM["fp8"])
    requests = free * KV_FRACTION / (kv_token * (isl + osl))
    raw_bs = min(requests, 4096)
    step = 32 if raw_bs < 256 else 128 if raw_bs < 1024 else 256
    batch = max(64, step * math.ceil(raw_bs / step))
    raw_tokens = min(raw_bs * (1 + isl / osl), 32768)
    step = 256 if raw_tokens < 4096 else 512 if raw_tokens < 8192 else 1024
    return batch, max(2048, step * math.ceil(raw_tokens / step))


def simulate(model_name: str, card_name: str, tp: int, isl: int, osl: int, max_requests: int) -> tuple[float, dict]:
    """Output tokens/s of one instance running the published experiment, and the limits used."""
    model, card = get_model(model_name), load_catalogue()[card_name]
    batch, tokens = trtllm_limits(model, card, tp, isl, osl)
    n = min(NUM_REQUESTS[(isl, osl)], max_requests)
    pool = PoolSpec(card_name, 1, tp, tokens, batch)
    spec = ClusterSpec(model_name, "colocated", colocated=pool, precision="fp8", kv_dtype="fp8",
                       block_size=BLOCK_SIZE, enable_prefix_caching=False)
    blocks = instance_kv_blocks(model, card, tp, "fp8", BLOCK_SIZE, tokens, "fp8", memory_utilization=KV_FRACTION)
    items = work_items(workload_config(num_requests=n, input_len=isl, output_len=osl, seed=0))
    result = Simulator(spec, items, SimOptions(num_blocks=blocks)).run()
    return result["output_throughput"], {"batch": batch, "tokens": tokens, "requests": n, "blocks": blocks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(sorted({m for m, _, _ in PUBLISHED})))
    ap.add_argument("--max-requests", type=int, default=3000,
                    help="simulate at most this many of the published run's requests (default %(default)s)")
    args = ap.parse_args()
    models = set(args.models.split(","))
    print(f"source: {SOURCE}")
    print(f"{'model':<15}{'card':<10}{'tp':>3}{'ISL/OSL':>11}{'published':>11}{'analytic':>10}{'error':>8}"
          f"{'batch':>7}{'tokens':>8}{'requests':>9}{'wall s':>8}")
    errors: dict[tuple, list[float]] = {}
    for (model, card, tp), table in PUBLISHED.items():
        if model not in models:
            continue
        for (isl, osl), published in table.items():
            t0 = time.monotonic()
            predicted, used = simulate(model, card, tp, isl, osl, args.max_requests)
            err = predicted / published - 1
            errors.setdefault((model, card, tp), []).append(err)
            print(f"{model:<15}{card:<10}{tp:>3}{f'{isl}/{osl}':>11}{published:>11,}{predicted:>10,.0f}{err:>+8.1%}"
                  f"{used['batch']:>7}{used['tokens']:>8}{used['requests']:>9}{time.monotonic() - t0:>8.1f}",
                  flush=True)
    print("\nper model and card: median error, median |error|, range")
    for (model, card, tp), errs in errors.items():
        print(f"  {model} on {tp} x {card}: median {statistics.median(errs):+.1%}, median |error| "
              f"{statistics.median(abs(e) for e in errs):.1%}, {min(errs):+.1%} .. {max(errs):+.1%} ({len(errs)} runs)")
    all_errs = [abs(e) for errs in errors.values() for e in errs]
    print(f"all: median |error| {statistics.median(all_errs):.1%} over {len(all_errs)} published figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
