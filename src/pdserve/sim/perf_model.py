"""Performance models: the time of one engine step from the batch's composition.

``BatchShape`` reduces a scheduler step (``SchedulerOutput.chunks``) to a few sums; a ``PerfModel`` maps it
to seconds. ``AnalyticPerfModel`` is a per-operation roofline (max of compute and memory time for each
group of operations, summed, plus tensor-parallel all-reduces and a fixed per-step overhead) against a
catalogue card with efficiency factors. ``pdserve.sim.calibrated.CalibratedPerfModel`` is a fitted linear
model over the same features, measured on a real engine by ``pdserve profile``.

``instance_kv_blocks`` sizes the KV cache of one instance from memory, and ``kv_transfer_s`` times a
prefill-to-decode KV transfer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.sim.hardware import Hardware
from pdserve.sim.models import ModelSpec

BYTES_PER_PARAM = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5, "fp32": 4.0}
GPU_MEMORY_UTILIZATION = 0.9  # fraction of card memory the engine may use (vLLM's default)


@dataclass(frozen=True)
class BatchShape:
    """One step's work. Prefill chunks: ``num_prefill_tokens`` tokens; ``prefill_attn`` sums each token's
    attention context (causal: a chunk of n tokens after s cached ones has n*s + n*(n+1)/2);
    ``prefill_kv`` sums (s + n) per chunk (KV read once per chunk). Decodes (one-token chunks):
    ``num_decode`` of them, ``decode_ctx`` the sum of their context lengths, ``decode_max_ctx`` the longest
    (0: not given, contexts taken as equal). ``num_samples``: chunks that sample a token (logits
    computed)."""

    num_prefill_tokens: int = 0
    prefill_attn: float = 0.0
    prefill_kv: int = 0
    num_decode: int = 0
    decode_ctx: int = 0
    num_samples: int = 0
    decode_max_ctx: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode

    @classmethod
    def from_chunks(cls, chunks: Iterable) -> BatchShape:
        """From scheduler chunks (anything with ``start``, ``num_tokens`` and ``samples``)."""
        p_tokens = p_kv = n_dec = d_ctx = n_samples = d_max = 0
        p_attn = 0.0
        for c in chunks:
            n, s = c.num_tokens, c.start
            if c.samples:
                n_samples += 1
            if n == 1:
                n_dec += 1
                d_ctx += s + 1
                d_max = max(d_max, s + 1)
            else:
                p_tokens += n
                p_attn += n * s + n * (n + 1) / 2
                p_kv += s + n
        return cls(p_tokens, p_attn, p_kv, n_dec, d_ctx, n_samples, d_max)

    @property
    def decode_padded_ctx(self) -> int:
        """Decodes x the longest context: what attention costs when it pads every decode to the
        longest (pdserve's PyTorch fallback attention does; its CPU kernel and paged GPU kernels do not)."""
        return self.num_decode * self.decode_max_ctx if self.decode_max_ctx else self.decode_ctx

    def features(self, decode_knee: int = 0) -> list[float]:
        """The calibrated model's regressors: constant, prefill tokens, prefill attention, decodes beyond
        ``decode_knee`` (below it a decode adds no GEMM time: the weights stream from memory either way),
        decode context, padded decode context."""
        return [1.0, float(self.num_prefill_tokens), float(self.prefill_attn),
                float(max(0, self.num_decode - decode_knee)), float(self.decode_ctx), float(self.decode_padded_ctx)]


class PerfModel(ABC):
    """Step time of one instance (a tensor-parallel group of cards). Pure and deterministic: the same
    shape always gives the same time. An empty shape takes 0 s.

    ``overheads`` (``sim.overheads.Overheads``): time a live deployment spends outside steps, when the
    model was calibrated against one (``pdserve profile --live``); None: steps only."""

    overheads = None

    @abstractmethod
    def step_time_s(self, shape: BatchShape) -> float:
        """Seconds one engine step with this batch takes."""

    def prefill_part_s(self, shape: BatchShape) -> float:
        """The part of ``step_time_s(shape)`` that grows with its prefill tokens (0 where the model does
        not separate it; live overheads may scale it on its own)."""
        return 0.0

    def decode_step_time_s(self, num_decode: int, decode_ctx: int, decode_max_ctx: int = 0) -> float:
        """A decode-only step (the simulator's fast path); subclasses may specialise it."""
        return self.step_time_s(BatchShape(num_decode=num_decode, decode_ctx=decode_ctx, num_samples=num_decode,
                                           decode_max_ctx=decode_max_ctx))

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """JSON-able description for result files."""


PARALLELISMS = ("tp", "ep")


class AnalyticPerfModel(PerfModel):
    """Roofline per operation group: dense GEMMs, routed experts, attention (prefill, decode), LM head,
    communication, plus ``hardware.step_overhead_ms``.

    ``parallelism`` says how the instance's ``tp`` cards split the model: ``tp`` (tensor parallel: every
    weight and KV head split, two activation all-reduces per layer) or ``ep`` (MoE models, DeepSeek's
    layout: attention and dense layers data-parallel, each card with its own requests and KV cache;
    routed experts spread over the cards; a dispatch and a combine all-to-all per MoE layer)."""

    def __init__(self, model: ModelSpec, hardware: Hardware, tp: int = 1, precision: str = "bf16",
                 kv_dtype: str = "bf16", parallelism: str = "tp") -> None:
        if parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {parallelism!r}")
        if parallelism == "ep" and not model.is_moe:
            raise ValueError(f"expert parallelism needs an MoE model; {model.name} is dense")
        self.parallelism = parallelism
        if precision not in BYTES_PER_PARAM or kv_dtype not in BYTES_PER_PARAM:
            raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}/{kv_dtype!r}")
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.model, self.hardware, self.tp, self.precision, self.kv_dtype = model, hardware, tp, precision, kv_dtype
        m, hw, eff = model, hardware, hardware.efficiency
        wb = BYTES_PER_PARAM[precision]
        self._peak = hw.flops(precision) * eff.compute
        self._attn_peak = hw.flops("bf16") * eff.attention
        self._bw = hw.memory_bw * eff.memory
        self._overhead = hw.step_overhead_ms * 1e-3
        # Dense (always-active) weights: attention projections, dense MLPs, shared experts, routers.
        self._dense_params = (m.num_layers * m.attn_params_per_layer + m.num_dense_layers * m.dense_mlp_params
                              + m.num_moe_layers * (m.num_shared_experts * m.expert_params
                                                    + m.hidden_size * m.num_experts))
        self._dense_bytes = self._dense_params * wb / tp
        self._expert_bytes = m.expert_params * min(wb, m.expert_weight_bytes or wb)
        self._lm_head_params = m.hidden_size * m.vocab_size
        # Attention: FLOPs per (query token, context token) pair, all layers, per rank.
        if m.is_mla:
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            self._prefill_pair_flops = 2 * m.num_heads * (qk + m.v_head_dim) * m.num_layers / tp
            self._decode_pair_flops = 2 * m.num_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * m.num_layers / tp
        else:
            self._prefill_pair_flops = 4 * m.num_heads * m.head_dim * m.num_layers / tp
            self._decode_pair_flops = self._prefill_pair_flops
        self._kv_bytes_token = m.kv_bytes_per_token(BYTES_PER_PARAM[kv_dtype]) * m.kv_shard_factor(tp)
        # Tensor parallelism: two ring all-reduces of the activations per layer.
        inter = tp > hw.node_size
        self._ar_bw = hw.link_bw(inter) * eff.network
        self._ar_latency = 2 * hw.link_latency_s(inter)
        self._ar_bytes_token = 2 * m.hidden_size * 2.0  # bf16 activations, two all-reduces

    def step_time_s(self, shape: BatchShape) -> float:
        n = shape.num_tokens
        if n == 0:
            return 0.0
        if self.parallelism == "ep":
            return self._ep_step_time_s(shape)
        m, tp = self.model, self.tp
        peak, bw = self._peak, self._bw
        t = self._overhead
        t += max(2.0 * n * self._dense_params / tp / peak, self._dense_bytes / bw)
        if m.is_moe:
            k, e = m.num_experts_per_token, m.num_experts
            touched = e * (1.0 - (1.0 - k / e) ** n)  # distinct experts one layer's batch activates
            flops = 2.0 * n * k * m.expert_params * m.num_moe_layers / tp
            t += max(flops / peak, m.num_moe_layers * touched * self._expert_bytes / tp / bw)
        if shape.num_samples:
            wb = BYTES_PER_PARAM[self.precision]
            t += max(2.0 * shape.num_samples * self._lm_head_params / tp / peak, self._lm_head_params * wb / tp / bw)
        if shape.num_prefill_tokens:
            t += max(shape.prefill_attn * self._prefill_pair_flops / self._attn_peak,
                     shape.prefill_kv * self._kv_bytes_token / bw)
        if shape.num_decode:
            t += max(shape.decode_ctx * self._decode_pair_flops / self._attn_peak,
                     shape.decode_ctx * self._kv_bytes_token / bw)
        if tp > 1:
            t += m.num_layers * (self._ar_latency + 2.0 * (tp - 1) / tp * n * self._ar_bytes_token / self._ar_bw)
        return t

    def _ep_step_time_s(self, shape: BatchShape) -> float:
        """Data-parallel attention + expert parallelism over ``tp`` cards: the batch is spread evenly,
        so each card runs 1/ep of the tokens through replicated dense weights and its own KV, and
        1/ep of the experts for every token routed to them."""
        m, ep = self.model, self.tp
        peak, bw = self._peak, self._bw
        wb = BYTES_PER_PARAM[self.precision]
        n = shape.num_tokens
        n_card = n / ep
        t = self._overhead
        t += max(2.0 * n_card * self._dense_params / peak, self._dense_params * wb / bw)
        k, e = m.num_experts_per_token, m.num_experts
        touched = e * (1.0 - (1.0 - k / e) ** n)
        t += max(2.0 * n * k * m.expert_params * m.num_moe_layers / ep / peak,
                 m.num_moe_layers * min(touched, e) / ep * self._expert_bytes / bw)
        if shape.num_samples:
            t += max(2.0 * shape.num_samples / ep * self._lm_head_params / peak, self._lm_head_params * wb / bw)
        kv_token = m.kv_bytes_per_token(BYTES_PER_PARAM[self.kv_dtype])
        pair = self._prefill_pair_flops * ep  # undo the TP split: each card runs whole heads
        if shape.num_prefill_tokens:
            t += max(shape.prefill_attn / ep * pair / self._attn_peak, shape.prefill_kv / ep * kv_token / bw)
        if shape.num_decode:
            t += max(shape.decode_ctx / ep * self._decode_pair_flops * ep / self._attn_peak,
                     shape.decode_ctx / ep * kv_token / bw)
        if ep > 1:
            inter = ep > self.hardware.node_size
            link = self.hardware.link_bw(inter) * self.hardware.efficiency.network
            a2a = n_card * k * m.hidden_size * (1.0 + 2.0) * (ep - 1) / ep  # fp8 dispatch, bf16 combine
            t += m.num_moe_layers * (2 * self.hardware.link_latency_s(inter) + a2a / link)
        return t

    def describe(self) -> dict[str, object]:
        return {"kind": "analytic", "model": self.model.name, "hardware": self.hardware.name, "tp": self.tp,
                "precision": self.precision, "kv_dtype": self.kv_dtype, "parallelism": self.parallelism}


