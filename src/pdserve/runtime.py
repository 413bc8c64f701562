"""Process-level tuning of pdserve's long-running processes: CPU pinning and thread count, malloc's
treatment of freed memory, and the garbage collector after start-up."""
from __future__ import annotations

import argparse
import os


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


def move_to_cores(cores: list[int]) -> None:
    """Pin every thread of this process to ``cores`` and size torch's thread pool to them (the elastic
    controller moving cores between workers at run time; the next step runs on the new cores)."""
    import torch

    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            continue  # a thread that just ended
    torch.set_num_threads(len(cores))


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


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the process that started it dies (Linux), so none is orphaned."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
