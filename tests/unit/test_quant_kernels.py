"""Block-quantized weights (pdserve.model.quant_weight) and their C++ kernels (cpu_quant_gemm.cpp):
GGUF blocks read exactly (against gguf's own dequantization), packed and unpacked without loss, and
``quant_linear`` against dequantize-then-matmul on random weights for every supported type, both code
paths (AVX512-VNNI where this CPU has it, portable), both activation widths, odd shapes."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from pdserve import kernels
from pdserve.model import quant_weight
from pdserve.model.quant_weight import QuantBlocks, QuantizedWeight, blocks_from_gguf, quantize_float

ops = kernels.cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")
Q = gguf.GGMLQuantizationType


def _random_k_quant(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random Q4_K blocks with finite, small float16 d and dmin (gguf has no K-quant quantizer)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // 256 * 144), dtype=np.uint8)
    scales = rng.uniform(-0.01, 0.01, size=(rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
    blocks = raw.reshape(rows, -1, 144)
    blocks[:, :, 0:4] = scales.reshape(rows, -1, 4)
    return raw


def _blocks(qtype: str, rows: int, cols: int, seed: int) -> tuple[QuantBlocks, torch.Tensor]:
    """Random weights in ``qtype`` as QuantBlocks, and gguf's own dequantization of them (float32)."""
    if qtype == "Q4_K":
        raw = _random_k_quant(rows, cols, seed)
    else:
        w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
        raw = quantize(w, Q[qtype])
    return blocks_from_gguf(raw, qtype, cols), torch.from_numpy(dequantize(raw, Q[qtype]).reshape(rows, cols))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_blocks_read_exactly_and_pack_without_loss(qtype):
    cols = 512 if qtype == "Q4_K" else 96
    blocks, ref = _blocks(qtype, 37, cols, seed=1)
    assert blocks.shape == (37, cols) and blocks.bits == (8 if qtype == "Q8_0" else 4)
    torch.testing.assert_close(blocks.dequantize(), ref, atol=0, rtol=0)
    packed = QuantizedWeight.pack(blocks)
    assert packed.scale_bytes == (4 if qtype == "Q4_K" else 2)  # float16 only where exact
    torch.testing.assert_close(packed.dequantize(), ref, atol=0, rtol=0)
    ids = torch.tensor([0, 36, 5, 16, 15, 5])
    for dtype in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(packed.embedding(ids, dtype), ref[ids].to(dtype), atol=0, rtol=0)
    # a row permutation and a concatenation (the Q/K unpermute, fused projections) stay exact
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    fused = QuantizedWeight.pack(QuantBlocks.cat([blocks.rows(perm), blocks]))
    torch.testing.assert_close(fused.dequantize(), torch.cat([ref[perm], ref]), atol=0, rtol=0)


def _error_bound(x: torch.Tensor, w: torch.Tensor, act_bits: int) -> torch.Tensor:
    """|x @ w.T - kernel| can be at most: each activation rounded to within half a step of its block's
    grid (max |x| of the block / qmax), times |w|; plus float32 accumulation and the output's rounding."""
    rows, cols = x.shape
    padded = -(-cols // 32) * 32
    xp = torch.nn.functional.pad(x.double(), (0, padded - cols))
    wp = torch.nn.functional.pad(w.double(), (0, padded - cols))
    step = xp.view(rows, -1, 32).abs().amax(-1) / (127 if act_bits == 8 else 16383)  # (rows, blocks)
    w_abs = wp.abs().view(w.shape[0], -1, 32).sum(-1)  # (out, blocks)
    exact = xp @ wp.T
    return 0.5 * step @ w_abs.T + 1e-5 * (xp.abs() @ wp.abs().T) + 1e-6, exact


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("act_bits", [16, 8])
@pytest.mark.parametrize("portable", [False, True])
def test_quant_linear_matches_dequantized_matmul(qtype, rows, act_bits, portable):
    out_features = 50  # not a multiple of the 16-row tile nor of the 32-row group
    if qtype == "int8":  # float weights quantized at load: any number of columns (zero-padded to 32)
        in_features = 100
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(2))
        blocks = quantize_float(w, "int8")
        ref_w = blocks.dequantize()
    else:
        in_features = 512 if qtype == "Q4_K" else 96
        blocks, ref_w = _blocks(qtype, out_features, in_features, seed=3)
    weight = QuantizedWeight.pack(blocks)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x[0, :7] *= 30  # an outlier block
    bound, exact = _error_bound(x, ref_w, act_bits)
    y = weight.linear(x, portable=portable, act_bits=act_bits)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= bound).all(), ((y.double() - exact).abs() / bound).max()
    yb = weight.linear(x.bfloat16(), portable=portable, act_bits=act_bits)
    assert yb.dtype == torch.bfloat16
    bound_b, exact_b = _error_bound(x.bfloat16().float(), ref_w, act_bits)
    assert ((yb.double() - exact_b).abs() <= bound_b + exact_b.abs() * 2**-8).all()


