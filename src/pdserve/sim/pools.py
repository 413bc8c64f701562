"""The simulated cluster's instances: pools built from a ``ClusterSpec`` (perf model, KV blocks sized from
memory, step times), a representative slice of a large cluster (``sample_pools``), and the KV link."""
from __future__ import annotations

import math
from dataclasses import replace

from pdserve.protocol import KVTarget
from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.hardware import Hardware
from pdserve.sim.instance import Instance
from pdserve.sim.models import ModelSpec
from pdserve.sim.perf_model import AnalyticPerfModel, PerfModel, instance_kv_blocks
from pdserve.sim.step_time import StepTime


def make_instances(name: str, pool: PoolSpec, spec: ClusterSpec, model: ModelSpec, catalogue: dict[str, Hardware],
                   perf_model: str, num_blocks: int | None, seed: int) -> list[Instance]:
    """A pool's instances: each with the pool's perf model, KV blocks (``num_blocks``, or what fits the
    card's memory), and step times (with a live calibration's overheads for its role, seeded per instance)."""
    if pool.hardware not in catalogue:
        raise ValueError(f"unknown hardware {pool.hardware!r}; known: {', '.join(sorted(catalogue))}")
    hw = catalogue[pool.hardware]
    base = make_perf_model(perf_model, model, hw, pool.tp, spec.precision, spec.kv_dtype, pool.parallelism)
    num_blocks = num_blocks or instance_kv_blocks(model, hw, pool.tp, spec.precision, spec.block_size,
                                                  pool.max_num_batched_tokens, spec.kv_dtype,
                                                  parallelism=pool.parallelism)
    role = {"colocated": "both"}.get(name, name)
    insts = [Instance(i, role, pool, hw, base, num_blocks, spec.block_size, spec.enable_prefix_caching,
                      model.max_context) for i in range(pool.instances)]
    for inst in insts:
        inst.kv_target = KVTarget(inst.instance_id, "sim", "")  # what its reservations name
        overhead = base.overheads.step(role) if base.overheads is not None else None
        inst.step_time = StepTime(base, overhead, f"{seed}/{role}/{inst.index}")
    return insts


def make_perf_model(kind: str, model: ModelSpec, hardware: Hardware, tp: int, precision: str,
                    kv_dtype: str = "bf16", parallelism: str = "tp") -> PerfModel:
    """``analytic`` or the path of a calibrated model file."""
    if kind == "analytic":
        return AnalyticPerfModel(model, hardware, tp, precision, kv_dtype, parallelism)
    from pdserve.sim.calibrated import CalibratedPerfModel
    return CalibratedPerfModel.load(kind)


def sample_pools(spec: ClusterSpec, sample_instances: int | None):
    """(scale factor, pools to build, predicate on request index) for a representative slice."""
    pools = dict(spec.pools)
    if not sample_instances:
        return 1.0, pools, lambda i: True
    if spec.mode == "colocated":
        n = spec.colocated.instances
        k = max(1, min(n, sample_instances))
        pools["colocated"] = _with_instances(spec.colocated, k)
        return n / k, pools, lambda i: i % n < k
    np_, nd = spec.prefill.instances, spec.decode.instances
    g = math.gcd(np_, nd)
    unit = np_ // g + nd // g
    u = max(1, min(g, math.ceil(sample_instances / unit)))
    pools["prefill"] = _with_instances(spec.prefill, u * np_ // g)
    pools["decode"] = _with_instances(spec.decode, u * nd // g)
    return g / u, pools, lambda i: i % g < u


def _with_instances(pool: PoolSpec, n: int) -> PoolSpec:
    return replace(pool, instances=n)


def kv_link_is_inter(spec: ClusterSpec, catalogue: dict[str, Hardware]) -> bool:
    """Whether prefill -> decode KV crosses nodes (``kv_link: auto``: other hardware, or more cards than a node)."""
    if spec.mode == "colocated" or spec.kv_link != "auto":
        return spec.kv_link == "inter"
    p, d = spec.prefill, spec.decode
    return p.hardware != d.hardware or p.tp + d.tp > catalogue[p.hardware].node_size
