"""Cluster files: one schema read by ``pdserve up --config`` and ``pdserve sim --cluster``, written by ``pdserve
plan`` (best-cluster.yaml), so a plan is deployed as it was simulated.

Format (YAML; docs/cluster.md has the reference)::

    model: smollm2-135m            # known name, .gguf file, HF folder, or catalogue name for the simulator
    engine:                        # engine settings for every worker: the names of `pdserve worker`'s engine
      max_num_batched_tokens: 2048 #   flags (settings.py), e.g. kv_cache_memory: 1GiB, max_num_seqs: 128,
      kv_cache_dtype: fp8          #   the KV cache's dtype: auto (the model's) | fp8; one for every pool
    serving:                       # the layout and the frontend: `pdserve up`, and what the simulator runs
      mode: disaggregated          # auto | colocated | disaggregated
      prefill: 1                   # workers per pool (colocated mode: `colocated: N`)
      decode: 1
      kv_connector: shm            # shm | tcp | auto | module:Class (default: shm; auto on Ray)
      kv_layerwise: true           # prefill sends KV layer by layer as computed (false: whole, at the end)
      routing: prefix_aware        # round_robin | least_loaded | prefix_aware
      min_remote_prefill_tokens: 0
      price_per_hour: 0.08         # USD per worker-hour, every worker or {prefill: 2.99, decode: 1.79}
                                   #   (live cost, docs/monitoring.md; default: the hardware catalogue's)
      pools:                       # per-pool engine settings over `engine` (prefill | decode | colocated)
        prefill: {max_num_batched_tokens: 8192}
      kv_store:                    # the KV store tiers every worker uses (docs/kv_store.md): the names of
        kv_host_memory: 4GiB       #   `pdserve worker`'s KV store flags; kv_remote: redis | mooncake starts
        kv_disk: /var/cache/kv:100GiB  # that server on this host (pdserve up), or redis://host:port
        kv_remote: redis
      backend: local               # local: processes on this machine | ray: actors on a Ray cluster
      ray:                         # backend ray (docs/ray.md)
        address: 10.0.0.1:6379     #   a running cluster (omit: RAY_ADDRESS, else start a local one)
        strategy: PACK             #   placement groups' strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
        pools:                     #   what each worker of a pool asks of Ray
          prefill: {num_cpus: 8, num_gpus: 1, resources: {h100: 1}}
          decode: {num_cpus: 8, num_gpus: 1, label_selector: {accelerator: h200}}
    planning:                      # what only the simulator and planner read
      hardware: h100-sxm           # every pool, or {prefill: h100-sxm, decode: h200}
      tp: 1                        # every pool, or {prefill: 1, decode: 2}
      parallelism: tp              # every pool, or per pool: tp | ep
      attn_tp: 1                   # ep: attention TP in each data-parallel group (every pool, or per pool)
      moe_imbalance: 1.0           # ep: the busiest expert rank's load over the mean
      ep_overlap: false            # ep: two micro-batches hide the all-to-alls
      step_overhead_ms: 1.0        # the engine's time per step outside the kernels (default: the catalogue's)
      step_overhead_per_seq_us: 0  #   and per request in the step
      precision: bf16
      kv_dtype: bf16               # the KV cache's bytes as simulated; default: engine.kv_cache_dtype's
                                   #   (fp8 -> fp8, auto -> bf16); fp8 against kv_cache_dtype auto (or the
                                   #   reverse) is an error, so a plan is deployed as it was simulated
      decode_routing: least_loaded
      kv_link: auto                # auto | intra | inter (node) for prefill -> decode KV
      kv_store: {host_gbs: 25, remote_gbs: 50, cards_per_host: 8}  # the simulator's KV store links
                                   #   (GB/s per card) and host size (docs/sim.md, "KV store tiers")
    predicted: {...}               # the planner's figures for this layout

An unknown key anywhere is an error that names it (with its path), so a typo never passes unnoticed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from pdserve.settings import engine_settings_from_mapping, store_config

class RayPlacement(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = {}
    label_selector: dict[str, str] = {}


class RaySettings(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    address: str | None = None
    namespace: str | None = None
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_restarts: int = 10
    pools: dict[Literal["prefill", "decode", "colocated"], RayPlacement] = {}


class Serving(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    mode: Literal["auto", "colocated", "disaggregated"] = "disaggregated"
    prefill: int = 1
    decode: int = 1
    colocated: int = 1
    kv_connector: str | None = None  # None: the launcher's default (shm; auto on Ray)
    kv_layerwise: bool = True
    backend: Literal["local", "ray"] = "local"
    ray: RaySettings | None = None
    routing: Literal["round_robin", "least_loaded", "prefix_aware"] = "prefix_aware"
    min_remote_prefill_tokens: int = 0
    host: str | None = None
    port: int | None = None
    max_inflight: int | None = None
    pools: dict[Literal["prefill", "decode", "colocated"], dict[str, Any]] = {}
    price_per_hour: float | dict[Literal["prefill", "decode", "colocated"], float] | None = None
    kv_store: dict[str, Any] = {}

    def __post_init__(self) -> None:
        try:
            store_config(**{k: v for k, v in self.kv_store.items() if k != "kv_remote_memory"})
        except ValueError as e:
            raise ValueError(f"serving.kv_store: {e}") from None
        prices = self.price_per_hour if isinstance(self.price_per_hour, dict) else {"": self.price_per_hour}
        for pool, usd in prices.items():
            if usd is not None and not (usd >= 0 and math.isfinite(usd)):
                raise ValueError(f"serving.price_per_hour{'.' + pool if pool else ''}: expected USD >= 0, got {usd}")

    def kv_store_settings(self) -> dict[str, Any]:
        """``kv_store`` as `pdserve up`'s argument values (sizes parsed)."""
        from pdserve.config import parse_size
        from pdserve.settings import STORE_SETTINGS

        out = {}
        for k, v in self.kv_store.items():
            if k == "kv_remote_memory":
                out[k] = parse_size(v)
            else:
                out[k] = STORE_SETTINGS[k].parse(v) if isinstance(v, str) else v
        return out

    def price_per_hour_flags(self) -> list[str] | None:
        """``price_per_hour`` as ``--price-per-hour`` values (None: not given)."""
        if self.price_per_hour is None:
            return None
        if isinstance(self.price_per_hour, dict):
            return [f"{pool}={usd}" for pool, usd in self.price_per_hour.items()]
        return [str(self.price_per_hour)]


