"""GGUF quantization types pdserve relies on, through gguf's own (de)quantizers and through the loader."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from pdserve.model.gguf_loader import iter_gguf_weights, open_gguf
from pdserve.model.arch import ModelArch

Q = gguf.GGMLQuantizationType

# max error relative to the row's max magnitude
ROUND_TRIP_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.2, Q.Q4_1: 0.1}


@pytest.mark.parametrize("qtype", list(ROUND_TRIP_TOL), ids=lambda q: q.name)
def test_round_trip(qtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    y = dequantize(quantize(x, qtype), qtype)
    assert y.shape == x.shape and y.dtype == np.float32
    err = np.abs(y - x).max() / np.abs(x).max()
    assert err <= ROUND_TRIP_TOL[qtype], (qtype.name, err)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_load_like_gguf_dequantize(tmp_path, qtype):
    """gguf has no quantizer for K-quants: write random blocks (finite fp16 scales) and check that the
    loader yields exactly gguf's dequantization, in torch's (rows, cols) layout."""
    raw = _random_k_blocks(qtype, (6,), 512)
    expected = dequantize(raw, qtype)
    assert expected.shape == (6, 512) and np.isfinite(expected).all()
    arch = ModelArch("qwen2", 8, 512, 6, 1, 4, 4, 128, 1e-6, 1e4, 64, True)  # no Q/K permutation
    (name, tensor), = list(iter_gguf_weights(_write_one(tmp_path, "blk.0.ffn_down.weight", raw, qtype), arch))
    assert name == "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(tensor, torch.from_numpy(expected), atol=0, rtol=0)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_stacked_k_quant_experts_load_per_expert(tmp_path, qtype):
    """A mixture of experts' stacked tensor (num_experts, rows, cols), as Q4_K_M files store ffn_down_exps:
    one dequantized (rows, cols) matrix per expert, exactly gguf's dequantization of the whole tensor."""
    num_experts, rows, cols = 3, 4, 256
    raw = _random_k_blocks(qtype, (num_experts, rows), cols)
    expected = dequantize(raw, qtype)  # (E, rows, cols)
    assert np.isfinite(expected).all()
    arch = ModelArch("qwen3_moe", 8, rows, 8, 1, 4, 4, 128, 1e-6, 1e4, 64, True, num_experts=num_experts,
                     num_experts_per_tok=2, moe_intermediate_size=cols)
    weights = list(iter_gguf_weights(_write_one(tmp_path, "blk.0.ffn_down_exps.weight", raw, qtype), arch))
    assert [name for name, _ in weights] == [f"model.layers.0.mlp.experts.{e}.down_proj.weight"
                                             for e in range(num_experts)]
    for e, (_, tensor) in enumerate(weights):
        torch.testing.assert_close(tensor, torch.from_numpy(expected[e]), atol=0, rtol=0)


def _random_k_blocks(qtype, leading: tuple[int, ...], cols: int) -> np.ndarray:
    """Random bytes of a K-quant tensor (*leading, cols), its fp16 super-block scales small and finite."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(*leading, cols // block_size * type_size), dtype=np.uint8)
    scales = rng.uniform(-0.01, 0.01, size=(*leading, cols // block_size)).astype(np.float16).view(np.uint8)
    blocks = raw.reshape(*leading, -1, type_size)
    if qtype == Q.Q4_K:  # block starts with d, dmin (fp16 each)
        blocks[..., 0:2] = scales.reshape(*leading, -1, 2)
        blocks[..., 2:4] = scales.reshape(*leading, -1, 2)
    else:  # Q6_K: ends with d (fp16)
        blocks[..., -2:] = scales.reshape(*leading, -1, 2)
    return raw


def _write_one(tmp_path, name: str, raw: np.ndarray, qtype):  # -> gguf.GGUFReader
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return open_gguf(path)
