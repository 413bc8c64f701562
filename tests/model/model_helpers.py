"""Helpers for the model tests: tiny random Llama-family checkpoints written to real files (safetensors
via transformers, GGUF via gguf.GGUFWriter with llama.cpp's Q/K permutation), and helpers that run
pdserve's model and transformers' on a prompt."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdserve.model.attention import build_metadata

BLOCK_SIZE = 4

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2)

# name -> (transformers config class name, extra config fields)
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "llama3-rope-untied": ("LlamaConfig", dict(
        tie_word_embeddings=False, max_position_embeddings=512,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("LlamaConfig", dict(
        tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                    "factor": 2.0})),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None, rope_theta=10000.0)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32, rope_theta=10000.0,
                                  use_sliding_window=False)),
    "mistral-sliding": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=6, rope_theta=10000.0)),
    "qwen2-sliding": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=True,
                                          sliding_window=5, max_window_layers=1)),
    "qwen3-yarn": ("Qwen3Config", dict(
        tie_word_embeddings=True, head_dim=32, use_sliding_window=False, max_position_embeddings=1024,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64})),
    # mixtures of experts: layer 1 dense (mlp_only_layers), the others routed, top-k renormalized
    "qwen3-moe": ("Qwen3MoeConfig", dict(
        tie_word_embeddings=False, head_dim=32, rope_theta=10000.0, use_sliding_window=False, num_hidden_layers=3,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1])),
    # every second layer routed (decoder_sparse_step), top-3 of 4 not renormalized
    "qwen3-moe-step": ("Qwen3MoeConfig", dict(
        tie_word_embeddings=True, rope_theta=10000.0, use_sliding_window=False, num_experts=4,
        num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=False, decoder_sparse_step=2)),
    # a gated shared expert beside the routed ones; q/k/v bias
    "qwen2-moe": ("Qwen2MoeConfig", dict(
        tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False, num_hidden_layers=3,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        mlp_only_layers=[0])),
    "mixtral": ("MixtralConfig", dict(tie_word_embeddings=False, sliding_window=None, rope_theta=10000.0,
                                      intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
}


@dataclass
class Tiny:
    name: str
    hf_dir: Path
    hf_model: Any  # the transformers model (float32, eval)


def make_tiny_hf(name: str, out_dir: Path, seed: int = 0) -> Tiny:
    """A random transformers model of variant ``name``, saved with ``save_pretrained`` to ``out_dir``.
    Every parameter (norms and biases too) is drawn at random so no part of the mapping goes untested."""
    import transformers

    cls_name, extra = TINY_VARIANTS[name]
    config = getattr(transformers, cls_name)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return Tiny(name, out_dir, model)


# ---- GGUF --------------------------------------------------------------------------------------

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
}


def hf_to_gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")  # model.layers.N.<module...>.weight
    module, kind = ".".join(parts[3:-1]), parts[-1]
    return f"blk.{parts[2]}.{_HF_TO_GGUF[module]}.{kind}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (written independently of pdserve's inverse)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(tiny: Tiny, path: Path, qtype: str = "F32", extra_tensors: dict | None = None,
                    drop: tuple[str, ...] = (), add_fields: Callable[[Any], None] | None = None
                    ) -> dict[str, np.ndarray]:
    """Write ``tiny`` as GGUF the way llama.cpp's convert_hf_to_gguf does, matrices in ``qtype`` (those whose
    rows are not whole blocks of it, and MoE routers, in F32); return the weights as a loader should see them
    (quantized then dequantized, in Hugging Face layout) to build the reference model from.

    Mixtures of experts: Mixtral as architecture ``llama`` with ``expert_count``, Qwen2/3-MoE as
    ``qwen2moe`` and ``qwen3moe`` with ``expert_feed_forward_length``; a sparse layer's experts stacked,
    gate, up and down apart (num_experts, rows, cols), the router ``ffn_gate_inp``, Qwen2-MoE's shared
    expert ``ffn_*_shexp`` and its gate as a vector. ``add_fields(writer)`` adds the caller's metadata."""
    import gguf
    from gguf.quants import dequantize, quantize

    cfg = tiny.hf_model.config
    model_type = cfg.model_type
    arch = _GGUF_ARCHS.get(model_type, model_type)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = dict(cfg.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    num_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if num_experts:
        w.add_expert_count(num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if model_type != "mixtral":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if rope.get("rope_type") == "llama3":  # llama.cpp stores the divisors as a tensor
        from pdserve.model.layers import rope_inv_freq

        base = rope_inv_freq(head_dim, rope["rope_theta"], None)
        scaled = rope_inv_freq(head_dim, rope["rope_theta"], rope)
        w.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    if add_fields is not None:
        add_fields(w)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    block_size = gguf.GGML_QUANT_SIZES[q][0]

    def put(gguf_name: str, stored: np.ndarray, a: np.ndarray, is_router: bool = False) -> np.ndarray:
        """Write ``stored`` (``a`` as the file lays it out); return ``a`` as a loader sees it."""
        if qtype == "F32" or stored.ndim < 2 or stored.shape[-1] % block_size or is_router:
            w.add_tensor(gguf_name, np.ascontiguousarray(stored, dtype=np.float32))
            return a
        w.add_tensor(gguf_name, quantize(np.ascontiguousarray(stored), q), raw_dtype=q)
        return dequantize(quantize(np.ascontiguousarray(a), q), q)  # blocks are row-wise: permuting commutes

    permute = model_type in ("llama", "mistral", "mixtral")
    seen: dict[str, np.ndarray] = {}
    for name, t in tiny.hf_model.state_dict().items():
        if name in drop or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        a = t.detach().float().numpy()
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith(".mlp.experts.gate_up_proj"):  # (E, 2 * inter, hidden): gate and up stacked apart
            inter = a.shape[1] // 2
            gate = put(f"blk.{layer}.ffn_gate_exps.weight", a[:, :inter], a[:, :inter])
            up = put(f"blk.{layer}.ffn_up_exps.weight", a[:, inter:], a[:, inter:])
            seen[name] = np.concatenate((gate, up), axis=1)
            continue
        if name.endswith(".mlp.experts.down_proj"):  # (E, hidden, inter)
            seen[name] = put(f"blk.{layer}.ffn_down_exps.weight", a, a)
            continue
        if name.endswith(".mlp.shared_expert_gate.weight"):  # (1, hidden), written squeezed
            seen[name] = put(f"blk.{layer}.ffn_gate_inp_shexp.weight", a.reshape(-1), a)
            continue
        stored = a
        if permute and ("q_proj" in name or "k_proj" in name):
            n_head = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            stored = llamacpp_permute(a, n_head)
        seen[name] = put(hf_to_gguf_name(name), stored, a, is_router=name.endswith(".mlp.gate.weight"))
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return seen


# transformers' model_type -> llama.cpp's general.architecture (Mixtral is llama with experts)
_GGUF_ARCHS = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama"}


# ---- running pdserve's model ------------------------------------------------------------------------


def new_kv_caches(model, num_blocks: int = 32, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    a = model.arch
    return [torch.zeros(2, num_blocks, BLOCK_SIZE, a.num_kv_heads, a.head_dim, dtype=dtype or model.dtype)
            for _ in range(a.num_layers)]


@torch.inference_mode()
def prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (len(ids), vocab) float32 for one prompt, as one prefill chunk on a fresh cache."""
    T = len(ids)
    block_ids = list(range(-(-T // BLOCK_SIZE)))
    meta = build_metadata([(0, T, block_ids)], BLOCK_SIZE)
    hidden = model(torch.tensor(ids), torch.arange(T), new_kv_caches(model), meta)
    return model.compute_logits(hidden)


@torch.inference_mode()
def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([ids])).logits[0].float()
