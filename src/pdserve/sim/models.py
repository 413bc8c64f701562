"""The model catalogue: architecture figures the performance model needs, by name or from config.json.

Every entry is the public Hugging Face ``config.json`` of the model reduced to what matters for
speed and memory. ``get_model(name_or_path)`` also accepts a path to any Llama/Qwen/Mixtral/DeepSeek
style ``config.json`` (or a directory holding one); fields are read from the file, never guessed
from its name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer (dense or MoE, GQA or MLA attention)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers of an MoE model too)
    vocab_size: int
    tie_embeddings: bool = False
    # Mixture of experts (num_experts == 0: dense).
    num_experts: int = 0
    num_experts_per_token: int = 0
    num_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_layers: int = 0  # DeepSeek: the first layers are dense
    expert_weight_bytes: float | None = None  # native expert precision (gpt-oss MXFP4: 4.25 bits)
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank == 0: standard attention.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    max_context: int = 131072

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model {self.name!r}: {key} must be >= 1")
        if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
            raise ValueError(f"model {self.name!r}: experts per token must be in [1, num_experts]")

    # -- structure -----------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers if self.is_moe else 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def attn_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk) if self.q_lora_rank else \
                h * self.num_heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + \
                self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.num_heads * self.v_head_dim * h
        d = self.head_dim
        return h * d * (2 * self.num_heads + 2 * self.num_kv_heads)

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """One routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def num_params(self) -> int:
        """Total parameters (norms ignored)."""
        moe = self.num_moe_layers * ((self.num_experts + self.num_shared_experts) * self.expert_params
                                     + self.hidden_size * self.num_experts)
        return (self.num_layers * self.attn_params_per_layer + self.num_dense_layers * self.dense_mlp_params
                + moe + self.embedding_params)

    @property
    def num_active_params(self) -> int:
        """Parameters one token touches (routed experts: only the active ones)."""
        moe = self.num_moe_layers * ((self.num_experts_per_token + self.num_shared_experts) * self.expert_params
                                     + self.hidden_size * self.num_experts)
        return (self.num_layers * self.attn_params_per_layer + self.num_dense_layers * self.dense_mlp_params
                + moe + self.embedding_params)

    def weight_bytes(self, bytes_per_param: float) -> float:
        """Bytes of all weights at ``bytes_per_param`` (experts at their native size when smaller)."""
        if not self.is_moe:
            return self.num_params * bytes_per_param
        routed = self.num_moe_layers * self.num_experts * self.expert_params
        eb = min(bytes_per_param, self.expert_weight_bytes or bytes_per_param)
        return (self.num_params - routed) * bytes_per_param + routed * eb

    # -- KV cache ------------------------------------------------------------------------------------
    def kv_elements_per_token_layer(self) -> int:
        """Cached values per token per layer: K and V of every KV head, or MLA's latent + rope key."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, kv_bytes_per_element: float = 2.0) -> float:
        """Whole-model KV bytes per token (all layers, before tensor-parallel sharding)."""
        return self.num_layers * self.kv_elements_per_token_layer() * kv_bytes_per_element

    def kv_shard_factor(self, tp: int) -> float:
        """Fraction of a token's KV one tensor-parallel rank holds (KV heads split over ranks, replicated
        when there are fewer heads than ranks; MLA's latent is replicated on every rank)."""
        if self.is_mla:
            return 1.0
        return 1.0 / min(tp, self.num_kv_heads)


# Public config.json figures (Hugging Face), reduced.
CATALOGUE: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        ModelSpec("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256),
        ModelSpec("qwen3-8b", 36, 4096, 32, 8, 128, 12288, 151936, max_context=40960),
        ModelSpec("qwen3-32b", 64, 5120, 64, 8, 128, 25600, 151936, max_context=40960),
        ModelSpec("qwen3-235b-a22b", 94, 4096, 64, 4, 128, 12288, 151936, num_experts=128,
                  num_experts_per_token=8, moe_intermediate_size=1536, max_context=40960),
        ModelSpec("deepseek-v3", 61, 7168, 128, 128, 128, 18432, 129280, num_experts=256,
                  num_experts_per_token=8, num_shared_experts=1, moe_intermediate_size=2048,
                  first_k_dense_layers=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                  qk_rope_head_dim=64, v_head_dim=128, max_context=163840),
        ModelSpec("gpt-oss-120b", 36, 2880, 64, 8, 64, 2880, 201088, num_experts=128,
                  num_experts_per_token=4, moe_intermediate_size=2880, expert_weight_bytes=4.25 / 8),
        ModelSpec("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, tie_embeddings=True, max_context=8192),
    )
}
ALIASES = {"meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
           "qwen/qwen3-8b": "qwen3-8b", "qwen/qwen3-32b": "qwen3-32b", "qwen/qwen3-235b-a22b": "qwen3-235b-a22b",
           "deepseek-ai/deepseek-v3": "deepseek-v3", "deepseek-r1": "deepseek-v3",
           "openai/gpt-oss-120b": "gpt-oss-120b", "huggingfacetb/smollm2-135m": "smollm2-135m",
           "huggingfacetb/smollm2-135m-instruct": "smollm2-135m"}


def get_model(name_or_path: str) -> ModelSpec:
    """A catalogue entry (case-insensitive, HF repo ids accepted) or a ``config.json`` path."""
    key = name_or_path.lower()
    key = ALIASES.get(key, key)
    if key in CATALOGUE:
        return CATALOGUE[key]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return from_hf_config(path)
    raise ValueError(f"unknown model {name_or_path!r}: not in the catalogue ({', '.join(sorted(CATALOGUE))}) "
                     "and not a config.json path")


def shared_expert_count(shared_intermediate_size: int, moe_intermediate_size: int) -> int:
    """Qwen2-MoE's one shared expert, ``shared_intermediate_size`` wide, as routed experts' worth of
    parameters and work (``num_shared_experts``; its sigmoid gate, hidden_size weights, left out)."""
    if not (shared_intermediate_size and moe_intermediate_size):
        return 0
    return round(shared_intermediate_size / moe_intermediate_size)


def from_hf_config(path: str | Path) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (Llama, Qwen2/3, Mistral, Mixtral, Qwen3-MoE,
    DeepSeek-V2/V3, gpt-oss field names)."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)
        h = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        num_experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        moe_inter = int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0) if num_experts else 0
        shared = int(cfg.get("n_shared_experts") or 0) or \
            shared_expert_count(int(cfg.get("shared_expert_intermediate_size") or 0), moe_inter)
        spec = ModelSpec(
            name=str(Path(path).parent.name or path),
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=h,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads),
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            vocab_size=int(cfg["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=num_experts,
            num_experts_per_token=int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0)
            if num_experts else 0,
            num_shared_experts=shared,
            moe_intermediate_size=moe_inter,
            first_k_dense_layers=int(cfg.get("first_k_dense_replace") or 0),
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0),
            qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
            v_head_dim=int(cfg.get("v_head_dim") or 0),
            max_context=int(cfg.get("max_position_embeddings") or 131072),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read a model architecture from {path}: {e}") from e
    return spec if spec.intermediate_size else replace(spec, intermediate_size=4 * h)
