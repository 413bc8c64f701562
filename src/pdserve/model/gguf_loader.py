"""Weights from a GGUF file (llama.cpp's format), laid out for torch: dequantized with the gguf package, or
read as they are stored for the types the CPU kernels multiply quantized (``quant_weight``).

GGUF lists dims fastest-first (the reader's numpy arrays already come in torch order; ``reversed_shape``
gives the logical shape), and llama.cpp's converter permutes the rows of Q and K for llama-arch models
(interleaved RoPE pairs); both are undone here, once, at load time. A mixture of experts stores each sparse
layer's experts stacked, ``blk.N.ffn_{gate,up,down}_exps`` (num_experts, rows, cols): they come out one
expert at a time, always dequantized (the model's experts run unquantized).
"""
from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pdserve.errors import ModelLoadError
from pdserve.model.arch import ModelArch, reversed_shape
from pdserve.model.quant_weight import QuantBlocks, blocks_from_gguf

# llama.cpp permutes Q/K rows only for these architectures (Qwen2/3 keep Hugging Face's layout); Mixtral's
# files are llama's.
_PERMUTED_ARCHS = ("llama", "mistral", "mixtral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_SKIPPED = ("rope_freqs.weight",)  # consumed by ModelArch (llama3 frequency factors)


def open_gguf(path: str | Path):  # -> gguf.GGUFReader
    """Open a GGUF file, turning the reader's errors on a corrupt or truncated file into ModelLoadError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, ... on a bad file
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(e).__name__}: {e} "
                             "(corrupt or truncated download? delete it and pull again)") from e
    for t in reader.tensors:
        if t.data.nbytes != int(t.n_bytes):
            raise ModelLoadError(f"GGUF file {path} is truncated: tensor {t.name!r} has {t.data.nbytes} "
                                 f"of {int(t.n_bytes)} bytes")
    return reader


def gguf_arch(reader) -> ModelArch:
    """The architecture from GGUF metadata, with llama3 frequency factors when the file carries them."""
    arch = ModelArch.from_gguf(reader)
    if arch.rope_scaling and arch.rope_scaling["rope_type"] == "freq_factors":
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        arch = arch.with_rope_freq_factors(_dequantize(t.data, t.tensor_type, t.name).reshape(-1).tolist())
    return arch


def iter_gguf_weights(reader, arch: ModelArch, keep_types: tuple[str, ...] = ()
                      ) -> Iterator[tuple[str, torch.Tensor | QuantBlocks]]:
    """Yield ``(hf_name, float tensor)`` one tensor at a time (peak extra memory: one float32 tensor, or one
    expert's matrix of a stacked expert tensor).

    Matrices whose GGUF type is in ``keep_types`` (names from ``quant_weight.GGUF_KEPT_TYPES``) come as
    ``QuantBlocks`` instead, read exactly as stored, Q/K rows unpermuted the same way. Expert tensors are
    dequantized whatever their type, yielded per expert under the hub's names
    (``model.layers.N.mlp.experts.E.gate_proj.weight``)."""
    permute = arch.architecture in _PERMUTED_ARCHS
    for t in reader.tensors:
        if t.name in _SKIPPED:
            continue
        hf_name = gguf_to_hf_name(t.name)
        shape = reversed_shape(t)
        if ".experts." in hf_name:
            yield from _iter_experts(t, hf_name, shape, arch)
            continue
        if hf_name.endswith(".shared_expert_gate.weight") and len(shape) == 1:
            shape = (1, shape[0])  # llama.cpp stores Qwen2-MoE's (1, hidden) gate as a vector
        if t.tensor_type.name in keep_types and len(shape) == 2:
            blocks = blocks_from_gguf(t.data, t.tensor_type.name, shape[1])
            if permute and (".attn_q." in t.name or ".attn_k." in t.name):
                n_head = arch.num_heads if ".attn_q." in t.name else arch.num_kv_heads
                blocks = blocks.rows(_unpermute_qk(torch.arange(shape[0]), n_head))
            yield hf_name, blocks
            continue
        tensor = _as_tensor(_dequantize(t.data, t.tensor_type, t.name).reshape(shape))
        if permute and (".attn_q." in t.name or ".attn_k." in t.name):
            n_head = arch.num_heads if ".attn_q." in t.name else arch.num_kv_heads
            tensor = _unpermute_qk(tensor, n_head)
        yield hf_name, tensor


def gguf_to_hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor; a stacked expert tensor's is ``...mlp.experts.{proj}.weight``
    (``iter_gguf_weights`` splits it per expert)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    layer_names = _layer_names()
    if m is None or m.group(2) not in layer_names:
        raise ModelLoadError(f"unexpected tensor {name!r} in GGUF file")
    return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"


@functools.cache
def _layer_names() -> dict[str, str]:
    """GGUF's per-layer tensor names (``blk.N.<name>``, gguf's ``TENSOR_NAMES``) -> Hugging Face modules."""
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES

    hf_modules = {
        T.ATTN_NORM: "input_layernorm", T.FFN_NORM: "post_attention_layernorm",
        T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj", T.ATTN_V: "self_attn.v_proj",
        T.ATTN_OUT: "self_attn.o_proj", T.ATTN_Q_NORM: "self_attn.q_norm", T.ATTN_K_NORM: "self_attn.k_norm",
        T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj",
        # mixtures of experts: the router, the stacked experts, Qwen2-MoE's shared expert and its gate
        T.FFN_GATE_INP: "mlp.gate",
        T.FFN_GATE_EXP: "mlp.experts.gate_proj", T.FFN_UP_EXP: "mlp.experts.up_proj",
        T.FFN_DOWN_EXP: "mlp.experts.down_proj",
        T.FFN_GATE_SHEXP: "mlp.shared_expert.gate_proj", T.FFN_UP_SHEXP: "mlp.shared_expert.up_proj",
        T.FFN_DOWN_SHEXP: "mlp.shared_expert.down_proj", T.FFN_GATE_INP_SHEXP: "mlp.shared_expert_gate",
    }
    return {TENSOR_NAMES[t].removeprefix("blk.{bid}."): module for t, module in hf_modules.items()}


def _iter_experts(t, hf_name: str, shape: tuple[int, ...], arch: ModelArch
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """A stacked expert tensor (num_experts, rows, cols) as one dequantized (rows, cols) matrix per expert."""
    if len(shape) != 3 or shape[0] != arch.num_experts:
        raise ModelLoadError(f"GGUF tensor {t.name!r} has shape {shape}, expected ({arch.num_experts}, rows, "
                             "cols)")
    prefix, _, proj = hf_name.removesuffix(".weight").rpartition(".experts.")
    for e in range(shape[0]):
        # t.data[e]: expert e's rows as stored (quantized types: each row's blocks as bytes)
        matrix = _dequantize(t.data[e], t.tensor_type, t.name).reshape(shape[1:])  # (rows, cols)
        yield f"{prefix}.experts.{e}.{proj}.weight", _as_tensor(matrix)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # memory-mapped arrays are read-only; we only ever copy from them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _dequantize(data: np.ndarray, tensor_type, name: str) -> np.ndarray:
    """GGUF tensor bytes (or part of them: whole rows) of type ``tensor_type`` as float values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data
    try:
        return dequantize(data, tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"tensor {name!r}: GGUF type {tensor_type.name} is not supported") from e


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: rows (n_head, 2, half) were stored as (n_head, half, 2). Given the
    row numbers ``arange(rows)``, returns the stored row that each row comes from."""
    shape = w.shape
    half = shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, -1).transpose(1, 2).reshape(shape)  # (rows, *rest)
