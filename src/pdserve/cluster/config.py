"""Cluster files (``pdserve up --config cluster.yaml``): the same settings as ``pdserve up``'s flags.

Accepted keys (docs/cluster.md has the format):
  model, mode (colocated | disaggregated), prefill, decode, colocated (or instances), kv_transfer,
  routing, host, port, api_key, min_remote_prefill_tokens,
  scheduler: {max_num_batched_tokens, max_num_seqs, max_waiting, enable_chunked_prefill},
  cache: {kv_cache_memory, block_size, num_kv_blocks, enable_prefix_caching}, dtype, max_model_len,
  notes: {pools: {prefill|decode|colocated: {max_num_batched_tokens, max_num_seqs, max_waiting,
  enable_chunked_prefill}}} (per-pool scheduler settings, as ``pdserve plan`` writes them: they apply to
  that pool's workers only, under the key ``pool_scheduler``).
Planner-only keys (hardware, tp, pp, cost, goodput, the rest of notes, ...) are ignored with a logged
note; any other unknown key is an error, so a typo does not pass unnoticed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

# cluster-file key -> argparse dest of ``pdserve up``
_TOP_LEVEL = {"model": "model", "prefill": "prefill", "decode": "decode", "colocated": "colocated",
              "instances": "colocated", "kv_transfer": "kv_transfer", "routing": "routing", "host": "host",
              "port": "port", "api_key": "api_key", "min_remote_prefill_tokens": "min_remote_prefill_tokens",
              "dtype": "dtype", "max_model_len": "max_model_len", "kv_cache_memory": "kv_cache_memory",
              "block_size": "block_size"}
_SECTIONS = {
    "scheduler": {"max_num_batched_tokens": "max_num_batched_tokens", "max_num_seqs": "max_num_seqs",
                  "max_waiting": "max_waiting", "enable_chunked_prefill": "enable_chunked_prefill"},
    "cache": {"kv_cache_memory": "kv_cache_memory", "block_size": "block_size", "num_kv_blocks": "num_kv_blocks",
              "enable_prefix_caching": "enable_prefix_caching"},
}
PLANNER_KEYS = {"hardware", "chip", "gpu", "accelerator", "tp", "pp", "tensor_parallel_size",
                "pipeline_parallel_size", "cost", "cost_per_hour", "goodput", "slo", "objectives", "workload",
                "num_chips", "prefill_hardware", "decode_hardware", "colocated_hardware", "predicted", "notes"}
MODES = ("colocated", "disaggregated")
POOLS = ("prefill", "decode", "colocated")
PLANNER_POOL_KEYS = {"parallelism"}  # per-pool keys that only the simulator reads


def load_cluster_file(path: str | Path) -> dict[str, Any]:
    """The argparse defaults a cluster file sets (ValueError on a bad file)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return cluster_settings(data, str(path))


def cluster_settings(data: dict[str, Any], source: str = "cluster file") -> dict[str, Any]:
    out: dict[str, Any] = {}
    ignored = []
    for key, value in data.items():
        if key == "mode":
            if value not in MODES:
                raise ValueError(f"{source}: mode must be one of {MODES}, got {value!r}")
            continue
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key} must be a mapping")
            for sub, v in value.items():
                if sub not in _SECTIONS[key]:
                    raise ValueError(f"{source}: unknown key {key}.{sub} (known: {sorted(_SECTIONS[key])})")
                out[_SECTIONS[key][sub]] = v
        elif key == "notes" and isinstance(value, dict) and value.get("pools"):
            out["pool_scheduler"] = _pool_scheduler(value["pools"], source)
            ignored.append("notes (except pools)")
        elif key in PLANNER_KEYS:
            ignored.append(key)
        else:
            raise ValueError(f"{source}: unknown key {key!r}")
    if ignored:
        logger.info("%s: ignoring planner-only keys %s", source, ", ".join(sorted(ignored)))
    mode = data.get("mode")
    if mode == "colocated":
        out.setdefault("colocated", 1)
        out["prefill"], out["decode"] = 0, 0
    elif mode == "disaggregated":
        out["colocated"] = 0
        out.setdefault("prefill", 1)
        out.setdefault("decode", 1)
    if "kv_cache_memory" in out:
        out["kv_cache_memory"] = str(out["kv_cache_memory"])
    return out


def _pool_scheduler(pools: Any, source: str) -> dict[str, dict[str, Any]]:
    """``notes.pools`` -> {pool: {argparse dest: value}} for the scheduler keys (ValueError on unknown keys)."""
    if not isinstance(pools, dict):
        raise ValueError(f"{source}: notes.pools must be a mapping")
    out: dict[str, dict[str, Any]] = {}
    for pool, settings in pools.items():
        if pool not in POOLS:
            raise ValueError(f"{source}: unknown pool notes.pools.{pool} (known: {POOLS})")
        if not isinstance(settings, dict):
            raise ValueError(f"{source}: notes.pools.{pool} must be a mapping")
        known = _SECTIONS["scheduler"]
        for key, value in settings.items():
            if key in known:
                out.setdefault(pool, {})[known[key]] = value
            elif key not in PLANNER_POOL_KEYS:
                raise ValueError(f"{source}: unknown key notes.pools.{pool}.{key} (known: {sorted(known)})")
    return out
