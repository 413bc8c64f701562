"""The engine flags shared by every command that builds an engine (worker, up, generate, bench)."""
from __future__ import annotations

import argparse
import os

from pdserve.config import DTYPES, LOAD_FORMATS, QUANTIZATIONS, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_size


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add model, cache and scheduler flags (defaults from the config dataclasses)."""
    m, c, s = ModelConfig(), CacheConfig(), SchedulerConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=m.model, help="known name, .gguf file or HF folder (default %(default)s)")
    g.add_argument("--load-format", default=m.load_format, choices=LOAD_FORMATS)
    g.add_argument("--dtype", default=m.dtype, choices=DTYPES)
    g.add_argument("--quantization", default=m.quantization, choices=QUANTIZATIONS,
                   help="weights: auto keeps a GGUF's own quantized types (CPU), none dequantizes them, a type "
                        "quantizes every matrix to it at load (default %(default)s)")
    g.add_argument("--device", default=m.device, help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap (default: the model's)")
    g.add_argument("--seed", type=int, default=m.seed, help="seed of dummy weights")
    g.add_argument("--kv-cache-memory", default="1GiB", help="KV cache budget, e.g. 512MiB, 2GiB (default %(default)s)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (overrides --kv-cache-memory)")
    g.add_argument("--block-size", type=int, default=c.block_size, help="tokens per KV block")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--max-num-batched-tokens", type=int, default=s.max_num_batched_tokens)
    g.add_argument("--max-num-seqs", type=int, default=s.max_num_seqs)
    g.add_argument("--max-waiting", type=int, default=s.max_waiting, help="bound of the waiting queue")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    return parser


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags of ``add_engine_args`` describe (ValueError on bad values)."""
    return EngineConfig(
        model=ModelConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                          max_model_len=args.max_model_len, seed=args.seed, device=args.device,
                          quantization=args.quantization),
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory_bytes=parse_size(args.kv_cache_memory),
                          num_blocks=args.num_kv_blocks, enable_prefix_caching=args.enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                                  enable_chunked_prefill=args.enable_chunked_prefill))


def engine_args_to_argv(args: argparse.Namespace) -> list[str]:
    """The flags that rebuild the same engine settings (the launcher passes them to its workers)."""
    argv = ["--model", args.model, "--load-format", args.load_format, "--dtype", args.dtype,
            "--quantization", args.quantization,
            "--device", args.device, "--seed", str(args.seed), "--kv-cache-memory", str(args.kv_cache_memory),
            "--block-size", str(args.block_size), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting)]
    if args.max_model_len is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.num_kv_blocks is not None:
        argv += ["--num-kv-blocks", str(args.num_kv_blocks)]
    if not args.enable_prefix_caching:
        argv.append("--no-prefix-caching")
    if not args.enable_chunked_prefill:
        argv.append("--no-chunked-prefill")
    return argv


def add_cpu_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cpu placement")
    g.add_argument("--cpus", default=None, help="pin to these cores, e.g. 0 or 0-3 or 0,2 (default: no pinning)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: number of pinned cores)")


def apply_cpu_args(args: argparse.Namespace) -> list[int] | None:
    """Pin this process (os.sched_setaffinity) and size torch's thread pool; return the cores or None."""
    import torch

    cores = parse_cpu_list(args.cpus) if args.cpus else None
    if cores:
        os.sched_setaffinity(0, cores)
    threads = args.threads or (len(cores) if cores else None)
    if threads:
        torch.set_num_threads(threads)
    return cores


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's ceiling for this setting on 64-bit
TRIM_THRESHOLD_BYTES = 256 * 2**20


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS (Linux only;
    False where that is not possible).

    An engine step allocates multi-MB temporaries (a decode batch's gathered KV: batch x padded
    context, per layer) and frees them. With glibc's defaults, allocations above a threshold that adapts
    to past frees are mmap'ed and unmapped each time, and the top of the heap is trimmed: every step
    then page-faults its temporaries back in. Measured on a decode worker fed by shm transfers (which,
    never freeing a large block, keeps a low threshold): ~50k minor faults per step and steps of 5
    decodes at context ~750 taking ~200 ms instead of ~100 ms (docs/sim.md). Fixed thresholds stop
    both; the cost is that a worker keeps its peak temporaries mapped."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        return libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    except (OSError, AttributeError):
        return False


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, model, tokenizer: ~300k objects in a worker) out of the
    garbage collector's reach, so that its full passes walk only what serving allocates.

    Call once start-up is done. Without it, each full collection (CPython runs one now and then, inside
    whatever allocates next) walks all of them: ~150 ms measured in a worker here, which landed inside
    an engine step and stretched a 200 ms prefill to 350 ms at random (docs/sim.md)."""
    import gc

    gc.collect()
    gc.freeze()


def parse_cpu_list(text: str) -> list[int]:
    """``"0-2,5"`` -> [0, 1, 2, 5]."""
    cores: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(part))
    if not cores:
        raise ValueError(f"no cores in {text!r}")
    return cores
