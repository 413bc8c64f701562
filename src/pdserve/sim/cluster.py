"""What runs where, as the simulator sees it: ``ClusterSpec`` (pools of identical instances) and ``PoolSpec``.

Cluster files are read and written through the one schema of ``pdserve.cluster_file`` (the same file
``pdserve up --config`` deploys): ``load_cluster`` and ``ClusterSpec.dump``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from pdserve import cluster_file
from pdserve.cluster_file import ClusterFile
from pdserve.router.policies import POLICIES
from pdserve.sim.perf_model import BYTES_PER_PARAM
from pdserve.sim.store import StoreSpec

MODES = ("colocated", "disaggregated", "auto")  # auto: prefill and decode pools under the elastic controller
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
    # ep only (docs/sim.md, "MoE and expert parallelism"): attention TP inside each data-parallel group,
    # the busiest expert rank's load over the mean, and two micro-batches hiding the all-to-alls.
    attn_tp: int = 1
    moe_imbalance: float = 1.0
    ep_overlap: bool = False
    # The engine's time outside the kernels, per step and per request in it (None: the card's catalogue entry).
    step_overhead_ms: float | None = None
    step_overhead_per_seq_us: float | None = None

    def __post_init__(self) -> None:
        if self.parallelism not in ("tp", "ep"):
            raise ValueError(f"pool on {self.hardware}: parallelism must be tp or ep, got {self.parallelism!r}")
        if self.attn_tp < 1 or self.tp % self.attn_tp or (self.parallelism == "tp" and self.attn_tp != 1):
            raise ValueError(f"pool on {self.hardware}: attn_tp must divide tp under ep parallelism (and be 1 "
                             f"under tp), got {self.attn_tp} of {self.tp}")
        if not self.moe_imbalance >= 1.0:
            raise ValueError(f"pool on {self.hardware}: moe_imbalance must be >= 1, got {self.moe_imbalance}")
        if any(v is not None and not v >= 0 for v in (self.step_overhead_ms, self.step_overhead_per_seq_us)):
            raise ValueError(f"pool on {self.hardware}: step overheads must be >= 0")
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
    min_remote_prefill_tokens: int = 0  # shorter prompts are computed on their decode instance
    max_inflight: int | None = None  # the frontend's admission bounds (None: none)
    max_inflight_per_instance: int | None = None
    extra: dict = field(default_factory=dict)  # free-form notes (the planner's predictions)
    # The KV store tiers: the cluster file's serving.kv_store (`pdserve up`'s settings) and planning.kv_store
    # (the simulator's bandwidths and host size); sim/store.py.
    kv_store: dict = field(default_factory=dict)
    kv_store_planning: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "colocated" and self.colocated is None:
            raise ValueError("colocated mode needs a 'colocated' pool")
        if self.mode in ("disaggregated", "auto") and (self.prefill is None or self.decode is None):
            raise ValueError(f"{self.mode} mode needs 'prefill' and 'decode' pools")
        if self.precision not in BYTES_PER_PARAM or self.kv_dtype not in BYTES_PER_PARAM:
            raise ValueError(f"precision and kv_dtype must be in {sorted(BYTES_PER_PARAM)}")
        if self.routing not in POLICIES or self.decode_routing not in POLICIES:
            raise ValueError(f"routing must be one of {POLICIES}")
        if self.kv_link not in KV_LINKS:
            raise ValueError(f"kv_link must be one of {KV_LINKS}, got {self.kv_link!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.store  # ValueError on bad KV store settings

    @property
    def store(self) -> StoreSpec:
        return StoreSpec.from_settings(self.kv_store, self.kv_store_planning)

    @property
    def pools(self) -> dict[str, PoolSpec]:
        if self.mode == "colocated":
            return {"colocated": self.colocated}
        return {"prefill": self.prefill, "decode": self.decode}

    @property
    def num_cards(self) -> int:
        return sum(p.num_cards for p in self.pools.values())

    def to_file(self) -> ClusterFile:
        """The cluster file of this spec (the planner's best-cluster.yaml)."""
        pools = self.pools
        first = next(iter(pools.values()))
        engine = {**_sched(first), "block_size": self.block_size, "enable_prefix_caching": self.enable_prefix_caching}
        if self.kv_dtype == "fp8":  # the workers' setting; the simulator reads it back from there
            engine["kv_cache_dtype"] = "fp8"
        serving = {"mode": self.mode, **{name: pool.instances for name, pool in pools.items()},
                   "routing": self.routing, "min_remote_prefill_tokens": self.min_remote_prefill_tokens,
                   "max_inflight": self.max_inflight}
        if self.kv_store:
            serving["kv_store"] = dict(self.kv_store)
        overrides = {name: {k: v for k, v in _sched(p).items() if v != engine[k]} for name, p in pools.items()}
        serving["pools"] = {name: o for name, o in overrides.items() if o}
        planning = {"hardware": _one_or_per_pool({n: p.hardware for n, p in pools.items()}),
                    "tp": _one_or_per_pool({n: p.tp for n, p in pools.items()}),
                    "parallelism": _one_or_per_pool({n: p.parallelism for n, p in pools.items()}),
                    **_model_settings(pools),
                    "precision": self.precision, "decode_routing": self.decode_routing,
                    "kv_link": self.kv_link}
        if self.kv_dtype not in ("bf16", "fp8"):  # a dtype only the simulator runs (bf16, fp8: the engine's)
            planning["kv_dtype"] = self.kv_dtype
        if self.kv_store_planning:
            planning["kv_store"] = dict(self.kv_store_planning)
        data = {"model": self.model, "engine": engine, "serving": serving, "planning": planning}
        if self.extra:
            data["predicted"] = self.extra
        return cluster_file.parse(data, "cluster spec")

    @classmethod
    def from_file(cls, f: ClusterFile) -> ClusterSpec:
        """The simulator's view of a cluster file (the planning section gives the hardware)."""
        pl = f.planning
        if pl.hardware is None:
            raise ValueError("the cluster file gives no hardware for the simulator (planning.hardware)")
        pools = {}
        for name in f.pool_names:
            settings = f.pool_engine(name)
            pools[name] = PoolSpec(f.per_pool(pl.hardware, name, "hardware"), f.num_workers(name),
                                   int(f.per_pool(pl.tp, name, "tp")),
                                   **{k: settings[k] for k in _SCHED_KEYS if k in settings},
                                   parallelism=f.per_pool(pl.parallelism, name, "parallelism"),
                                   **{k: f.per_pool(getattr(pl, k), name, k) for k in _MODEL_KEYS})
        return cls(model=f.model, mode=f.serving.mode, **pools, routing=f.serving.routing,
                   block_size=int(f.engine.get("block_size", 16)),
                   enable_prefix_caching=bool(f.engine.get("enable_prefix_caching", True)),
                   precision=pl.precision, kv_dtype=f.kv_dtype, decode_routing=pl.decode_routing,
                   kv_link=pl.kv_link, min_remote_prefill_tokens=f.serving.min_remote_prefill_tokens,
                   max_inflight=f.serving.max_inflight, extra=dict(f.predicted),
                   kv_store=dict(f.serving.kv_store), kv_store_planning=dict(pl.kv_store))

    def to_dict(self) -> dict:
        """The cluster file's content (result files carry it)."""
        return msgspec.to_builtins(self.to_file())

    @classmethod
    def from_dict(cls, data: dict) -> ClusterSpec:
        return cls.from_file(cluster_file.parse(data, "cluster"))

    def dump(self, path: str | Path) -> Path:
        return cluster_file.dump(self.to_file(), path)


_SCHED_KEYS = ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill")
# Per-pool performance-model settings: the cluster file's planning section, one value or {pool: value}.
_MODEL_KEYS = ("attn_tp", "moe_imbalance", "ep_overlap", "step_overhead_ms", "step_overhead_per_seq_us")


def _sched(pool: PoolSpec) -> dict:
    return {k: getattr(pool, k) for k in _SCHED_KEYS}


def _model_settings(pools: dict[str, PoolSpec]) -> dict:
    """The planning section's performance-model keys, those that some pool sets away from the default."""
    out = {}
    for key in _MODEL_KEYS:
        values = {name: getattr(p, key) for name, p in pools.items()}
        if any(v != PoolSpec.__dataclass_fields__[key].default for v in values.values()):
            out[key] = _one_or_per_pool(values)
    return out


def _one_or_per_pool(values: dict):
    distinct = set(values.values())
    return next(iter(distinct)) if len(distinct) == 1 else values


def load_cluster(path: str | Path) -> ClusterSpec:
    """A cluster file as the simulator runs it (ValueError naming the file and the problem)."""
    try:
        return ClusterSpec.from_file(cluster_file.load(path))
    except (TypeError, ValueError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {e}") from e
