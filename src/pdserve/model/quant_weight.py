"""Block-quantized weights kept quantized in memory and multiplied in that form on CPU.

``QuantBlocks`` is the open form a weight is read into, exactly, from GGUF's Q8_0, Q4_0, Q4_1 and Q4_K
blocks (or made from float weights by gguf's own quantizers): unsigned integer values (rows, cols) with a
float scale and a float min per 32-column block, ``W[n, k] = scale[n, k // 32] * value[n, k] + min[n, k //
32]``. In that form the loader undoes GGUF's Q/K row permutation and the model fuses projections (row
permutations and concatenations), once, at load. ``QuantizedWeight.pack`` then lays it out in the tiles
the C++ kernels read (``pdserve/kernels/cpu_quant_gemm.cpp`` describes the layout), at the bytes per weight
of the source format (Q4_K excepted: its sub-block scales need float32, 6 bits a weight instead of 4.5).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.kernels import cpu_ops

logger = logging.getLogger(__name__)

BLOCK = 32  # columns per scale
TILE_ROWS, GROUP_ROWS = 16, 32  # the kernel's output tile; rows are padded to GROUP_ROWS
# GGUF types kept quantized by ``--quantization auto`` (others are dequantized at load).
GGUF_KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")
# Types float weights can be quantized to at load (gguf has quantizers for these).
QUANTIZE_TYPES = {"int8": "Q8_0", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
_GGUF_SIZES = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}  # block, bytes


@dataclass
class QuantBlocks:
    """A (rows, cols) weight as ``scale * value + min`` per 32-column block (see the module doc)."""

    qtype: str  # the GGUF type it came from: Q8_0, Q4_0, Q4_1, Q4_K ("mixed" after fusing different ones)
    bits: int  # 4 (values 0..15) or 8 (values 0..255)
    values: torch.Tensor  # (rows, padded_cols) uint8, padded_cols a multiple of 32
    scales: torch.Tensor  # (rows, padded_cols // 32) float32
    mins: torch.Tensor  # (rows, padded_cols // 32) float32
    cols: int  # the weight's own columns (<= padded_cols; the padding is zeros)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.cols

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (rows, cols)."""
        rows, padded = self.values.shape
        v = self.values.view(rows, padded // BLOCK, BLOCK).float()  # (rows, blocks, 32)
        return (v * self.scales[..., None] + self.mins[..., None]).view(rows, padded)[:, :self.cols]

    def rows(self, index: torch.Tensor) -> QuantBlocks:
        """The rows ``index`` (a permutation, say), in that order."""
        return QuantBlocks(self.qtype, self.bits, self.values[index], self.scales[index], self.mins[index], self.cols)

    @staticmethod
    def cat(parts: list[QuantBlocks]) -> QuantBlocks:
        """Rows of ``parts`` one after another (a fused projection); 8-bit if any part is."""
        qtypes = {p.qtype for p in parts}
        assert len({p.values.shape[1] for p in parts}) == 1, "parts of a fused weight have one width"
        return QuantBlocks(qtypes.pop() if len(qtypes) == 1 else "mixed", max(p.bits for p in parts),
                           torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.mins for p in parts]), parts[0].cols)