class Planning(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    hardware: str | dict[str, str] | None = None
    tp: int | dict[str, int] = 1
    parallelism: str | dict[str, str] = "tp"
    attn_tp: int | dict[str, int] = 1
    moe_imbalance: float | dict[str, float] = 1.0
    ep_overlap: bool | dict[str, bool] = False
    # None (or a pool's null): the card's catalogue entry
    step_overhead_ms: float | dict[str, float | None] | None = None
    step_overhead_per_seq_us: float | dict[str, float | None] | None = None
    precision: str = "bf16"
    kv_dtype: str | None = None  # None: the workers' (ClusterFile.kv_dtype)
    decode_routing: Literal["round_robin", "least_loaded", "prefix_aware"] = "least_loaded"
    kv_link: Literal["auto", "intra", "inter"] = "auto"
    # The simulator's KV store figures (sim/store.py): host_gbs, disk_gbs, remote_gbs, cards_per_host.
    kv_store: dict[str, Any] = {}


class ClusterFile(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    model: str
    engine: dict[str, Any] = {}
    serving: Serving = msgspec.field(default_factory=Serving)
    planning: Planning = msgspec.field(default_factory=Planning)
    predicted: dict[str, Any] = {}

    def __post_init__(self) -> None:
        if "model" in self.engine:
            raise ValueError("engine: the model is given at the top level (model: ...)")
        engine_settings_from_mapping(self.engine, "engine")  # ValueError naming an unknown setting
        for pool, settings in self.serving.pools.items():
            engine_settings_from_mapping(settings, f"serving.pools.{pool}")
        self._check_kv_dtype()
        s = self.serving
        if min(s.prefill, s.decode, s.colocated) < 0 or (s.mode == "disaggregated" and s.decode < 1) or \
                (s.mode == "colocated" and s.colocated < 1):
            raise ValueError(f"serving: a {s.mode} layout needs at least one "
                             f"{'decode' if s.mode == 'disaggregated' else 'colocated'} worker")

    @property
    def kv_cache_dtype(self) -> str:
        """The workers' ``kv_cache_dtype`` (one for every pool: KV blocks move between them as they are)."""
        return self.pool_engine(self.pool_names[0]).get("kv_cache_dtype", "auto")

    @property
    def kv_dtype(self) -> str:
        """The KV cache's dtype as the simulator names it: ``planning.kv_dtype``, else the workers' (fp8, or
        bf16 for the model's own)."""
        if self.planning.kv_dtype is not None:
            return self.planning.kv_dtype
        return "fp8" if self.kv_cache_dtype == "fp8" else "bf16"

    def _check_kv_dtype(self) -> None:
        by_pool = {pool: self.pool_engine(pool).get("kv_cache_dtype", "auto") for pool in self.pool_names}
        if len(set(by_pool.values())) > 1:
            raise ValueError(f"serving.pools: the KV cache dtype differs between pools ({by_pool}); prefill and "
                             "decode workers move KV blocks as they are, so give one kv_cache_dtype for all")
        planned, engine = self.planning.kv_dtype, self.kv_cache_dtype
        if planned is not None and (planned == "fp8") != (engine == "fp8"):
            raise ValueError(f"planning.kv_dtype {planned} contradicts the workers' kv_cache_dtype {engine}: "
                             "set engine.kv_cache_dtype (auto or fp8) alone, the simulator follows it")

    @property
    def pool_names(self) -> tuple[str, ...]:
        return ("colocated",) if self.serving.mode == "colocated" else ("prefill", "decode")

    def num_workers(self, pool: str) -> int:
        return getattr(self.serving, pool)

    def pool_engine(self, pool: str) -> dict[str, Any]:
        """The engine settings of a pool's workers: ``engine`` with the pool's own on top."""
        return {**self.engine, **self.serving.pools.get(pool, {})}

    def per_pool(self, value: Any, pool: str, what: str) -> Any:
        """A planning value given for every pool or as {pool: value}."""
        if isinstance(value, dict):
            if pool not in value:
                raise ValueError(f"planning.{what} gives no value for the {pool} pool")
            return value[pool]
        return value


def load(path: str | Path) -> ClusterFile:
    """Read and validate a cluster file; ValueError with the file's name and the offending key."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read cluster file {path}: {e}") from e
    return parse(data, str(path))


def parse(data: Any, source: str = "cluster file") -> ClusterFile:
    try:
        return msgspec.convert(data, ClusterFile, strict=False)
    except (msgspec.ValidationError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def dump(cluster: ClusterFile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = msgspec.to_builtins(cluster)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
