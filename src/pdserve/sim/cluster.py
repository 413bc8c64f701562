"""Cluster files: what runs where. Read by ``pdserve sim --cluster``, written by ``pdserve plan``
(best-cluster.yaml), and read by ``pdserve up --config`` (the same file: ``pdserve up`` reads the
serving keys and ignores the planner-only ones).

Format (YAML; docs/sim.md has the reference)::

    model: llama-3.1-8b          # catalogue name or config.json path
    mode: disaggregated          # or colocated
    prefill: 2                   # instances per pool (colocated mode: `colocated: N`)
    decode: 3
    routing: least_loaded        # round_robin | least_loaded | prefix_aware
    scheduler: {max_num_batched_tokens: 2048, max_num_seqs: 256, enable_chunked_prefill: true}
    cache: {block_size: 16, enable_prefix_caching: true}
    # planner-only keys (pdserve up ignores them)
    hardware: h100-sxm           # every pool, or per pool:
    prefill_hardware: h100-sxm
    decode_hardware: h200
    tp: 1                        # every pool, or {prefill: 1, decode: 2}
    notes:
      precision: bf16
      kv_dtype: bf16
      decode_routing: least_loaded
      kv_link: auto              # auto | intra | inter (node) for prefill->decode KV
      pools:                     # per-pool settings overriding `scheduler` (and parallelism: tp | ep)
        prefill: {max_num_batched_tokens: 8192, max_num_seqs: 64}
    predicted: {...}             # the planner's figures (goodput, cost)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pdserve.sim.perf_model import BYTES_PER_PARAM
from pdserve.sim.routing import POLICIES

MODES = ("colocated", "disaggregated")
KV_LINKS = ("auto", "intra", "inter")


@dataclass(frozen=True)
class PoolSpec:
    """A set of identical instances (each ``tp`` cards) and their scheduler settings."""

    hardware: str
    instances: int = 1
    tp: int = 1
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True
    parallelism: str = "tp"  # how an instance's tp cards split the model: tp | ep (MoE, DP attention)

    def __post_init__(self) -> None:
        if self.parallelism not in ("tp", "ep"):
            raise ValueError(f"pool on {self.hardware}: parallelism must be tp or ep, got {self.parallelism!r}")
        if self.instances < 1 or self.tp < 1:
            raise ValueError(f"pool on {self.hardware}: instances and tp must be >= 1")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(f"pool on {self.hardware}: token budget and max_num_seqs must be >= 1")

    @property
    def num_cards(self) -> int:
        return self.instances * self.tp


@dataclass(frozen=True)
class ClusterSpec:
    model: str
    mode: str = "colocated"
    colocated: PoolSpec | None = None
    prefill: PoolSpec | None = None
    decode: PoolSpec | None = None
    precision: str = "bf16"
    kv_dtype: str = "bf16"
    block_size: int = 16
    enable_prefix_caching: bool = True
    routing: str = "least_loaded"
    decode_routing: str = "least_loaded"
    kv_link: str = "auto"
    extra: dict = field(default_factory=dict)  # free-form notes (the planner's predictions)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "colocated" and self.colocated is None:
            raise ValueError("colocated mode needs a 'colocated' pool")
        if self.mode == "disaggregated" and (self.prefill is None or self.decode is None):
            raise ValueError("disaggregated mode needs 'prefill' and 'decode' pools")
        if self.precision not in BYTES_PER_PARAM or self.kv_dtype not in BYTES_PER_PARAM:
            raise ValueError(f"precision and kv_dtype must be in {sorted(BYTES_PER_PARAM)}")
        if self.routing not in POLICIES or self.decode_routing not in POLICIES:
            raise ValueError(f"routing must be one of {POLICIES}")
        if self.kv_link not in KV_LINKS:
            raise ValueError(f"kv_link must be one of {KV_LINKS}, got {self.kv_link!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")

    @property
    def pools(self) -> dict[str, PoolSpec]:
        if self.mode == "colocated":
            return {"colocated": self.colocated}
        return {"prefill": self.prefill, "decode": self.decode}

    @property
    def num_cards(self) -> int:
        return sum(p.num_cards for p in self.pools.values())

    def to_dict(self) -> dict:
        pools = self.pools
        first = next(iter(pools.values()))
        out: dict = {"model": self.model, "mode": self.mode}
        for name, pool in pools.items():
            out[name] = pool.instances
        out["routing"] = self.routing
        out["scheduler"] = _sched(first)
        out["cache"] = {"block_size": self.block_size, "enable_prefix_caching": self.enable_prefix_caching}
        hardware = {p.hardware for p in pools.values()}
        if len(hardware) == 1:
            out["hardware"] = first.hardware
        else:
            for name, pool in pools.items():
                out[f"{name}_hardware"] = pool.hardware
        tps = {p.tp for p in pools.values()}
        out["tp"] = first.tp if len(tps) == 1 else {name: p.tp for name, p in pools.items()}
        notes: dict = {"precision": self.precision, "kv_dtype": self.kv_dtype, "decode_routing": self.decode_routing,
                       "kv_link": self.kv_link}
        overrides = {name: _pool_notes(p) for name, p in pools.items() if _pool_notes(p) != out["scheduler"]}
        if overrides:
            notes["pools"] = overrides
        out["notes"] = notes
        if self.extra:
            out["predicted"] = self.extra
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ClusterSpec:
        if not isinstance(data, dict) or "model" not in data:
            raise ValueError("a cluster file needs at least 'model' and a mode")
        known = {"model", "mode", "prefill", "decode", "colocated", "instances", "routing", "scheduler", "cache",
                 "hardware", "prefill_hardware", "decode_hardware", "colocated_hardware", "tp", "notes", "predicted"}
        ignored_by_sim = {"kv_transfer", "host", "port", "api_key", "min_remote_prefill_tokens", "dtype",
                          "max_model_len", "kv_cache_memory"}
        unknown = set(data) - known - ignored_by_sim
        if unknown:
            raise ValueError(f"unknown cluster file keys: {sorted(unknown)}")
        mode = data.get("mode", "colocated")
        notes = dict(data.get("notes") or {})
        sched = dict(data.get("scheduler") or {})
        bad = set(sched) - set(_SCHED_KEYS)
        if bad:
            raise ValueError(f"unknown scheduler keys: {sorted(bad)} (known: {list(_SCHED_KEYS)})")
        cache = dict(data.get("cache") or {})
        tp = data.get("tp", 1)
        names = ("colocated",) if mode == "colocated" else ("prefill", "decode")
        pools = {}
        for name in names:
            count = data.get(name, data.get("instances", 1) if name == "colocated" else 1)
            hw = data.get(f"{name}_hardware", data.get("hardware"))
            if hw is None:
                raise ValueError(f"the cluster file gives no hardware for the {name} pool ('hardware' or "
                                 f"'{name}_hardware')")
            settings = {**sched, **(notes.get("pools", {}).get(name, {}))}
            pools[name] = PoolSpec(str(hw), int(count), int(tp[name] if isinstance(tp, dict) else tp), **settings)
        return cls(model=str(data["model"]), mode=mode, **pools, routing=data.get("routing", "least_loaded"),
                   block_size=int(cache.get("block_size", 16)),
                   enable_prefix_caching=bool(cache.get("enable_prefix_caching", True)),
                   precision=notes.get("precision", "bf16"), kv_dtype=notes.get("kv_dtype", "bf16"),
                   decode_routing=notes.get("decode_routing", "least_loaded"), kv_link=notes.get("kv_link", "auto"),
                   extra=dict(data.get("predicted") or {}))

    def dump(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path


_SCHED_KEYS = ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill")


def _sched(pool: PoolSpec) -> dict:
    return {k: getattr(pool, k) for k in _SCHED_KEYS}


def _pool_notes(pool: PoolSpec) -> dict:
    notes = _sched(pool)
    if pool.parallelism != "tp":
        notes["parallelism"] = pool.parallelism
    return notes


def load_cluster(path: str | Path) -> ClusterSpec:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read cluster file {path}: {e}") from e
    try:
        return ClusterSpec.from_dict(data)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from e
