"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, and the mixtures of experts
Qwen3-MoE, Mixtral, Qwen2-MoE: ``moe.SparseMoeBlock`` in place of the dense MLP) over the paged KV cache.

Checkpoint layout is fixed at load time (``load_weights``): q/k/v are fused into one projection and
gate/up into another, so a dense layer runs four GEMMs; an MoE layer's experts are stacked per layer.
``forward`` takes a flat batch of tokens (prefill chunks first, then decodes, as
``attention.build_metadata`` lays them out) and returns final-normed hidden states; ``compute_logits``
turns the rows the caller picks into float32 logits.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pdserve.devices import AttentionFn
from pdserve.errors import ModelLoadError
from pdserve.kernels import cpu_ops_for
from pdserve.model.arch import ModelArch
from pdserve.model.attention import AttentionMetadata, cached_attention, paged_attention
from pdserve.model.layers import Linear, RMSNorm, RotaryEmbedding, can_pack_linear_weight, linear, \
    pack_linear_weight, silu_and_mul
from pdserve.model.moe import EXPERT_PROJS, SparseMoeBlock, canonical_expert_names
from pdserve.model.quant_weight import QuantBlocks, QuantizedWeight


class LlamaForCausalLM(nn.Module):
    """Weights are allocated on ``device`` in ``dtype`` as they are loaded (``load_weights``: those that
    stay quantized never get a float copy) or all at once by ``init_dummy_weights``. The RoPE tables live
    on ``device`` too; build the model where it will run rather than moving it with ``.to()``."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_model_len: int | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.max_model_len = max_model_len or arch.max_position_embeddings
        with torch.device("meta"):  # no init work: every weight is written by a loader
            self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, dtype=dtype)
            self.layers = nn.ModuleList(_DecoderLayer(arch, dtype, arch.layer_window(i), arch.is_moe_layer(i))
                                        for i in range(arch.num_layers))
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype)
            self.lm_head = None if arch.tie_word_embeddings else \
                Linear(arch.hidden_size, arch.vocab_size, bias=False, dtype=dtype)
        self._device = torch.device(device)
        self.rope = RotaryEmbedding(arch.head_dim, self.max_model_len, arch.rope_theta, arch.rope_scaling,
                                    dtype, device)
        for layer in self.layers:
            layer.self_attn.rope = self.rope
        self._packed_tied_head: torch.Tensor | None = None  # set by pack_weights for tied embeddings
        self._quant_embed: QuantizedWeight | None = None  # set by load_weights for a quantized embedding

    @property
    def device(self) -> torch.device:
        return self._device

    def set_attention(self, attention: AttentionFn | None) -> None:
        """Every layer's paged attention: a device backend's own (``DeviceBackend.attention``, the contract of
        ``model.attention.paged_attention``) or None for the built-in one (the CPU kernels on a CPU tensor,
        else PyTorch SDPA)."""
        for layer in self.layers:
            layer.self_attn.attention = attention

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) int64; kv_caches: one per layer, layout in attention.py.
        ``on_layer(i)``: called after layer ``i`` (its KV is in the cache; layer-wise KV saves).
        Returns final-normed hidden states (num_tokens, hidden_size)."""
        if self._quant_embed is not None:
            h = self._quant_embed.embedding(input_ids, self.dtype)  # (num_tokens, hidden_size)
        else:
            h = self.embed_tokens(input_ids)  # (num_tokens, hidden_size)
        cos_sin = self.rope.lookup(positions)  # once for all layers
        residual: torch.Tensor | None = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            h, residual = layer(h, residual, cos_sin, kv_cache, meta)
            if on_layer is not None:
                on_layer(i)
        return self.norm.add_forward(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (num_rows, hidden_size) -> (num_rows, vocab_size) float32."""
        return self.logits(hidden).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``compute_logits`` in the model's dtype (the sampler widens them only where it must)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self._quant_embed is not None:
            return self._quant_embed.linear(hidden)
        weight = self.embed_tokens.weight if self._packed_tied_head is None else self._packed_tied_head
        return linear(hidden, weight)

    def pack_weights(self) -> None:
        """Once the weights are final: every GEMM weight (experts too) into the CPU GEMM's packed layout (a
        no-op on other devices and dtypes). A tied LM head gets its own packed copy of the embedding (the lookup
        needs the plain one): vocab x hidden more bytes, stated by the engine's memory line."""
        for module in self.modules():
            if isinstance(module, (Linear, SparseMoeBlock)):
                module.pack()
        if self.lm_head is None and self._quant_embed is None and can_pack_linear_weight(self.embed_tokens.weight):
            self._packed_tied_head = pack_linear_weight(self.embed_tokens.weight)

    # ---- weights ---------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantBlocks]]) -> None:
        """Copy ``(hf_name, tensor)`` pairs into the fused parameters, converting dtype and device.

        A ``QuantBlocks`` in place of a tensor stays quantized when it (with the other parts of its fused
        projection, all quantized too) fills a GEMM weight or the embedding; otherwise it is dequantized
        into the parameter. Raises ModelLoadError naming the tensor on an unexpected name, a shape
        mismatch, or (at the end) any expected tensor that never came. Tied checkpoints may still carry
        ``lm_head.weight``: ignored. MoE expert tensors come per expert or stacked, under Qwen3-MoE's or
        Mixtral's names (``moe.canonical_expert_names``).
        """
        if self.arch.num_experts:
            weights = canonical_expert_names(weights, self.arch.moe_intermediate_size)
        targets = self._checkpoint_map()
        loaded: set[str] = set()
        quant_parts: dict[tuple[nn.Module, str], list[tuple[int, QuantBlocks]]] = {}
        with torch.no_grad():
            for name, tensor in weights:
                tied_head = name == "lm_head.weight" and self.lm_head is None
                if name.endswith("rotary_emb.inv_freq") or tied_head:
                    continue
                target = targets.get(name)
                if target is None:
                    raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint for "
                                         f"{self.arch.architecture}")
                module, attr, start, length = target
                expected = (length, *_rows(getattr(module, attr)).shape[1:])
                if tuple(tensor.shape) != expected:
                    raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
                if isinstance(tensor, QuantBlocks):
                    quant_parts.setdefault((module, attr), []).append((start, tensor))
                else:
                    _rows(self._materialize(module, attr))[start:start + length].copy_(tensor)
                loaded.add(name)
            self._place_quantized(quant_parts)
        missing = [n for n in targets if n not in loaded]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ModelLoadError(f"checkpoint lacks tensor(s) {', '.join(map(repr, missing[:5]))}{more}")

    def _materialize(self, module: nn.Module, attr: str) -> torch.Tensor:
        """``module.attr``, allocated on the model's device first if it is still a meta tensor."""
        param = module._parameters[attr]
        if param.is_meta:
            param = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=self._device), requires_grad=False)
            module._parameters[attr] = param
        return param

    def _place_quantized(self, quant_parts: dict[tuple[nn.Module, str], list[tuple[int, QuantBlocks]]]) -> None:
        """Quantized parts of each parameter: packed where they fill a GEMM weight or the embedding
        (the float parameter is then an empty tensor), else dequantized into it."""
        for (module, attr), parts in quant_parts.items():
            param = getattr(module, attr)
            if param.dim() != 2:
                raise ModelLoadError("quantized expert weights are not supported (load MoE models unquantized)")
            parts.sort(key=lambda part: part[0])
            fills = sum(p.shape[0] for _, p in parts) == param.shape[0]
            if fills and attr == "weight" and isinstance(module, (Linear, nn.Embedding)):
                quant = QuantizedWeight.pack(QuantBlocks.cat([p for _, p in parts]))
                empty = nn.Parameter(torch.empty(0, dtype=param.dtype, device=self._device), requires_grad=False)
                if isinstance(module, Linear):
                    module.quantize(quant, empty)
                else:
                    self._quant_embed = quant
                    module.weight = empty
                    self.register_buffer("quant_embed_weight", quant.packed)
                continue
            for start, blocks in parts:
                self._materialize(module, attr)[start:start + blocks.shape[0]].copy_(blocks.dequantize())

    def checkpoint_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` of the weights as they are now (views of the fused parameters)."""
        for name, (module, attr, start, length) in self._checkpoint_map().items():
            yield name, _rows(getattr(module, attr))[start:start + length]

    def weight_formats(self) -> str:
        """What the GEMM weights are held as, e.g. ``Q4_1 x210, Q8_0 x1`` or ``bfloat16``."""
        counts: dict[str, int] = {}
        quants = [m.quant for m in self.modules() if isinstance(m, Linear)] + [self._quant_embed]
        quants += [None for m in self.modules() if isinstance(m, SparseMoeBlock) for _ in (m.w13, m.w2)]
        for q in quants:
            key = str(self.dtype).removeprefix("torch.") if q is None else q.qtype
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))

    def init_dummy_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights, seeded, drawn in place in the parameters' own dtype and device."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for module in self.modules():
            for attr, param in module._parameters.items():
                if param is not None:
                    self._materialize(module, attr)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=gen)

    def _checkpoint_map(self) -> dict[str, tuple[nn.Module, str, int, int]]:
        """HF name -> (module, parameter name, first row, number of rows) of the slice it fills; the rows
        of a stacked expert parameter (E, rows, cols) are counted across experts (``_rows``)."""
        a = self.arch
        m: dict[str, tuple[nn.Module, str, int, int]] = {}

        def whole(name: str, module: nn.Module, attr: str = "weight") -> None:
            m[name] = (module, attr, 0, getattr(module, attr).shape[0])

        whole("model.embed_tokens.weight", self.embed_tokens)
        whole("model.norm.weight", self.norm)
        if self.lm_head is not None:
            whole("lm_head.weight", self.lm_head)
        shards = (("q_proj", 0, a.q_size), ("k_proj", a.q_size, a.kv_size),
                  ("v_proj", a.q_size + a.kv_size, a.kv_size))
        for i, layer in enumerate(self.layers):
            pre = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            for shard, start, length in shards:
                m[f"{pre}self_attn.{shard}.weight"] = (attn.qkv_proj, "weight", start, length)
                if a.attention_bias:
                    m[f"{pre}self_attn.{shard}.bias"] = (attn.qkv_proj, "bias", start, length)
            whole(f"{pre}self_attn.o_proj.weight", attn.o_proj)
            if a.qk_norm:
                whole(f"{pre}self_attn.q_norm.weight", attn.q_norm)
                whole(f"{pre}self_attn.k_norm.weight", attn.k_norm)
            if isinstance(mlp, SparseMoeBlock):
                whole(f"{pre}mlp.gate.weight", mlp.gate)
                inter, h = a.moe_intermediate_size, a.hidden_size
                for e in range(a.num_experts):
                    gate, up, down = (f"{pre}mlp.experts.{e}.{proj}.weight" for proj in EXPERT_PROJS)
                    m[gate] = (mlp, "w13", 2 * inter * e, inter)  # w13[e] = [gate | up]
                    m[up] = (mlp, "w13", 2 * inter * e + inter, inter)
                    m[down] = (mlp, "w2", h * e, h)
                if mlp.shared_expert is not None:
                    self._dense_mlp_map(m, f"{pre}mlp.shared_expert.", mlp.shared_expert)
                    whole(f"{pre}mlp.shared_expert_gate.weight", mlp.shared_expert_gate)
            else:
                self._dense_mlp_map(m, f"{pre}mlp.", mlp)
            whole(f"{pre}input_layernorm.weight", layer.input_layernorm)
            whole(f"{pre}post_attention_layernorm.weight", layer.post_attention_layernorm)
        return m

    @staticmethod
    def _dense_mlp_map(m: dict[str, tuple[nn.Module, str, int, int]], pre: str, mlp: _MLP) -> None:
        inter = mlp.intermediate_size
        m[f"{pre}gate_proj.weight"] = (mlp.gate_up_proj, "weight", 0, inter)
        m[f"{pre}up_proj.weight"] = (mlp.gate_up_proj, "weight", inter, inter)
        m[f"{pre}down_proj.weight"] = (mlp.down_proj, "weight", 0, mlp.down_proj.weight.shape[0])


class _Attention(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size, self.kv_size = arch.q_size, arch.kv_size
        self.scale = arch.head_dim ** -0.5
        self.qkv_proj = Linear(arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=arch.attention_bias,
                                  dtype=dtype)
        self.o_proj = Linear(arch.q_size, arch.hidden_size, bias=False, dtype=dtype)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype=dtype)
        self.rope: RotaryEmbedding  # set by the model once the tables exist on its device
        self.attention: AttentionFn | None = None  # a device backend's paged attention (set_attention)

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = h.shape[0]
        qkv = self.qkv_proj(h)  # (num_tokens, q_size + 2 * kv_size)
        ops = cpu_ops_for(h) if self.attention is None else None  # a backend's attention: RoPE in PyTorch
        if ops is not None and not self.qk_norm:  # RoPE and the cache write in one kernel
            cos, sin = cos_sin
            q = ops.qkv_rope_and_cache(qkv, cos, sin, kv_cache, meta.slot_mapping, self.num_heads,
                                       self.num_kv_heads)  # (T, H, head_dim)
            out = cached_attention(q, kv_cache, meta, self.scale, self.window)  # (T, H, head_dim)
            return self.o_proj(out.view(num_tokens, self.q_size))  # (T, hidden_size)
        qk = qkv[:, :self.q_size + self.kv_size].view(
            num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)  # (T, H + Hkv, head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(
            num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, head_dim)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :self.num_heads]), self.k_norm(qk[:, self.num_heads:])), dim=1)
        if ops is not None:  # RoPE and the cache write in one kernel, then attention over the cache
            q = torch.empty(num_tokens, self.num_heads, self.head_dim, dtype=h.dtype)
            cos, sin = cos_sin
            ops.rope_and_cache(q, qk, v, cos, sin, kv_cache, meta.slot_mapping)
            out = cached_attention(q, kv_cache, meta, self.scale, self.window)  # (T, H, head_dim)
        else:
            qk = self.rope.apply(qk, cos_sin)  # (T, H + Hkv, head_dim)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # (T, H, head_dim), (T, Hkv, head_dim)
            attend = paged_attention if self.attention is None else self.attention
            out = attend(q, k, v, kv_cache, meta, self.scale, self.window)  # (T, H, head_dim)
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # (T, hidden_size)


class _MLP(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, intermediate_size: int | None = None) -> None:
        super().__init__()
        self.intermediate_size = inter = intermediate_size or arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, 2 * inter, bias=False, dtype=dtype)
        self.down_proj = Linear(inter, arch.hidden_size, bias=False, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(h)  # (T, 2 * intermediate): [gate | up]
        return self.down_proj(silu_and_mul(gate_up))  # (T, hidden_size)


class _DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, window: int | None, is_moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype)
        self.self_attn = _Attention(arch, dtype, window)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype)
        if is_moe:
            shared = arch.shared_expert_intermediate_size
            self.mlp: nn.Module = SparseMoeBlock(arch, dtype, _MLP(arch, dtype, shared) if shared else None)
        else:
            self.mlp = _MLP(arch, dtype)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, normed = h, self.input_layernorm(h)
        else:
            normed, residual = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn(normed, cos_sin, kv_cache, meta)
        normed, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(normed), residual


def _rows(param: torch.Tensor) -> torch.Tensor:
    """A parameter as rows: stacked experts (E, rows, cols) as (E * rows, cols), a view; others as they are."""
    return param.flatten(0, 1) if param.dim() == 3 else param
