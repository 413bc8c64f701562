"""The shape of a Llama-family model, read from the checkpoint's own metadata (config.json or GGUF fields).

One frozen dataclass covers Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral, Qwen2 (q/k/v bias),
Qwen3 (per-head q/k RMSNorm) and the mixtures of experts Qwen3-MoE, Mixtral and Qwen2-MoE (a routed sparse
MLP in place of the dense one, Qwen2-MoE's with a gated shared expert): they differ only in the flags below.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pdserve.errors import ModelLoadError

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")
MOE_ARCHITECTURES = ("qwen2_moe", "qwen3_moe", "mixtral")
# freq_factors: GGUF llama3, one divisor per frequency (the rope_freqs.weight tensor)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "freq_factors")


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)  # rope_type + its parameters
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # a query attends to at most this many latest tokens (itself included)
    sliding_layers: tuple[bool, ...] = ()  # per layer: does the window apply (empty: every layer, if any)
    # Mixture of experts (num_experts == 0: every MLP dense). A sparse layer routes each token to the
    # num_experts_per_tok experts of highest softmax probability, weighted by those probabilities
    # (renormalized to sum 1 when norm_topk_prob), each expert a SwiGLU MLP of moe_intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    dense_mlp_layers: tuple[int, ...] = ()  # layers of an MoE model whose MLP is dense (intermediate_size)
    # Qwen2-MoE: every token also runs one shared SwiGLU expert this wide, scaled by sigmoid(a linear gate)
    shared_expert_intermediate_size: int = 0

    def layer_window(self, layer: int) -> int | None:
        if self.sliding_window is None or (self.sliding_layers and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_mlp_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ModelLoadError(f"unsupported architecture {self.architecture!r} "
                                 f"(supported: {ARCHITECTURES})")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                                 f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"unsupported rope scaling {rope_type!r} (supported: {ROPE_TYPES})")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ModelLoadError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                     f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1:
                raise ModelLoadError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")

    # ---- sizes -------------------------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameters as stored (tied embeddings counted once)."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            attn += 2 * self.head_dim
        dense_mlp = 3 * h * self.intermediate_size
        moe_mlp = self.num_experts * (h + 3 * h * self.moe_intermediate_size)  # router row + expert, each
        if self.shared_expert_intermediate_size:
            moe_mlp += 3 * h * self.shared_expert_intermediate_size + h  # the shared expert and its gate
        num_moe = self.num_moe_layers
        layers = self.num_layers * (attn + 2 * h) + num_moe * moe_mlp + (self.num_layers - num_moe) * dense_mlp
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + layers + h

    def num_active_params(self) -> int:
        """Parameters one token's forward pass reads: only its routed experts of each sparse layer."""
        idle = self.num_experts - self.num_experts_per_tok
        return self.num_params() - self.num_moe_layers * idle * 3 * self.hidden_size * self.moe_intermediate_size

    def weight_bytes(self, dtype: torch.dtype) -> int:
        return self.num_params() * _itemsize(dtype)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV cache bytes one token takes over all layers (keys and values)."""
        return 2 * self.num_layers * self.kv_size * _itemsize(dtype)

    # ---- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArch:
        """From a Hugging Face config.json dict (transformers 4.x ``rope_scaling``/``rope_theta`` or
        5.x ``rope_parameters``)."""
        model_type = config.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ModelLoadError(f"unsupported model_type {model_type!r} in config.json "
                                 f"(supported: {ARCHITECTURES})")
        try:
            hidden = int(config["hidden_size"])
            num_heads = int(config["num_attention_heads"])
            rope_params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
            rope_theta = float(rope_params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
            rope_scaling = _normalize_rope(rope_params)
            if rope_scaling and rope_scaling["rope_type"] == "yarn" and rope_scaling.get("factor") is None:
                # DeepSeek-style configs: the factor is the ratio of the context lengths
                rope_scaling["factor"] = int(config["max_position_embeddings"]) / \
                    float(rope_scaling["original_max_position_embeddings"])
            head_dim = config.get("head_dim") or hidden // num_heads
            eos = config.get("eos_token_id")
            window, sliding_layers = _hf_sliding_window(config, model_type)
            if config.get("hidden_act", "silu") != "silu":
                raise ModelLoadError(f"unsupported hidden_act {config['hidden_act']!r} (supported: silu)")
            moe = _hf_moe(config, model_type)
            return cls(
                architecture=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False))
                or (model_type == "qwen2_moe" and bool(config.get("qkv_bias", True))),
                qk_norm=model_type in ("qwen3", "qwen3_moe"),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(eos),
                sliding_window=window,
                sliding_layers=sliding_layers,
                **moe,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from e

    @classmethod
    def from_gguf(cls, reader: Any) -> ModelArch:
        """From a ``gguf.GGUFReader``: the ``{arch}.*`` fields, the tokenizer's special ids, and which
        tensors exist (bias, q/k norm, untied output, llama3 ``rope_freqs``, routers of sparse layers)."""
        arch = _gguf_field(reader, "general.architecture")
        names = {t.name for t in reader.tensors}
        architecture = _gguf_architecture(reader, arch, names)

        def get(key: str, default: Any = None) -> Any:
            value = _gguf_field(reader, f"{arch}.{key}")
            if value is None and default is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
            return default if value is None else value

        hidden = int(get("embedding_length"))
        num_heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", 0)) or int(get("rope.dimension_count", 0)) \
            or hidden // num_heads
        vocab = _gguf_field(reader, f"{arch}.vocab_size")
        if vocab is None:
            vocab = next(reversed_shape(t)[0] for t in reader.tensors if t.name == "token_embd.weight")
        rope_scaling = None
        scaling_type = _gguf_field(reader, f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise ModelLoadError(f"unsupported GGUF rope scaling {scaling_type!r}")
        if "rope_freqs.weight" in names:  # llama3: per-frequency divisors stored as a tensor
            rope_scaling = {"rope_type": "freq_factors"}
        eos = [_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
               _gguf_field(reader, "tokenizer.ggml.eot_token_id"),
               _gguf_field(reader, "tokenizer.ggml.eom_token_id")]
        num_layers = int(get("block_count"))
        moe = _gguf_moe(reader, arch, architecture, names, num_layers) \
            if architecture in MOE_ARCHITECTURES else {}
        return cls(
            architecture=architecture,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            **moe,
        )

    def with_rope_freq_factors(self, factors: list[float]) -> ModelArch:
        return replace(self, rope_scaling={"rope_type": "freq_factors", "factors": tuple(factors)})



# ---- built-in shapes for dummy weights (from the models' published config.json) -----------------------

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

BUILTIN_ARCHS: dict[str, ModelArch] = {
    "smollm2-135m": ModelArch("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 100000.0, 8192, True,
                              bos_token_id=1, eos_token_ids=(2,)),
    "llama-3.1-8b": ModelArch("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, 131072, False,
                              rope_scaling=_LLAMA31_ROPE, bos_token_id=128000,
                              eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-70b": ModelArch("llama", 128256, 8192, 28672, 80, 64, 8, 128, 1e-5, 500000.0, 131072, False,
                               rope_scaling=_LLAMA31_ROPE, bos_token_id=128000,
                               eos_token_ids=(128001, 128008, 128009)),
    "qwen3-8b": ModelArch("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, 1e-6, 1000000.0, 40960, False,
                          qk_norm=True, bos_token_id=None, eos_token_ids=(151645, 151643)),
    "qwen2.5-7b": ModelArch("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 1e-6, 1000000.0, 32768, False,
                            attention_bias=True, bos_token_id=None, eos_token_ids=(151645, 151643)),
    "qwen3-30b-a3b": ModelArch("qwen3_moe", 151936, 2048, 6144, 48, 32, 4, 128, 1e-6, 1000000.0, 40960, False,
                               qk_norm=True, bos_token_id=None, eos_token_ids=(151645, 151643), num_experts=128,
                               num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    "mixtral-8x7b": ModelArch("mixtral", 32000, 4096, 14336, 32, 32, 8, 128, 1e-5, 1000000.0, 32768, False,
                              bos_token_id=1, eos_token_ids=(2,), num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=14336, norm_topk_prob=True),
}


def reversed_shape(tensor: Any) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order (GGUF lists dims fastest-first)."""
    return tuple(int(d) for d in reversed(tensor.shape))