def instance_kv_blocks(model: ModelSpec, hardware: Hardware, tp: int, precision: str, block_size: int,
                       max_num_batched_tokens: int = 2048, kv_dtype: str = "bf16",
                       memory_utilization: float = GPU_MEMORY_UTILIZATION, parallelism: str = "tp") -> int:
    """KV blocks one instance holds: per rank, ``memory_utilization`` of the card minus the weight shard
    minus an activation reserve (1.5 GB + the step's activations), divided by the rank's KV bytes per
    block (``ep``: dense weights replicated, experts split, every card a whole-token KV cache of its own,
    so the instance holds ``tp`` times one card's blocks). ValueError when the weights do not fit."""
    wb = BYTES_PER_PARAM[precision]
    reserve = 1.5e9 + max_num_batched_tokens * (8 * model.hidden_size + 2 * model.intermediate_size / tp) * 2
    kv_token = model.kv_bytes_per_token(BYTES_PER_PARAM[kv_dtype])
    if parallelism == "ep":
        routed = model.num_moe_layers * model.num_experts * model.expert_params
        eb = min(wb, model.expert_weight_bytes or wb)
        weights = (model.num_params - routed) * wb + routed * eb / tp
        per_block = kv_token * block_size / tp  # tp cards, each a full-token cache
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