def blocks_from_gguf(raw: np.ndarray, qtype: str, cols: int, logical_cols: int | None = None) -> QuantBlocks:
    """GGUF's bytes of a (rows, cols) tensor of type ``qtype`` (one of ``GGUF_KEPT_TYPES``), read exactly;
    ``logical_cols`` < cols marks the last columns as padding."""
    logical = logical_cols or cols
    block_size, type_size = _GGUF_SIZES[qtype]
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    data = torch.from_numpy(flat.copy()).view(-1, cols // block_size * type_size)  # (rows, bytes of a row)
    rows = data.shape[0]
    if qtype == "Q4_K":
        return _q4_k(data, rows, cols, logical)
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
    blocks = data.view(rows, cols // BLOCK, size)  # (rows, blocks, bytes of a block)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # (rows, blocks)
    if qtype == "Q8_0":
        values = (blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return QuantBlocks(qtype, 8, values.view(rows, cols), d, -128.0 * d, logical)
    qs = blocks[..., 2 if qtype == "Q4_0" else 4:]  # (rows, blocks, 16): element j low nibble, j + 16 high
    values = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(rows, cols)  # (rows, cols)
    if qtype == "Q4_0":
        return QuantBlocks(qtype, 4, values, d, -8.0 * d, logical)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    return QuantBlocks(qtype, 4, values, d, m, logical)


def quantize_float(weight: torch.Tensor, target: str) -> QuantBlocks:
    """A float (rows, cols) weight quantized to ``target`` (a key of ``QUANTIZE_TYPES``) by gguf's own
    quantizer; columns are zero-padded to a multiple of 32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    qtype = QUANTIZE_TYPES[target]
    w = weight.detach().float().cpu()
    rows, cols = w.shape
    padded = -(-cols // BLOCK) * BLOCK
    if padded != cols:
        w = torch.nn.functional.pad(w, (0, padded - cols))
    raw = quantize(w.numpy(), GGMLQuantizationType[qtype])
    return blocks_from_gguf(raw, qtype, padded, cols)


def quantize_matrices(weights: Iterable[tuple[str, torch.Tensor | QuantBlocks]], quantization: str
                      ) -> Iterator[tuple[str, torch.Tensor | QuantBlocks]]:
    """``weights`` with every float matrix quantized to ``quantization`` when that is a type of
    ``QUANTIZE_TYPES`` (vectors such as norms stay float); unchanged for ``auto`` and ``none``."""
    for name, tensor in weights:
        if quantization in QUANTIZE_TYPES and isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
            tensor = quantize_float(tensor, quantization)
        yield name, tensor


class QuantizedWeight:
    """A weight packed for the kernels (``pack``): ``linear(x)`` = x @ W^T, ``embedding(ids)`` = W[ids]."""

    def __init__(self, packed: torch.Tensor, bits: int, scale_bytes: int, shape: tuple[int, int], qtype: str,
                 cols: int) -> None:
        self.packed = packed  # (row tiles, blocks, tile bytes) uint8
        self.bits, self.scale_bytes, self.qtype = bits, scale_bytes, qtype
        self.out_features, self.in_features = shape  # the logical weight; ``cols`` >= in_features (padding)
        self._cols = cols

    @staticmethod
    def pack(blocks: QuantBlocks) -> QuantizedWeight:
        """Tiles of ``blocks`` (see cpu_quant_gemm.cpp); scales in float16 where that is exact."""
        rows, cols = blocks.values.shape
        num_rows = -(-rows // GROUP_ROWS) * GROUP_ROWS
        nb = cols // BLOCK
        values, scales, mins = blocks.values, blocks.scales, blocks.mins
        if num_rows != rows:  # zero rows: scale and min 0
            pad = num_rows - rows
            values = torch.cat((values, values.new_zeros(pad, cols)))
            scales = torch.cat((scales, scales.new_zeros(pad, nb)))
            mins = torch.cat((mins, mins.new_zeros(pad, nb)))
        tiles = num_rows // TILE_ROWS
        if blocks.bits == 4:
            v = values.view(tiles, TILE_ROWS, nb, 2, 4, 4)  # (tile, lane, block, half, j, byte): k = 16h + 4j + b
            v = (v[:, :, :, 0] | (v[:, :, :, 1] << 4))  # (tile, lane, block, j, byte)
            v = v.permute(0, 2, 3, 1, 4).reshape(tiles, nb, 256)  # (tile, block, j * lane * byte)
        else:
            v = values.view(tiles, TILE_ROWS, nb, 8, 4)  # (tile, lane, block, group, byte)
            v = v.permute(0, 2, 3, 1, 4).reshape(tiles, nb, 512)  # (tile, block, group * lane * byte)
        exact16 = bool(torch.isfinite(scales.half()).all() and torch.isfinite(mins.half()).all()
                       and torch.equal(scales.half().float(), scales) and torch.equal(mins.half().float(), mins))
        sdtype = torch.float16 if exact16 else torch.float32

        def lanes(s: torch.Tensor) -> torch.Tensor:  # (rows, blocks) -> (tile, block, 16 * bytes)
            s = s.to(sdtype).view(tiles, TILE_ROWS, nb).permute(0, 2, 1).contiguous()
            return s.view(torch.uint8).view(tiles, nb, -1)

        packed = torch.cat((v, lanes(scales), lanes(mins)), dim=-1).contiguous()
        return QuantizedWeight(packed, blocks.bits, sdtype.itemsize, blocks.shape, blocks.qtype, cols)

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    def linear(self, x: torch.Tensor, portable: bool | None = None, act_bits: int | None = None) -> torch.Tensor:
        """x (..., in_features) float32/bfloat16/float16 -> (..., out_features), in x's dtype. ``portable``
        forces the plain C++ path (default: ``PDSERVE_QUANT_ISA``, else the best this CPU has);
        ``act_bits`` is the activations' integer width, 16 (15 bits) or 8 (default: ``activation_bits``)."""
        if self._cols != self.in_features:
            x = torch.nn.functional.pad(x, (0, self._cols - self.in_features))
        isa = _ISA if portable is None else int(portable)
        if act_bits is None:
            act_bits = activation_bits(x.numel() // max(self._cols, 1))
        return _ops().quant_linear(x, self.packed, self.bits, self.scale_bytes, self.out_features, self._cols,
                                   act_bits, isa)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` (num_ids,) int64 dequantized: (num_ids, in_features) in ``dtype``."""
        out = torch.empty(ids.numel(), self._cols, dtype=dtype)
        _ops().quant_embedding(out, ids.contiguous(), self.packed, self.bits, self.scale_bytes, self.out_features,
                               self._cols)
        return out[:, :self.in_features] if self._cols != self.in_features else out

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out_features, in_features), unpacked in PyTorch (the kernels' reference)."""
        tiles, nb, _ = self.packed.shape
        vb = 256 if self.bits == 4 else 512
        sdtype = torch.float16 if self.scale_bytes == 2 else torch.float32
        v = self.packed[..., :vb]
        if self.bits == 4:
            v = v.reshape(tiles, nb, 4, TILE_ROWS, 4)  # (tile, block, j, lane, byte)
            v = torch.stack((v & 0x0F, v >> 4), dim=2)  # (tile, block, half, j, lane, byte)
            v = v.permute(0, 4, 1, 2, 3, 5)  # (tile, lane, block, half, j, byte)
        else:
            v = v.reshape(tiles, nb, 8, TILE_ROWS, 4).permute(0, 3, 1, 2, 4)  # (tile, lane, block, group, byte)
        v = v.reshape(tiles * TILE_ROWS, nb, BLOCK).float()  # (rows, blocks, 32)

        def lanes(offset: int) -> torch.Tensor:  # (rows, blocks, 1)
            s = self.packed[..., offset:offset + TILE_ROWS * self.scale_bytes].contiguous().view(sdtype)
            return s.float().permute(0, 2, 1).reshape(tiles * TILE_ROWS, nb, 1)

        w = v * lanes(vb) + lanes(vb + TILE_ROWS * self.scale_bytes)
        return w.reshape(tiles * TILE_ROWS, nb * BLOCK)[:self.out_features, :self.in_features]


def _q4_k(data: torch.Tensor, rows: int, cols: int, logical: int) -> QuantBlocks:
    """Q4_K: super-blocks of 256 = 8 sub-blocks of 32, 6-bit sub-block scales and mins (ggml's layout:
    d, dmin float16; 12 bytes of packed scales; 128 bytes of nibbles, 64 values per 32 bytes)."""
    sb = data.view(rows, cols // 256, 144).to(torch.int32)  # (rows, super-blocks, bytes)
    d = data.view(rows, cols // 256, 144)[..., 0:2].contiguous().view(torch.float16).float()  # (rows, sbs, 1)
    dmin = data.view(rows, cols // 256, 144)[..., 2:4].contiguous().view(torch.float16).float()
    s = sb[..., 4:16]  # (rows, sbs, 12)
    sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)), dim=-1)  # (rows, sbs, 8)
    mn = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), dim=-1)
    qs = data.view(rows, cols // 256, 144)[..., 16:].reshape(rows, cols // 256, 4, 32)  # (rows, sbs, chunk, 32)
    values = torch.stack((qs & 0x0F, qs >> 4), dim=3).reshape(rows, cols)  # chunk c: sub-blocks 2c, 2c + 1
    scales = (d * sc.float()).reshape(rows, cols // BLOCK)
    mins = -(dmin * mn.float()).reshape(rows, cols // BLOCK)
    return QuantBlocks("Q4_K", 4, values, scales, mins, logical)


def _ops():
    ops = cpu_ops()
    assert ops is not None, "quantized weights are only kept where the CPU kernels are built"
    return ops


def _isa_choice() -> int:
    choice = os.environ.get("PDSERVE_QUANT_ISA", "auto")
    if choice not in ("auto", "portable"):
        raise ValueError(f"PDSERVE_QUANT_ISA must be auto or portable, got {choice!r}")
    return 0 if choice == "auto" else 1


def activation_bits(num_rows: int) -> int:
    """The activations' width for a product with ``num_rows`` rows, by ``ACTIVATION_BITS``: ``auto``
    rounds them to 15 bits up to ``MAX_ROWS_15_BIT`` rows (decode: bound by reading the weights, where the
    finer grid costs nothing measurable and keeps the dequantized model's results within ~1e-4) and to 8
    bits above (prefill and large batches: bound by arithmetic, where 8 bits halve the integer work and
    keep pace with bfloat16 GEMMs, as llama.cpp's and vLLM's GGUF kernels do); ``16`` or ``8`` always."""
    if ACTIVATION_BITS == "auto":
        return 16 if num_rows <= MAX_ROWS_15_BIT else 8
    return int(ACTIVATION_BITS)


def _activation_bits_choice() -> str:
    choice = os.environ.get("PDSERVE_QUANT_ACT_BITS", "auto")
    if choice not in ("auto", "8", "16"):
        raise ValueError(f"PDSERVE_QUANT_ACT_BITS must be auto, 8 or 16, got {choice!r}")
    return choice


MAX_ROWS_15_BIT = 8
ACTIVATION_BITS = _activation_bits_choice()  # auto, 8 or 16 (PDSERVE_QUANT_ACT_BITS)
_ISA = _isa_choice()