# ---- private helpers -------------------------------------------------------------------------------


def _hf_sliding_window(config: dict[str, Any], model_type: str) -> tuple[int | None, tuple[bool, ...]]:
    """The window and which layers it applies to, as transformers reads them: ``layer_types`` when the
    config lists them; else Mistral windows every layer, Qwen2 (``use_sliding_window``) the layers from
    ``max_window_layers`` on."""
    window = config.get("sliding_window")
    if not window:
        return None, ()
    layer_types = config.get("layer_types")
    if layer_types:
        sliding = tuple(t == "sliding_attention" for t in layer_types)
        return (int(window), sliding) if any(sliding) else (None, ())
    if model_type in ("mistral", "mixtral"):
        return int(window), ()
    if config.get("use_sliding_window") and model_type == "qwen2_moe":  # transformers 5's rule for it
        last = int(config.get("max_window_layers", 0))
        sliding = tuple(i % 2 == 0 and i < last for i in range(int(config["num_hidden_layers"])))
        return (int(window), sliding) if any(sliding) else (None, ())
    if config.get("use_sliding_window"):
        first = int(config.get("max_window_layers", 0))
        sliding = tuple(i >= first for i in range(int(config["num_hidden_layers"])))
        return (int(window), sliding) if any(sliding) else (None, ())
    return None, ()


