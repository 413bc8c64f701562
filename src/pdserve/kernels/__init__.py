"""C++ kernels for the CPU, built on first use by PyTorch's extension builder and cached on disk.

The engine runs without them (plain PyTorch, on every device); with them, decode attention reads K/V
blocks where they lie in the paged cache (``cpu_attention.cpp``), and residual add + RMSNorm and
SiLU-and-multiply each take one pass over memory instead of several ops (``cpu_layers.cpp``), and
block-quantized weights (GGUF Q8_0/Q4_0/Q4_1/Q4_K, int8) are multiplied without being dequantized in
memory (``cpu_quant_gemm.cpp``). The build takes a few seconds once per machine, source and torch version
(its folder's name is a digest of all three, so ``-march=native`` never runs on a CPU it was not built for), under ``$PDSERVE_CACHE/kernels``; every load marks its folder as
used, and folders of other builds unused for ``KEEP_UNUSED_DAYS`` are removed (old sources, old torch).
``PDSERVE_CPU_KERNELS=0`` turns them off; a failed build (no C++ compiler, say) logs one warning and the
fallback is used.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.paths import cache_dir

logger = logging.getLogger(__name__)

_SOURCES = tuple(Path(__file__).with_name(name) for name in
                 ("cpu_attention.cpp", "cpu_prefill_attention.cpp", "cpu_layers.cpp",
                  "cpu_quant_gemm.cpp"))
_HEADERS = (Path(__file__).with_name("dispatch.h"),)  # in the digest, not compiled on their own
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # OpenMP: at::parallel_for uses torch's pool
_LDFLAGS = ["-fopenmp"]
KEEP_UNUSED_DAYS = 14  # another build's folder is removed once unused this long
STALE_LOCK_S = 600.0  # a build lock this old belongs to a builder that died
LIBRARY = "pdserve_cpu_kernels"


def enabled() -> bool:
    value = os.environ.get("PDSERVE_CPU_KERNELS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PDSERVE_CPU_KERNELS must be 0 or 1, got {value!r}")
    return value == "1"


@functools.cache
def cpu_ops() -> Any | None:
    """``torch.ops.pdserve`` with the CPU kernels loaded, or None when they are off or cannot be built."""
    if not enabled():
        return None
    try:
        _build()
    except Exception as e:  # noqa: BLE001 - any build failure means: run the PyTorch fallback
        logger.warning("CPU kernels unavailable, using the PyTorch fallback: %s", str(e).strip()[-500:])
        return None
    return torch.ops.pdserve


def cpu_ops_for(x: torch.Tensor) -> Any | None:
    """``cpu_ops()`` when ``x`` lives on the CPU, else None: the one check every caller makes."""
    return cpu_ops() if x.device.type == "cpu" else None


def _build() -> None:
    """Load this source's build from the cache, building it first when there is none."""
    build_dir = cache_dir() / "kernels" / f"cpu-{_digest()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{LIBRARY}.so"
    start = time.perf_counter()
    if library.exists():  # the folder's name is the digest of what built it: nothing to check again
        torch.ops.load_library(str(library))
    else:
        from torch.utils import cpp_extension

        _remove_stale_lock(build_dir / "lock")
        cpp_extension.load(LIBRARY, [str(s) for s in _SOURCES], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
    logger.info("CPU kernels ready (%s, %.1f s)", build_dir, time.perf_counter() - start)
    prune_builds(build_dir)


def _remove_stale_lock(lock: Path) -> None:
    """PyTorch's builder waits, without end, for the lock file of a build another process runs; a builder
    that was killed leaves it behind. A lock older than any build takes is removed."""
    try:
        age_s = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age_s > STALE_LOCK_S:
        logger.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age_s)
        lock.unlink(missing_ok=True)


def prune_builds(current: Path, keep_unused_s: float = KEEP_UNUSED_DAYS * 86400.0) -> list[Path]:
    """Mark ``current`` as used now and remove the other ``cpu-*`` build folders beside it that have not
    been used for ``keep_unused_s`` (another checkout or version may still use a recent one); returns
    the folders removed."""
    now = time.time()
    os.utime(current, (now, now))
    removed = []
    for other in current.parent.glob("cpu-*"):
        if other != current and other.is_dir() and now - other.stat().st_mtime > keep_unused_s:
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other)
    if removed:
        logger.info("removed %d unused CPU kernel build(s) from %s", len(removed), current.parent)
    return removed


def _digest() -> str:
    """Sources, flags, torch version and this CPU (model and instruction-set flags)."""
    h = hashlib.sha256()
    for src in (*_SOURCES, *_HEADERS):
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(platform.machine().encode())
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        h.update("".join(line for line in cpuinfo if line.startswith(("model name", "flags"))).encode())
    except OSError:
        h.update(platform.processor().encode())
    return h.hexdigest()[:16]
