"""A float8_e4m3fn KV cache (``--kv-cache-dtype fp8``): K/V written saturated and rounded, by the PyTorch path
and the fused C++ write alike; attention over it, by the C++ kernels (decode, prefill chunks on a context) and
by the SDPA path, equals attention over a float32 cache holding the same rounded values, and stays within
fp8's error of attention over the unrounded K/V."""
from __future__ import annotations

import pytest
import torch

from pdserve import kernels
from pdserve.config import CacheConfig
from pdserve.model.attention import FP8_MAX, build_metadata, paged_attention, write_slots

FP8 = torch.float8_e4m3fn
ops = kernels.cpu_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)  # torch compares no float8 tensors


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _contexts(g, num_blocks, bs, hkv, d, spread=1.0):
    """A random cache in float32, and its fp8 copy."""
    kv = torch.randn(2, num_blocks, bs, hkv, d, generator=g) * spread
    return kv, _fp8(kv)


# -- writing -------------------------------------------------------------------------------------------------
def test_write_saturates_at_448_instead_of_making_nan():
    cache = torch.zeros(4, 2, 1, 2, dtype=FP8)  # (blocks, block_size, heads, head_dim)
    x = torch.tensor([[[1000.0, -1e6]], [[0.3, -448.0]]])  # (tokens, heads, head_dim)
    write_slots(cache, torch.tensor([5, 2]), x)
    rows = cache.view(-1, 1, 2).float()
    assert rows[5].tolist() == [[448.0, -448.0]] and not rows.isnan().any()
    assert rows[2].tolist() == [[float(torch.tensor(0.3).to(FP8).float()), -448.0]]
    assert not _bytes(cache.view(-1, 1, 2))[[0, 1, 3, 4, 6, 7]].any()  # other slots untouched


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_rope_and_cache_writes_what_the_pytorch_path_writes(dtype):
    """The kernels' fused RoPE + cache write rounds K/V to the model's dtype, saturates and rounds to e4m3:
    byte for byte the PyTorch path's cast of the same K/V; q is untouched by the cache's dtype."""
    g = torch.Generator().manual_seed(0)
    t, h, hkv, d = 7, 6, 2, 64
    qk = (torch.randn(t, h + hkv, d, generator=g) * 200).to(dtype)  # some K beyond 448
    v = (torch.randn(t, hkv, d, generator=g) * 200).to(dtype)
    pos = torch.arange(t, dtype=torch.float32)[:, None] * torch.rand(d // 2, generator=g)
    cos, sin = pos.cos().to(dtype), pos.sin().to(dtype)
    slots = torch.tensor([3, 17, 4, 30, 31, 0, 9])
    ref_cache = torch.zeros(2, 2, 16, hkv, d, dtype=dtype)
    fp8_cache = torch.zeros(2, 2, 16, hkv, d, dtype=FP8)
    q_ref, q_fp8 = (torch.empty(t, h, d, dtype=dtype) for _ in range(2))
    ops.rope_and_cache(q_ref, qk, v, cos, sin, ref_cache, slots)
    ops.rope_and_cache(q_fp8, qk, v, cos, sin, fp8_cache, slots)
    assert torch.equal(q_ref, q_fp8)
    assert ref_cache.float().abs().max() > FP8_MAX  # the saturation is exercised
    assert torch.equal(_bytes(_fp8(ref_cache)), _bytes(fp8_cache))


# -- reading: the C++ kernels -----------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (4, 1, 36), (6, 2, 80)])
def test_decode_kernel_reads_fp8_as_the_values_it_holds(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads + head_dim)
    bs, num_blocks = 16, 64
    lens = torch.tensor([1, 15, 17, 100, 161])  # odd, partial and multi-block contexts
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    kv, kv8 = _contexts(g, num_blocks, bs, kv_heads, head_dim, spread=3.0)
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    out8, out_rounded, out_exact = (torch.empty_like(q) for _ in range(3))
    ops.paged_decode_attention(out8, q, kv8, tables, lens, scale)
    ops.paged_decode_attention(out_rounded, q, kv8.float(), tables, lens, scale)  # the same values, float32
    ops.paged_decode_attention(out_exact, q, kv, tables, lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out8.float(), out_rounded.float(), atol=tol, rtol=tol)
    assert _relative_error(out8, out_exact) < 0.06  # e4m3: 3 mantissa bits, ~3% a value at most


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (6, 2, 80)])
@pytest.mark.parametrize("window", [0, 7])
def test_prefill_kernel_reads_fp8_chunks_on_a_context(dtype, heads, kv_heads, head_dim, window):
    """Chunks at odd offsets on cached contexts (the vector path for 64 and 128, the portable one for 80)."""
    g = torch.Generator().manual_seed(heads * head_dim + window)
    bs, num_blocks = 16, 48
    query_starts = torch.tensor([0, 5, 38, 39])  # chunks of 5, 33 and 1 tokens
    context_starts = torch.tensor([3, 17, 60])
    num_chunks = len(context_starts)
    max_blocks = -(-61 // bs)
    tables = torch.randperm(num_blocks, generator=g)[: num_chunks * max_blocks].view(num_chunks, max_blocks)
    kv, kv8 = _contexts(g, num_blocks, bs, kv_heads, head_dim, spread=3.0)
    q = torch.randn(39, heads, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    outs = []
    for cache in (kv8, kv8.float().to(dtype), kv.to(dtype)):
        out = torch.empty_like(q)
        ops.paged_prefill_attention(out, q, cache, tables, query_starts, context_starts, scale, window)
        outs.append(out)
    out8, out_rounded, out_exact = outs
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out8.float(), out_rounded.float(), atol=tol, rtol=tol)
    assert _relative_error(out8, out_exact) < 0.06


# -- reading: the layer, kernels and SDPA alike ----------------------------------------------------------------
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_over_fp8_equals_attention_over_its_values(monkeypatch, use_kernel, window):
    """The layer writes a prompt into an fp8 cache, then runs a step of a chunk on that context and two
    decodes; the same steps over a float32 cache agree within fp8's error, and the layer's output over fp8
    equals SDPA's over the float32 cache into which the fp8 cache's values are copied."""
    if use_kernel and ops is None:
        pytest.skip("CPU kernels could not be built here")
    monkeypatch.setattr("pdserve.model.attention.cpu_ops_for", lambda x: ops if use_kernel else None)
    bs, hkv, h, d = 4, 2, 6, 16
    blocks = [[7, 1, 12, 3, 14], [4, 9], [5, 6, 2]]
    first = [(0, 11, blocks[0]), (0, 5, blocks[1]), (0, 6, blocks[2])]  # prompts of odd lengths
    step = [(11, 6, blocks[0]), (5, 1, blocks[1]), (6, 1, blocks[2])]  # a chunk on a context, two decodes
    outs = {}
    for dtype in (FP8, torch.float32):
        g = torch.Generator().manual_seed(3)
        cache = torch.zeros(2, 16, bs, hkv, d, dtype=dtype)
        n = sum(c[1] for c in first)
        spread = (1.0, 1.0, 4.0)  # q and k: logits of a few units; v: values of several
        paged_attention(*(torch.randn(n, m, d, generator=g) * x for m, x in zip((h, hkv, hkv), spread)), cache,
                        build_metadata(first, bs), 0.25, window)
        q, k, v = (torch.randn(8, m, d, generator=g) * x for m, x in zip((h, hkv, hkv), spread))
        outs[dtype] = paged_attention(q, k, v, cache, build_metadata(step, bs), 0.25, window)
        if dtype == FP8:
            monkeypatch.setattr("pdserve.model.attention.cpu_ops_for", lambda x: None)  # SDPA, float32 cache
            same_values = cache.float()
            outs["rounded"] = paged_attention(q, _fp8(k).float(), _fp8(v).float(), same_values,
                                              build_metadata(step, bs), 0.25, window)
            monkeypatch.setattr("pdserve.model.attention.cpu_ops_for", lambda x: ops if use_kernel else None)
    assert _relative_error(outs[FP8], outs[torch.float32]) < 0.06
    torch.testing.assert_close(outs[FP8], outs["rounded"], atol=1e-5, rtol=1e-5)


# -- the setting --------------------------------------------------------------------------------------------
def test_kv_cache_dtype_setting_names_what_is_supported():
    assert CacheConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match=r"must be one of \('auto', 'fp8'\).*int8 needs per-token scales"):
        CacheConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match=r"one of \('auto', 'fp8'\), got 'bf16'"):
        CacheConfig(kv_cache_dtype="bf16")