def _hf_moe(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The MoE fields as transformers reads them. Qwen2/3-MoE: ``num_experts`` (written as
    ``num_local_experts`` by transformers 5), a layer is sparse unless listed in ``mlp_only_layers`` or
    off the ``decoder_sparse_step``; Qwen2-MoE's shared expert ``shared_expert_intermediate_size`` wide;
    Mixtral: every layer sparse, ``intermediate_size`` wide, the top-k weights always renormalized."""
    if model_type not in MOE_ARCHITECTURES:
        return {}
    shared_keys = ("n_shared_experts", "num_shared_experts") + \
        (("shared_expert_intermediate_size",) if model_type != "qwen2_moe" else ())
    for key in shared_keys:
        if config.get(key):
            raise ModelLoadError(f"{model_type}: shared experts ({key}) are not supported")
    num_experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    num_layers = int(config["num_hidden_layers"])
    if model_type == "mixtral":
        if num_experts < 1:
            raise ModelLoadError("mixtral: config.json lacks num_local_experts")
        return dict(num_experts=num_experts, num_experts_per_tok=int(config["num_experts_per_tok"]),
                    moe_intermediate_size=int(config["intermediate_size"]), norm_topk_prob=True)
    step = int(config.get("decoder_sparse_step") or 1)
    mlp_only = {int(i) for i in config.get("mlp_only_layers") or ()}
    dense = tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step)
    return dict(num_experts=num_experts, num_experts_per_tok=int(config["num_experts_per_tok"]) if num_experts else 0,
                moe_intermediate_size=int(config["moe_intermediate_size"]) if num_experts else 0,
                norm_topk_prob=bool(config.get("norm_topk_prob", False)), dense_mlp_layers=dense,
                shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0)
                if num_experts else 0)


def _gguf_architecture(reader: Any, arch: str, names: set[str]) -> str:
    """Ours for GGUF's ``general.architecture`` ``arch``. llama.cpp writes Mixtral as ``llama`` with experts
    (``llama.expert_count``, router tensors ``blk.N.ffn_gate_inp``); Qwen2/3-MoE have their own names."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, Keys

    ours = {MODEL_ARCH_NAMES[a]: name for a, name in (
        (MODEL_ARCH.LLAMA, "llama"), (MODEL_ARCH.QWEN2, "qwen2"), (MODEL_ARCH.QWEN3, "qwen3"),
        (MODEL_ARCH.QWEN2MOE, "qwen2_moe"), (MODEL_ARCH.QWEN3MOE, "qwen3_moe"))}
    ours["mistral"] = "mistral"
    if arch not in ours:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} (supported: {tuple(ours)})")
    router = TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_INP].removeprefix("blk.{bid}")  # .ffn_gate_inp
    has_experts = bool(_gguf_field(reader, Keys.LLM.EXPERT_COUNT.format(arch=arch))) or \
        any(n.endswith(f"{router}.weight") or "_exps." in n for n in names)
    if ours[arch] == "llama" and has_experts:
        return "mixtral"
    if has_experts and ours[arch] not in MOE_ARCHITECTURES:
        moe_names = [MODEL_ARCH_NAMES[a] for a in (MODEL_ARCH.QWEN2MOE, MODEL_ARCH.QWEN3MOE)]
        raise ModelLoadError(f"GGUF architecture {arch!r} with experts is not supported (mixtures of "
                             f"experts: llama with expert_count (Mixtral), {', '.join(moe_names)})")
    return ours[arch]


