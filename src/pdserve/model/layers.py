"""Building blocks of the Llama family: RMSNorm and rotary position embeddings (HF "rotate_half" style)."""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.kernels import cpu_ops_for
from pdserve.model.quant_weight import QuantizedWeight


def _onednn_available() -> bool:
    choice = os.environ.get("PDSERVE_CPU_GEMM", "onednn")
    if choice not in ("onednn", "blas"):
        raise ValueError(f"PDSERVE_CPU_GEMM must be onednn or blas, got {choice!r}")
    return choice == "onednn" and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


_USE_ONEDNN = _onednn_available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


# oneDNN's GEMM streams packed weights from memory slower with 1 or 2 rows of input than with 3
# (SmolLM2-135M's layer GEMMs, 30 layers, one thread: 17.9 ms at 1 row, 19.7 at 2, 14.6 at 3, 15.3 at 4):
# smaller inputs are padded to this many rows (zeros, their results dropped).
MIN_GEMM_ROWS = 3


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or oneDNN's GEMM when ``weight`` was packed by ``pack_linear_weight``."""
    if weight.layout == torch._mkldnn:
        rows = x.shape[0]
        if x.dim() == 2 and 0 < rows < MIN_GEMM_ROWS:
            padded = x.new_zeros(MIN_GEMM_ROWS, x.shape[1])
            padded[:rows] = x
            return torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")[:rows]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def can_pack_linear_weight(weight: torch.Tensor) -> bool:
    return _USE_ONEDNN and weight.device.type == "cpu" and weight.dtype in _ONEDNN_DTYPES


def pack_linear_weight(weight: torch.Tensor, batch_hint: int = 64) -> torch.Tensor:
    """``weight`` (out, in) reordered into oneDNN's blocked layout for its GEMM, once, at load: 1.1-2x
    ``F.linear`` at this project's decode shapes on CPU, where the unpacked path reorders the weight on
    every call (benchmarks/offline_throughput.py). The result is opaque: only ``linear`` reads it.
    ``PDSERVE_CPU_GEMM=blas`` keeps plain weights."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` above; ``pack()`` swaps its weight for the packed one, and
    ``quantize()`` for a block-quantized one that the CPU kernels multiply as it is."""

    quant: QuantizedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            y = self.quant.linear(x)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)

    def pack(self) -> None:
        if self.quant is None and can_pack_linear_weight(self.weight):
            self.weight = nn.Parameter(pack_linear_weight(self.weight), requires_grad=False)

    def quantize(self, quant: QuantizedWeight, empty: torch.Tensor) -> None:
        """Use ``quant`` from now on, ``empty`` in place of the float weight (the tiles are a buffer,
        ``quant_weight``)."""
        assert (quant.out_features, quant.in_features) == (self.out_features, self.in_features)
        self.quant = quant
        self.weight = empty
        self.register_buffer("quant_weight", quant.packed)


class RMSNorm(nn.Module):
    """RMSNorm as Hugging Face computes it: normalize in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = cpu_ops_for(x)
        if ops is not None and x.is_contiguous():
            out = torch.empty_like(x)
            ops.rms_norm(out, x, self.weight, self.eps)
            return out
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return F.rms_norm(x.float(), (self.dim,), None, self.eps).to(x.dtype) * self.weight

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` and its norm: (normed, new residual). May update ``x`` and ``residual`` in place."""
        ops = cpu_ops_for(x)
        if ops is not None and x.is_contiguous() and residual.is_contiguous():
            ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        residual = x + residual
        return self.forward(residual), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dimension."""
    ops = cpu_ops_for(x)
    if ops is not None and x.is_contiguous():
        return ops.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class RotaryEmbedding:
    """cos/sin tables for positions ``[0, max_len)``, computed once, indexed by each token's position.

    Not an ``nn.Module``: the tables are derived data, rebuilt on the model's device, never loaded.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict[str, Any] | None,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        inv_freq = rope_inv_freq(head_dim, theta, scaling)  # (head_dim // 2,) float32
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_len, head_dim // 2)
        factor = rope_attention_factor(scaling)
        self.max_len = max_len
        self.cos = (freqs.cos() * factor).to(dtype=dtype, device=device)  # (max_len, head_dim // 2)
        self.sin = (freqs.sin() * factor).to(dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (num_tokens, 1, head_dim // 2) at ``positions``: once per step, shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate ``x`` (num_tokens, num_heads, head_dim) by the tables ``lookup`` returned."""
        cos, sin = cos_sin
        x1, x2 = x.chunk(2, dim=-1)  # each (num_tokens, num_heads, head_dim // 2)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (num_tokens, num_heads, head_dim) at ``positions`` (num_tokens,)."""
        return self.apply(x, self.lookup(positions))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32, with linear, llama3 or GGUF freq-factor scaling."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "freq_factors":
        factors = torch.tensor(scaling["factors"], dtype=torch.float32)
        assert factors.shape == inv_freq.shape, (factors.shape, inv_freq.shape)
        return inv_freq / factors
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN multiplies cos and sin by (so q.k by its square); 1 for the other types."""
    if not scaling or scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, s: dict[str, Any]) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): high-frequency dimensions kept, low-frequency ones interpolated by
    ``factor``, a linear ramp between the dimensions that rotate ``beta_fast`` and ``beta_slow`` times over
    the original context."""
    factor = float(s["factor"])
    old_len = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide it by factor)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
