"""Frozen configuration, one dataclass per concern; each component receives only its own slice.

Values found at run time (the number of KV blocks that fit the budget, a port the OS chose) are returned
by the component that finds them and passed on, never written back into these objects.

The engine's slices (model, cache, scheduler) are its settings: ``settings.py`` makes the command-line
flags, cluster-file keys and ``LLM``'s keyword arguments from these fields and their metadata, once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

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


def format_size(num_bytes: int) -> str:
    """``2**30`` -> ``1GiB``; sizes that are no whole number of a binary unit stay in bytes."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= factor and num_bytes % factor == 0:
            return f"{num_bytes // factor}{unit}"
    return str(num_bytes)


DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "hf", "gguf", "dummy")
QUANTIZATIONS = ("auto", "none", "int8", "q8_0", "q4_0", "q4_1")
# auto: the model's dtype; fp8: float8_e4m3fn, stored as is (no scales: a scale of 1.0, as vLLM's
# uncalibrated fp8 KV cache), half the bytes of bfloat16 per block, in memory and on the wire
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    """What to load: a path or known name, how, and in which dtype."""

    model: str = field(default="smollm2-135m", metadata={"help": "known name, .gguf file or HF folder"})
    load_format: str = field(default="auto", metadata={"choices": LOAD_FORMATS})
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    max_model_len: int | None = field(default=None, metadata={
        "type": int, "help": "context length cap (default: the model's)"})
    seed: int = field(default=0, metadata={"help": "seed of dummy weights"})
    device: str = field(default="auto", metadata={"help": "auto (the available device backend of highest "
                        "priority: cuda, else cpu), cpu, cuda:1, or a plugin's name (pdserve.devices)"})
    # auto: a GGUF's own Q8_0/Q4_0/Q4_1/Q4_K weights stay quantized (CPU); none: dequantized at load;
    # int8 (= q8_0), q4_0, q4_1: every matrix quantized to that type at load
    quantization: str = field(default="auto", metadata={
        "choices": QUANTIZATIONS, "help": "weights: auto keeps a GGUF's own quantized types (CPU), none "
        "dequantizes them, a type quantizes every matrix to it at load"})

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
    """The paged KV cache: block size, memory budget, prefix caching, the dtype its K/V are stored in."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    kv_cache_memory_bytes: int = field(default=2**30, metadata={
        "name": "kv_cache_memory", "parse": parse_size, "show": format_size, "help": "KV cache budget, e.g. 512MiB, 2GiB"})
    num_blocks: int | None = field(default=None, metadata={
        "name": "num_kv_blocks", "type": int, "help": "KV blocks (overrides --kv-cache-memory)"})
    enable_prefix_caching: bool = field(default=True, metadata={"flag": "--no-prefix-caching"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "choices": KV_CACHE_DTYPES, "help": "KV cache dtype: auto (the model's) or fp8 (float8_e4m3fn, no "
        "scales: twice the blocks in the budget, half the bytes per transfer)"})

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            hint = " (int8 needs per-token scales, which pdserve's KV cache does not keep)" \
                if self.kv_cache_dtype == "int8" else ""
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}{hint}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: a token budget per step and a cap on running requests."""

    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one step"})
    max_num_seqs: int = field(default=128, metadata={"help": "requests running at once"})
    enable_chunked_prefill: bool = field(default=True, metadata={"flag": "--no-chunked-prefill"})
    max_waiting: int = field(default=4096, metadata={"help": "bound of the waiting queue (more are refused)"})

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")


def parse_disk(text: str) -> tuple[str, int]:
    """``DIR[:SIZE]`` -> (directory, bytes); the size defaults to ``DEFAULT_DISK_BYTES``."""
    path, sep, size = text.rpartition(":")
    if sep and path and re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*[a-zA-Z]*\s*", size):
        return path, parse_size(size)
    return text, DEFAULT_DISK_BYTES


DEFAULT_DISK_BYTES = 16 * 2**30
REMOTE_SCHEMES = ("redis", "rediss", "mooncake")


@dataclass(frozen=True)
class KVStoreConfig:
    """The KV store tiers beside a worker's own cache (kv/store/, docs/kv_store.md); all off by default.

    ``host_memory_bytes``: a pool in shared memory that every worker of this model on the host shares;
    ``disk``: ``DIR[:SIZE]``, block files under DIR within SIZE bytes; ``remote``: a store shared across
    hosts, ``redis://host:port[/db]`` (the Redis protocol: Redis, Valkey) or ``mooncake://master:port``
    (Mooncake's store; ``?metadata=URL`` when its metadata server is not the master's). ``pdserve up`` also
    takes ``redis`` or ``mooncake`` alone: it starts that server on this host and stops it on exit."""

    host_memory_bytes: int = field(default=0, metadata={
        "name": "kv_host_memory", "parse": parse_size, "show": format_size,
        "help": "host-memory KV tier shared by this host's workers, e.g. 4GiB (0: off)"})
    disk: str = field(default="", metadata={
        "name": "kv_disk", "help": "disk KV tier: DIR[:SIZE], e.g. /var/cache/pdserve-kv:100GiB"})
    remote: str = field(default="", metadata={
        "name": "kv_remote", "help": "remote KV tier shared across hosts: redis://host:port or mooncake://host:port"})
    save_queue_bytes: int = field(default=0, metadata={
        "name": "kv_save_queue", "parse": parse_size, "show": format_size,
        "help": "KV bytes waiting to be saved to the store; saves beyond it are dropped (0: a quarter of "
                "the worker's KV cache, so it scales with the model and the card)"})
    timeout_s: float = field(default=1.0, metadata={
        "name": "kv_store_timeout", "help": "seconds a remote-tier call may take before the tier is skipped"})

    def __post_init__(self) -> None:
        if self.host_memory_bytes < 0 or self.save_queue_bytes < 0:
            raise ValueError("KV store sizes must be >= 0")
        if self.disk and self.disk_bytes <= 0:
            raise ValueError(f"kv_disk: the size must be > 0, got {self.disk!r}")
        if self.remote:
            scheme = self.remote.split("://", 1)[0]
            if scheme not in REMOTE_SCHEMES:
                raise ValueError(f"kv_remote must start with one of {[s + '://' for s in REMOTE_SCHEMES]}, "
                                 f"got {self.remote!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"kv_store_timeout must be > 0, got {self.timeout_s}")

    @property
    def enabled(self) -> bool:
        return bool(self.host_memory_bytes or self.disk or self.remote)

    @property
    def disk_path(self) -> str:
        return parse_disk(self.disk)[0] if self.disk else ""

    @property
    def disk_bytes(self) -> int:
        return parse_disk(self.disk)[1] if self.disk else 0


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs, as slices."""

    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
