"""KV cache sizing and movement: how many KV blocks an instance holds after its weights, whether a model
fits a card group at all, and how long a prefill-to-decode KV transfer takes."""
from __future__ import annotations

from pdserve.sim.hardware import Hardware
from pdserve.sim.models import ModelSpec
from pdserve.sim.op_timer import BYTES as BYTES_PER_PARAM

GPU_MEMORY_UTILIZATION = 0.9  # fraction of card memory the engine may use (vLLM's default)


def instance_kv_blocks(model: ModelSpec, hardware: Hardware, tp: int, precision: str, block_size: int,
                       max_num_batched_tokens: int = 2048, kv_dtype: str = "bf16",
                       memory_utilization: float = GPU_MEMORY_UTILIZATION, parallelism: str = "tp",
                       attn_tp: int = 1) -> int:
    """KV blocks one instance holds: per rank, ``memory_utilization`` of the card minus the weight shard
    minus an activation reserve (1.5 GB + the step's activations), divided by the rank's KV bytes per
    block (``ep``: dense weights split over ``attn_tp`` cards and replicated across the ``tp / attn_tp``
    data-parallel groups, experts split over all ``tp`` cards, each attention group a KV cache of its own
    requests, so the instance holds ``tp / attn_tp`` times one group's blocks). ValueError when the
    weights do not fit."""
    wb = BYTES_PER_PARAM[precision]
    reserve = 1.5e9 + max_num_batched_tokens * (8 * model.hidden_size + 2 * model.intermediate_size / tp) * 2
    kv_token = model.kv_bytes_per_token(BYTES_PER_PARAM[kv_dtype])
    if parallelism == "ep":
        if attn_tp < 1 or tp % attn_tp:
            raise ValueError(f"attention TP {attn_tp} must divide the instance's {tp} cards")
        routed = model.num_moe_layers * model.num_experts * model.expert_params
        eb = min(wb, model.expert_weight_bytes or wb)
        weights = (model.num_params - routed) * wb / attn_tp + routed * eb / tp
        per_block = kv_token * model.kv_shard_factor(attn_tp) * block_size * attn_tp / tp
    else:
        weights = model.weight_bytes(wb) / tp
        per_block = kv_token * model.kv_shard_factor(tp) * block_size
    free = hardware.memory_bytes * memory_utilization - weights - reserve
    blocks = int(free // per_block) if free > 0 else 0
    if blocks < 1:
        raise ValueError(f"{model.name} ({precision}) does not fit on {tp} x {hardware.name}: weights "
                         f"{weights / 1e9:.1f} GB per card of {hardware.memory_gb:g} GB")
    return blocks


def kv_transfer_s(num_tokens: int, model: ModelSpec, hardware: Hardware, tp: int, inter_node: bool,
                  kv_dtype: str = "bf16") -> float:
    """Seconds to move ``num_tokens`` tokens of KV from a prefill to a decode instance: link latency plus
    bytes over ``tp`` parallel per-card links (each rank sends its own shard)."""
    if num_tokens <= 0:
        return 0.0
    nbytes = num_tokens * model.kv_bytes_per_token(BYTES_PER_PARAM[kv_dtype])
    bw = hardware.link_bw(inter_node) * hardware.efficiency.network * max(1, tp)
    return hardware.link_latency_s(inter_node) + nbytes / bw


def fits(model: ModelSpec, hardware: Hardware, tp: int, precision: str, parallelism: str = "tp") -> bool:
    """Whether the weights leave room for at least some KV cache."""
    try:
        instance_kv_blocks(model, hardware, tp, precision, 16, parallelism=parallelism)
    except ValueError:
        return False
    return True


def min_tp(model: ModelSpec, hardware: Hardware, precision: str, max_tp: int = 64, parallelism: str = "tp",
           min_cards: int = 1) -> int | None:
    """Smallest power-of-two number of cards (at least ``min_cards``) an instance needs to fit, split
    by ``parallelism`` (None if none up to ``max_tp``)."""
    tp = 1
    while tp <= max_tp:
        if tp >= min_cards and fits(model, hardware, tp, precision, parallelism):
            return tp
        tp *= 2
    return None