def test_paths_agree_and_batched_rows_equal_single_rows():
    """The vectorized and portable paths compute the same sums (to float32 rounding), and at a given
    activation width a row's result does not depend on the other rows of its batch."""
    blocks, _ = _blocks("Q4_1", 70, 192, seed=4)
    weight = QuantizedWeight.pack(blocks)
    x = torch.randn(9, 192, generator=torch.Generator().manual_seed(5))
    for act_bits in (16, 8):
        fast, portable = weight.linear(x, False, act_bits), weight.linear(x, True, act_bits)
        torch.testing.assert_close(fast, portable, atol=1e-5, rtol=1e-5)
        single = torch.cat([weight.linear(x[i:i + 1], False, act_bits) for i in range(9)])
        torch.testing.assert_close(fast, single, atol=0, rtol=0)


def test_activation_width_by_rows(monkeypatch):
    monkeypatch.setattr(quant_weight, "ACTIVATION_BITS", "auto")
    assert [quant_weight.activation_bits(n) for n in (1, quant_weight.MAX_ROWS_15_BIT, 64)] == [16, 16, 8]
    blocks, _ = _blocks("Q8_0", 32, 64, seed=8)
    weight = QuantizedWeight.pack(blocks)
    x = torch.randn(20, 64)
    torch.testing.assert_close(weight.linear(x), weight.linear(x, act_bits=8), atol=0, rtol=0)
    torch.testing.assert_close(weight.linear(x[:2]), weight.linear(x[:2], act_bits=16), atol=0, rtol=0)
    monkeypatch.setattr(quant_weight, "ACTIVATION_BITS", "16")
    torch.testing.assert_close(weight.linear(x), weight.linear(x, act_bits=16), atol=0, rtol=0)


def test_leading_dimensions_and_empty_input():
    blocks, ref_w = _blocks("Q8_0", 32, 64, seed=6)
    weight = QuantizedWeight.pack(blocks)
    x = torch.randn(2, 3, 64)
    y = weight.linear(x)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, x @ ref_w.T, atol=1e-3, rtol=1e-3)
    assert weight.linear(torch.empty(0, 64)).shape == (0, 32)


def test_bad_layout_is_rejected():
    blocks, _ = _blocks("Q8_0", 32, 64, seed=7)
    weight = QuantizedWeight.pack(blocks)
    with pytest.raises(RuntimeError, match="do not fit the layout"):
        ops.quant_linear(torch.randn(1, 64), weight.packed[:1], 8, 2, 32, 64, 16, 0)
    with pytest.raises(RuntimeError, match="columns"):
        ops.quant_linear(torch.randn(1, 63), weight.packed, 8, 2, 32, 64, 16, 0)
    with pytest.raises(RuntimeError, match="id out of range"):
        weight.embedding(torch.tensor([32]), torch.float32)
