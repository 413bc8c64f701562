"""Frozen configuration, one dataclass per concern; each component receives only its own slice.

Values found at run time (the number of KV blocks that fit the budget, a port the OS chose) are returned
by the component that finds them and passed on, never written back into these objects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``2GiB``, ``512MiB``, ``1.5GB`` or ``1048576``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "hf", "gguf", "dummy")
QUANTIZATIONS = ("auto", "none", "int8", "q8_0", "q4_0", "q4_1")


@dataclass(frozen=True)
class ModelConfig:
    """What to load: a path or known name, how, and in which dtype."""

    model: str = "smollm2-135m"
    load_format: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the checkpoint's own context length
    seed: int = 0  # seeds dummy weights
    device: str = "auto"  # auto: cuda when available, else cpu
    # auto: a GGUF's own Q8_0/Q4_0/Q4_1/Q4_K weights stay quantized (CPU); none: dequantized at load;
    # int8 (= q8_0), q4_0, q4_1: every matrix quantized to that type at load
    quantization: str = "auto"

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size, memory budget, prefix caching."""

    block_size: int = 16
    kv_cache_memory_bytes: int = 2 * 2**30
    num_blocks: int | None = None  # overrides the budget (tests, simulator)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: a token budget per step and a cap on running requests."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True
    max_waiting: int = 4096  # admission bound: more waiting requests are refused (OverloadedError)

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs, as slices."""

    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
