"""pdserve's model and loaders against transformers on tiny random checkpoints written to real files."""
from __future__ import annotations

import copy

import pytest
import torch

from pdserve import kernels
from pdserve.config import ModelConfig
from pdserve.model.attention import build_metadata
from pdserve.model.loader import load_model
from model_helpers import (BLOCK_SIZE, TINY_VARIANTS, hf_logits, new_kv_caches, prefill_logits,
                                 write_tiny_gguf)

PROMPT = [1, 17, 45, 99, 3, 150, 8, 23, 77, 5, 64, 120, 9, 31, 2, 88, 42, 13, 100, 7]


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_safetensors_matches_transformers(tiny_models, name):
    tiny = tiny_models[name]
    model, arch = load_model(ModelConfig(model=str(tiny.hf_dir), dtype="float32", device="cpu"))
    assert arch.architecture == tiny.hf_model.config.model_type
    assert arch.num_params() == sum(p.numel() for p in tiny.hf_model.parameters())
    ours = prefill_logits(model, PROMPT)
    ref = hf_logits(tiny.hf_model, PROMPT)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "llama3-rope-untied", "llama-linear-rope", "qwen2", "qwen3",
                                  "qwen3-moe", "mixtral", "qwen2-moe"])
@pytest.mark.parametrize("qtype,quantization", [("F32", "auto"), ("BF16", "auto"), ("Q8_0", "none"),
                                                ("Q8_0", "auto"), ("Q4_0", "auto"), ("Q4_1", "auto")])
def test_gguf_matches_transformers(tiny_models, tmp_path, name, qtype, quantization, monkeypatch):
    """Dequantized at load (``none``) or kept quantized and multiplied by the CPU kernels (``auto``: its
    activations rounded to 15 bits per 32-value block, hence the looser tolerance), against transformers
    on the dequantized weights; with the Q/K row permutation of llama-arch files undone either way. The
    mixtures of experts' stacked experts are dequantized either way (their attention, dense layers and
    shared expert stay quantized with ``auto``)."""
    from pdserve.model import quant_weight

    monkeypatch.setattr(quant_weight, "ACTIVATION_BITS", "16")  # 8-bit prefill: see test_default_model.py
    tiny = tiny_models[name]
    path = tmp_path / f"{name}-{qtype}.gguf"
    weights = write_tiny_gguf(tiny, path, qtype)
    ref_model = copy.deepcopy(tiny.hf_model)
    with torch.no_grad():  # the reference sees exactly what survives quantization
        for pname, p in ref_model.named_parameters():
            p.copy_(torch.from_numpy(weights[pname]) if pname in weights else p)
    model, arch = load_model(ModelConfig(model=str(path), dtype="float32", device="cpu",
                                         quantization=quantization))
    assert arch.architecture == tiny.hf_model.config.model_type
    assert arch.tie_word_embeddings == tiny.hf_model.config.tie_word_embeddings
    kept = qtype in quant_weight.GGUF_KEPT_TYPES and quantization == "auto"
    is_quantized = kept and kernels.cpu_ops() is not None
    assert model.weight_formats().startswith(qtype if is_quantized else "float32")
    ours, ref = prefill_logits(model, PROMPT), hf_logits(ref_model, PROMPT)
    tol = 2e-3 if is_quantized else 1e-4
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", ["qwen2", "mistral-sliding", "qwen2-sliding", "qwen3-moe", "mixtral"])
def test_paged_steps_match_full_forward(tiny_models, name):
    """Chunked prefill, then decodes batched with another request's prefill, over the paged cache:
    every step's logits equal transformers' logits on the full sequence at those positions (also with a
    sliding window shorter than the chunks, on every layer or on some)."""
    tiny = tiny_models[name]
    model, _ = load_model(ModelConfig(model=str(tiny.hf_dir), dtype="float32", device="cpu"))
    ref = hf_logits(tiny.hf_model, PROMPT)
    other = PROMPT[::-1][:9]
    ref_other = hf_logits(tiny.hf_model, other)
    kv = new_kv_caches(model, num_blocks=16)
    blocks_a, blocks_b = [3, 7, 1, 9, 12], [2, 5, 11]  # scattered on purpose
    with torch.inference_mode():
        # step 1: first chunk of A (positions 0..6)
        meta = build_metadata([(0, 7, blocks_a)], BLOCK_SIZE)
        h = model(torch.tensor(PROMPT[:7]), torch.arange(7), kv, meta)
        torch.testing.assert_close(model.compute_logits(h), ref[:7], atol=1e-4, rtol=1e-4)
        # step 2: B's whole prompt (prefill) + A's second chunk (7..15) as two chunks
        meta = build_metadata([(0, 9, blocks_b), (7, 9, blocks_a)], BLOCK_SIZE)
        ids = torch.tensor(other + PROMPT[7:16])
        pos = torch.cat([torch.arange(9), torch.arange(7, 16)])
        logits = model.compute_logits(model(ids, pos, kv, meta))
        torch.testing.assert_close(logits[:9], ref_other, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[9:], ref[7:16], atol=1e-4, rtol=1e-4)
        # steps 3..6: A decodes one token at a time, B decodes alongside (its own next tokens)
        for t in range(16, 20):
            meta = build_metadata([(t, 1, blocks_a)], BLOCK_SIZE)
            logits = model.compute_logits(model(torch.tensor([PROMPT[t]]), torch.tensor([t]), kv, meta))
            torch.testing.assert_close(logits[0], ref[t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_float32(tiny_models, dtype):
    tiny = tiny_models["llama"]
    model, _ = load_model(ModelConfig(model=str(tiny.hf_dir), dtype=dtype, device="cpu"))
    assert model.embed_tokens.weight.dtype == getattr(torch, dtype)
    ours = prefill_logits(model, PROMPT)
    assert ours.dtype == torch.float32
    ref = hf_logits(tiny.hf_model, PROMPT)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_close_to_cpu_float32(tiny_models):
    tiny = tiny_models["qwen3"]
    model, _ = load_model(ModelConfig(model=str(tiny.hf_dir), dtype="auto", device="cuda"))
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.device.type == "cuda"
    T = len(PROMPT)
    meta = build_metadata([(0, T, list(range(-(-T // BLOCK_SIZE))))], BLOCK_SIZE, device="cuda")
    kv = [c.cuda() for c in new_kv_caches(model)]
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(PROMPT, device="cuda"), torch.arange(T, device="cuda"),
                                          kv, meta)).cpu()
    ref = hf_logits(tiny.hf_model, PROMPT)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_safetensors_int8_matches_transformers(tiny_models, name, monkeypatch):
    """``quantization=int8``: an HF checkpoint's matrices quantized at load (Q8_0 blocks, columns padded to
    32) and multiplied by the kernels, against transformers on the same quantized-then-dequantized weights."""
    from pdserve.model import quant_weight

    if kernels.cpu_ops() is None:
        pytest.skip("CPU kernels could not be built here")
    monkeypatch.setattr(quant_weight, "ACTIVATION_BITS", "16")
    tiny = tiny_models[name]
    ref_model = copy.deepcopy(tiny.hf_model)
    with torch.no_grad():
        for _, p in ref_model.named_parameters():
            if p.dim() == 2:
                p.copy_(quant_weight.quantize_float(p, "int8").dequantize())
    model, _ = load_model(ModelConfig(model=str(tiny.hf_dir), dtype="float32", device="cpu", quantization="int8"))
    assert model.weight_formats().startswith("Q8_0") and "float32" not in model.weight_formats()
    ours, ref = prefill_logits(model, PROMPT), hf_logits(ref_model, PROMPT)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