# llama.cpp's renormalization of the top-k weights where a file does not say (``expert_weights_norm``):
# always for Qwen3-MoE and Mixtral, never for Qwen2-MoE (their published configs' norm_topk_prob)
_GGUF_NORM_TOPK = {"qwen3_moe": True, "mixtral": True, "qwen2_moe": False}


def _gguf_moe(reader: Any, arch: str, architecture: str, names: set[str], num_layers: int) -> dict[str, Any]:
    """The MoE fields of a GGUF file: ``expert_count``, ``expert_used_count``; a layer is sparse where it
    has a router (``blk.N.ffn_gate_inp``), else dense; an expert's width from ``expert_feed_forward_length``,
    else from its stacked tensors (Mixtral's files); the top-k weights renormalized as ``expert_weights_norm``
    says, else as llama.cpp does; Qwen2-MoE's shared expert from its ``ffn_*_shexp`` tensors. Routing that
    llama.cpp has and pdserve lacks (sigmoid gating, scaled weights, other shared experts) fails clearly."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES, ExpertGatingFuncType, Keys

    def field(key: str) -> Any:
        return _gguf_field(reader, key.format(arch=arch))

    def shape(tensor: MODEL_TENSOR, layer: int) -> tuple[int, ...] | None:
        name = TENSOR_NAMES[tensor].format(bid=layer) + ".weight"
        return next((reversed_shape(t) for t in reader.tensors if t.name == name), None)

    num_experts, top_k = int(field(Keys.LLM.EXPERT_COUNT) or 0), int(field(Keys.LLM.EXPERT_USED_COUNT) or 0)
    if num_experts < 1 or top_k < 1:
        raise ModelLoadError(f"GGUF mixture of experts {arch!r} lacks "
                             f"{Keys.LLM.EXPERT_COUNT.format(arch=arch)} or "
                             f"{Keys.LLM.EXPERT_USED_COUNT.format(arch=arch)}")
    router = TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_INP] + ".weight"
    sparse = [i for i in range(num_layers) if router.format(bid=i) in names]
    if not sparse:
        raise ModelLoadError(f"GGUF mixture of experts {arch!r} has no router tensors "
                             f"({router.format(bid='N')})")
    gating = field(Keys.LLM.EXPERT_GATING_FUNC)
    if gating is not None and int(gating) != ExpertGatingFuncType.SOFTMAX:
        raise ModelLoadError(f"GGUF expert gating function {ExpertGatingFuncType(int(gating)).name} is not "
                             "supported (softmax only)")
    scale = field(Keys.LLM.EXPERT_WEIGHTS_SCALE)
    if scale is not None and float(scale) not in (0.0, 1.0):
        raise ModelLoadError(f"GGUF expert weights scale {scale} is not supported (unscaled routed weights "
                             "only)")
    experts = shape(MODEL_TENSOR.FFN_GATE_EXP, sparse[0])  # (num_experts, moe_intermediate, hidden)
    width = field(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH) or (experts[1] if experts else None)
    if width is None:
        name = TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_EXP].format(bid=sparse[0])
        raise ModelLoadError(f"GGUF file lacks {name}.weight (the experts stacked per layer; per-expert "
                             "tensors are not supported)")
    norm = field(Keys.LLM.EXPERT_WEIGHTS_NORM)
    shared = shape(MODEL_TENSOR.FFN_GATE_SHEXP, sparse[0])  # (shared_intermediate, hidden)
    if (shared or any("_shexp." in n for n in names)) and architecture != "qwen2_moe":
        raise ModelLoadError(f"GGUF {arch!r}: shared experts are not supported (Qwen2-MoE's only)")
    return dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=int(width),
                norm_topk_prob=_GGUF_NORM_TOPK[architecture] if norm is None else bool(norm),
                dense_mlp_layers=tuple(i for i in range(num_layers) if i not in sparse),
                shared_expert_intermediate_size=int(field(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH)
                                                    or (shared[0] if shared else 0)))


def _normalize_rope(params: dict[str, Any]) -> dict[str, Any] | None:
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type == "default":
        return None
    return {"rope_type": rope_type, **params}


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _gguf_field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    return f.contents()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
