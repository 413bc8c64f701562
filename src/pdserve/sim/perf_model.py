"""Performance models: the time of one engine step from the batch's composition.

``BatchShape`` reduces a scheduler step (``SchedulerOutput.chunks``) to a few sums; a ``PerfModel`` maps it
to seconds. ``AnalyticPerfModel`` times the operations of a step one by one (GEMMs by shape, element-wise
kernels, attention, collectives) from the card's measured operator tables where they cover the shape and
from the roofline where none does (``sim/op_timer.py``), plus an engine overhead per step and per
sequence. ``pdserve.sim.calibrated.CalibratedPerfModel`` is a fitted linear
model over the same features, measured on a real engine by ``pdserve profile``.

``instance_kv_blocks`` sizes the KV cache of one instance from memory, and ``kv_transfer_s`` times a
prefill-to-decode KV transfer (``sim/kv_sizing.py``, re-exported here).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.sim import moe
from pdserve.sim.hardware import Hardware
from pdserve.sim.kv_sizing import GPU_MEMORY_UTILIZATION, fits, instance_kv_blocks, kv_transfer_s, min_tp
from pdserve.sim.models import ModelSpec
from pdserve.sim.op_tables import Timing
from pdserve.sim.op_timer import BYTES as BYTES_PER_PARAM
from pdserve.sim.op_timer import OpTimer

__all__ = ["BYTES_PER_PARAM", "GPU_MEMORY_UTILIZATION", "AnalyticPerfModel", "BatchShape", "OpTime", "PerfModel",
           "fits", "instance_kv_blocks", "kv_transfer_s", "min_tp"]


@dataclass(frozen=True)
class BatchShape:
    """One step's work. Prefill chunks: ``num_prefill_tokens`` tokens; ``prefill_attn`` sums each token's
    attention context (causal: a chunk of n tokens after s cached ones has n*s + n*(n+1)/2);
    ``prefill_kv`` sums (s + n) per chunk (KV read once per chunk). Decodes (one-token chunks):
    ``num_decode`` of them, ``decode_ctx`` the sum of their context lengths, ``decode_max_ctx`` the longest
    (0: not given, contexts taken as equal). ``num_samples``: chunks that sample a token (logits
    computed). ``num_prefill_chunks``: prefill chunks (0: not given, one taken when there are prefill
    tokens)."""

    num_prefill_tokens: int = 0
    prefill_attn: float = 0.0
    prefill_kv: int = 0
    num_decode: int = 0
    decode_ctx: int = 0
    num_samples: int = 0
    decode_max_ctx: int = 0
    num_prefill_chunks: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode

    @property
    def num_seqs(self) -> int:
        """Requests in the step (a prefill chunk or a decode each)."""
        chunks = self.num_prefill_chunks or (1 if self.num_prefill_tokens else 0)
        return self.num_decode + chunks

    @classmethod
    def from_chunks(cls, chunks: Iterable) -> BatchShape:
        """From scheduler chunks (anything with ``start``, ``num_tokens`` and ``samples``)."""
        p_tokens = p_kv = n_dec = d_ctx = n_samples = d_max = p_chunks = 0
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
                p_chunks += 1
        return cls(p_tokens, p_attn, p_kv, n_dec, d_ctx, n_samples, d_max, p_chunks)

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


@dataclass(frozen=True)
class OpTime:
    """One operation group's share of a step: seconds, and what timed it (``op_tables.Timing.kind``:
    table, table-clamped, table-edge, roofline; ``+scaled`` for another card's or dtype's table)."""

    group: str
    seconds: float
    kind: str
    source: str = ""


PARALLELISMS = ("tp", "ep")
_CACHE_LIMIT = 1 << 16  # token-dependent step parts cached per model instance (bounded)


class AnalyticPerfModel(PerfModel):
    """A step as the operations it runs, each timed by ``OpTimer`` (measured table or roofline):
    per-layer GEMMs by shape, element-wise kernels, attention (prefill by FLOPs and context, decode by KV
    bytes; MLA absorbed for decode), routed experts, the LM head for sampled positions, collectives, and
    the engine overhead ``hardware.step_overhead_ms`` + ``step_overhead_per_seq_us`` x requests.

    ``parallelism`` says how the instance's ``tp`` cards split the model: ``tp`` (tensor parallel: every
    weight and KV head split, two activation all-reduces per layer) or ``ep`` (MoE models, DeepSeek's
    layout: attention and dense layers in ``tp / attn_tp`` data-parallel groups of ``attn_tp``
    tensor-parallel cards, each group with its own requests and KV cache; routed experts spread over all
    the cards; a dispatch and a combine all-to-all per MoE layer, the step waiting for the busiest rank,
    ``moe_imbalance`` x the mean load): TP x EP x DP. ``ep_overlap``: the engine runs each step as two
    micro-batches whose all-to-alls overlap the other's computation (DeepSeek's and SGLang's two-batch
    overlap): the step costs the larger of the two instead of their sum."""

    def __init__(self, model: ModelSpec, hardware: Hardware, tp: int = 1, precision: str = "bf16",
                 kv_dtype: str = "bf16", parallelism: str = "tp", moe_imbalance: float = 1.0,
                 attn_tp: int = 1, ep_overlap: bool = False) -> None:
        if parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {parallelism!r}")
        if parallelism == "ep" and not model.is_moe:
            raise ValueError(f"expert parallelism needs an MoE model; {model.name} is dense")
        if precision not in BYTES_PER_PARAM or kv_dtype not in BYTES_PER_PARAM:
            raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}/{kv_dtype!r}")
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if moe_imbalance < 1.0:
            raise ValueError(f"moe_imbalance must be >= 1, got {moe_imbalance}")
        if attn_tp < 1 or tp % attn_tp or (parallelism == "tp" and attn_tp != 1):
            raise ValueError(f"attn_tp must divide tp under ep (and be 1 under tp), got {attn_tp} of {tp}")
        self.model, self.hardware, self.tp, self.precision, self.kv_dtype = model, hardware, tp, precision, kv_dtype
        self.parallelism, self.moe_imbalance, self.attn_tp = parallelism, moe_imbalance, attn_tp
        self.ep_overlap = ep_overlap
        self.timer = OpTimer(hardware)
        self._ep = tp if parallelism == "ep" else 1
        self._dp = tp // attn_tp if parallelism == "ep" else 1  # data-parallel attention groups
        split = attn_tp if parallelism == "ep" else tp  # how far dense weights and heads split
        self._split = split
        self._gemms = _dense_gemms(model, split)
        m = model
        self._expert_dtype = "fp4" if (m.expert_weight_bytes or 2.0) <= 0.55 else precision
        heads = max(1, m.num_heads // split)
        if m.is_mla:
            self._prefill_pair_flops = 2.0 * heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
            self._decode_pair_flops = 2.0 * heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
            shard = 1.0
        else:
            self._prefill_pair_flops = self._decode_pair_flops = 4.0 * heads * m.head_dim
            shard = m.kv_shard_factor(split)
        self._kv_layer = m.kv_elements_per_token_layer() * BYTES_PER_PARAM[kv_dtype] * shard  # per token, card
        inter_width = m.intermediate_size if m.num_dense_layers else \
            m.moe_intermediate_size * (m.num_experts_per_token + m.num_shared_experts)
        self._elementwise_width = max(1, inter_width // split)
        self._cache: dict[tuple[int, int], tuple[float, float]] = {}  # (tokens, samples) -> (compute, all-to-all)

    # -- the step -------------------------------------------------------------------------------------
    def step_time_s(self, shape: BatchShape) -> float:
        n = shape.num_tokens
        if n == 0:
            return 0.0
        key = (n, shape.num_samples)
        parts = self._cache.get(key)
        if parts is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            ops = self._token_ops(n, shape.num_samples)
            comm = sum(op.seconds for op in ops if op.group.startswith("all-to-all"))
            parts = self._cache[key] = (sum(op.seconds for op in ops) - comm, comm)
        compute = parts[0] + sum(op.seconds for op in self._attention_ops(shape))
        return _combine(compute, parts[1], self.ep_overlap) + self._overhead_s(shape)

    def trace(self, shape: BatchShape) -> list[OpTime]:
        """Every operation group of the step, its time and what timed it (sums to ``step_time_s``; with
        ``ep_overlap``, an ``overlap`` entry takes back the all-to-all time hidden behind computation)."""
        if shape.num_tokens == 0:
            return []
        ops = self._token_ops(shape.num_tokens, shape.num_samples) + self._attention_ops(shape)
        comm = sum(op.seconds for op in ops if op.group.startswith("all-to-all"))
        compute = sum(op.seconds for op in ops) - comm
        hidden = compute + comm - _combine(compute, comm, self.ep_overlap)
        if hidden:
            ops.append(OpTime("overlap", -hidden, "model", "two micro-batches: all-to-all behind computation"))
        return ops + [OpTime("engine overhead", self._overhead_s(shape), "catalogue",
                             f"{self.hardware.name}: step_overhead_ms, step_overhead_per_seq_us")]

    def describe(self) -> dict[str, object]:
        probes = {"decode 1 x 1024": BatchShape(num_decode=1, decode_ctx=1024, num_samples=1),
                  "decode 64 x 1024": BatchShape(num_decode=64, decode_ctx=64 * 1024, num_samples=64),
                  "prefill 2048": BatchShape(2048, 2048 * 2049 / 2, 2048, 0, 0, 1, 0, 1)}
        used = {name: {op.group: op.kind for op in self.trace(s)} for name, s in probes.items()}
        return {"kind": "analytic", "model": self.model.name, "hardware": self.hardware.name, "tp": self.tp,
                "precision": self.precision, "kv_dtype": self.kv_dtype, "parallelism": self.parallelism,
                "moe_imbalance": self.moe_imbalance, "attn_tp": self.attn_tp, "ep_overlap": self.ep_overlap,
                "op_sources": used, "tables": self.timer.sources()}

    # -- parts ----------------------------------------------------------------------------------------
    def _token_ops(self, n: int, samples: int) -> list[OpTime]:
        """Everything whose time depends only on the step's token and sample counts."""
        m, timer, dt = self.model, self.timer, self.precision
        dp = self._dp
        n_card = n / dp  # tokens through one attention group's dense layers
        ops: list[OpTime] = []
        for name, rows, cols, layers in self._gemms:
            ops.append(_op(f"gemm {name}", timer.gemm(n_card, rows, cols, dt), layers))
        ops.append(_op("element-wise", timer.elementwise(n_card, m.hidden_size, self._elementwise_width), m.num_layers))
        if m.is_moe:
            ops += self._expert_ops(n)
        if samples:
            ops.append(_op("gemm lm_head", timer.gemm(samples / dp, max(1, m.vocab_size // self._split), m.hidden_size,
                                                      dt), 1))
        if self._split > 1:
            inter_node = self._split > self.hardware.node_size
            ar = timer.all_reduce(n_card * m.hidden_size * 2.0, self._split, inter_node)
            ops.append(_op("all-reduce", ar, 2 * m.num_layers))
        return ops

    def _expert_ops(self, n: int) -> list[OpTime]:
        m, timer, dt = self.model, self.timer, self._expert_dtype
        layers, h, inter = m.num_moe_layers, m.hidden_size, m.moe_intermediate_size
        ops = [_op("gemm router", timer.gemm(n / self._dp, m.num_experts, h, self.precision), layers)]
        if self.parallelism == "ep":
            load = moe.busiest_rank(n, m, self._ep, self.moe_imbalance)
            up = timer.gemm(load.tokens_per_expert, 2 * inter, h, dt)
            down = timer.gemm(load.tokens_per_expert, h, inter, dt)
            ops.append(_op("gemm experts", up, layers * load.touched, down))
            dispatch, combine = moe.all_to_all_bytes(n / self._ep, m)
            inter_node = self._ep > self.hardware.node_size
            ops.append(_op("all-to-all dispatch", timer.all_to_all(dispatch, self._ep, inter_node, False), layers))
            ops.append(_op("all-to-all combine", timer.all_to_all(combine, self._ep, inter_node, True), layers))
            return ops
        k, e = m.num_experts_per_token, m.num_experts
        touched = e * (1.0 - (1.0 - k / e) ** n)  # distinct experts the batch activates (uniform routing)
        per_expert = n * k / touched
        split = max(1, inter // self.tp)
        up = timer.gemm(per_expert, 2 * split, h, dt)
        down = timer.gemm(per_expert, h, split, dt)
        ops.append(_op("gemm experts", up, layers * touched, down))
        return ops

    def _attention_ops(self, shape: BatchShape) -> list[OpTime]:
        m, timer, dp, layers = self.model, self.timer, self._dp, self.model.num_layers
        ops: list[OpTime] = []
        if shape.num_prefill_tokens:
            flops = shape.prefill_attn / dp * self._prefill_pair_flops
            mean_ctx = shape.prefill_attn / shape.num_prefill_tokens
            kv = shape.prefill_kv / dp * self._kv_layer
            ops.append(_op("attention prefill", timer.prefill_attention(flops, mean_ctx, kv), layers))
        if shape.num_decode:
            kv = shape.decode_ctx / dp * self._kv_layer
            if m.is_mla:
                timing = timer.mla_decode(shape.decode_ctx / dp * self._decode_pair_flops, kv)
            else:
                timing = timer.decode_attention(kv)
            ops.append(_op("attention decode", timing, layers))
        return ops

    def _overhead_s(self, shape: BatchShape) -> float:
        hw = self.hardware
        return hw.step_overhead_ms * 1e-3 + hw.step_overhead_per_seq_us * 1e-6 * shape.num_seqs / self._dp


def _combine(compute: float, comm: float, overlap: bool) -> float:
    return max(compute, comm) if overlap else compute + comm


def _op(group: str, timing: Timing, count: float, extra: Timing | None = None) -> OpTime:
    """``count`` x the timing (plus ``extra`` x count), as one group."""
    seconds = (timing.seconds + (extra.seconds if extra else 0.0)) * count
    return OpTime(group, seconds, timing.kind, timing.source)


def _dense_gemms(m: ModelSpec, split: int) -> list[tuple[str, int, int, int]]:
    """(name, N outputs, K inputs, layers) of the always-active weight matrices of one card, weights
    split ``split`` ways (column-parallel N, row-parallel K; MLA's low-rank down-projections and the
    latent KV projection replicated, as vLLM and SGLang shard them)."""
    h, out = m.hidden_size, []
    L = m.num_layers

    def cut(x: int) -> int:
        return max(1, x // split)
    if m.is_mla:
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            out += [("q_a", m.q_lora_rank, h, L), ("q_b", cut(m.num_heads * qk), m.q_lora_rank, L)]
        else:
            out.append(("q", cut(m.num_heads * qk), h, L))
        out += [("kv_a", m.kv_lora_rank + m.qk_rope_head_dim, h, L),
                ("kv_b", cut(m.num_heads * (m.qk_nope_head_dim + m.v_head_dim)), m.kv_lora_rank, L),
                ("o", h, cut(m.num_heads * m.v_head_dim), L)]
    else:
        d = m.head_dim
        kv_heads = max(1, m.num_kv_heads // split)
        out += [("qkv", (cut(m.num_heads) + 2 * kv_heads) * d, h, L), ("o", h, cut(m.num_heads) * d, L)]
    if m.num_dense_layers:
        out += [("gate_up", cut(2 * m.intermediate_size), h, m.num_dense_layers),
                ("down", h, cut(m.intermediate_size), m.num_dense_layers)]
    if m.is_moe and m.num_shared_experts:
        width = m.moe_intermediate_size * m.num_shared_experts
        out += [("shared gate_up", cut(2 * width), h, m.num_moe_layers),
                ("shared down", h, cut(width), m.num_moe_layers)]
    return out
