"""Weights from a GGUF file (llama.cpp's format), laid out for torch: dequantized with the gguf package, or
read as they are stored for the types the CPU kernels multiply quantized (``quant_weight``).

GGUF lists dims fastest-first (the reader's numpy arrays already come in torch order; ``reversed_shape``
gives the logical shape), and llama.cpp's converter permutes the rows of Q and K for llama-arch models
(interleaved RoPE pairs); both are undone here, once, at load time.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pdserve.errors import ModelLoadError
from pdserve.model.arch import ModelArch, reversed_shape
from pdserve.model.quant_weight import QuantBlocks, blocks_from_gguf

# llama.cpp permutes Q/K rows only for these architectures (Qwen2/3 keep Hugging Face's layout).
_PERMUTED_ARCHS = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
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
        arch = arch.with_rope_freq_factors(_to_numpy(t).reshape(-1).tolist())
    return arch


def iter_gguf_weights(reader, arch: ModelArch, keep_types: tuple[str, ...] = ()
                      ) -> Iterator[tuple[str, torch.Tensor | QuantBlocks]]:
    """Yield ``(hf_name, float tensor)`` one tensor at a time (peak extra memory: one float32 tensor).

    Matrices whose GGUF type is in ``keep_types`` (names from ``quant_weight.GGUF_KEPT_TYPES``) come as
    ``QuantBlocks`` instead, read exactly as stored, Q/K rows unpermuted the same way."""
    permute = arch.architecture in _PERMUTED_ARCHS
    for t in reader.tensors:
        if t.name in _SKIPPED:
            continue
        hf_name = gguf_to_hf_name(t.name)
        shape = reversed_shape(t)
        if t.tensor_type.name in keep_types and len(shape) == 2:
            blocks = blocks_from_gguf(t.data, t.tensor_type.name, shape[1])
            if permute and (".attn_q." in t.name or ".attn_k." in t.name):
                n_head = arch.num_heads if ".attn_q." in t.name else arch.num_kv_heads
                blocks = blocks.rows(_unpermute_qk(torch.arange(shape[0]), n_head))
            yield hf_name, blocks
            continue
        array = _to_numpy(t).reshape(shape)
        with warnings.catch_warnings():  # memory-mapped arrays are read-only; we only ever copy from them
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        if permute and (".attn_q." in t.name or ".attn_k." in t.name):
            n_head = arch.num_heads if ".attn_q." in t.name else arch.num_kv_heads
            tensor = _unpermute_qk(tensor, n_head)
        yield hf_name, tensor


def gguf_to_hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ModelLoadError(f"unexpected tensor {name!r} in GGUF file")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _to_numpy(t) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return t.data
    try:
        return dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"tensor {t.name!r}: GGUF type {t.tensor_type.name} is not supported") from e


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: rows (n_head, 2, half) were stored as (n_head, half, 2). Given the
    row numbers ``arange(rows)``, returns the stored row that each row comes from."""
    shape = w.shape
    half = shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, -1).transpose(1, 2).reshape(shape)  # (rows, *rest)
