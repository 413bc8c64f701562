"""The C++ decode-attention kernel (pdserve.kernels) against SDPA over gathered, masked contexts, and the
paged-attention layer with the kernel on and off."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve import kernels
from pdserve.model.attention import build_metadata, paged_attention

ops = kernels.cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")


def _reference(q, kv_cache, tables, lens, scale, window=0):
    num_seqs, max_blocks = tables.shape
    _, _, bs, hkv, d = kv_cache.shape
    k = kv_cache[0].index_select(0, tables.view(-1)).view(num_seqs, max_blocks * bs, hkv, d).transpose(1, 2)
    v = kv_cache[1].index_select(0, tables.view(-1)).view(num_seqs, max_blocks * bs, hkv, d).transpose(1, 2)
    pos = torch.arange(max_blocks * bs)[None, :]
    mask = pos < lens[:, None]
    if window:
        mask &= pos >= lens[:, None] - window
    mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float(), v.float(), attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 8, 128), (4, 1, 32), (6, 2, 80)])
def test_decode_kernel_matches_sdpa(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * 1000 + head_dim)
    bs, num_blocks = 16, 128
    lens = torch.tensor([1, 15, 16, 17, 100, 250])  # partial, exact and multi-block contexts
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    kv_cache = torch.randn(2, num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, kv_cache, tables, lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), _reference(q, kv_cache, tables, lens, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 5, 16, 33, 1000])
def test_decode_kernel_sliding_window(dtype, window):
    g = torch.Generator().manual_seed(window)
    bs, num_blocks, heads, kv_heads, head_dim = 16, 64, 8, 2, 64
    lens = torch.tensor([1, 7, 16, 17, 50, 100])
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    kv_cache = torch.randn(2, num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, kv_cache, tables, lens, 0.125, window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), _reference(q, kv_cache, tables, lens, 0.125, window), atol=tol, rtol=tol)


def test_decode_kernel_ignores_padding_blocks_and_reads_only_the_context():
    """Tokens past a sequence's length, and table entries past its blocks, never reach the result."""
    g = torch.Generator().manual_seed(0)
    kv_cache = torch.randn(2, 8, 4, 2, 16, generator=g)
    q = torch.randn(1, 4, 16, generator=g)
    tables, lens = torch.tensor([[5, 2, 0]]), torch.tensor([6])
    out1, out2 = torch.empty_like(q), torch.empty_like(q)
    ops.paged_decode_attention(out1, q, kv_cache, tables, lens, 0.25)
    kv_cache[:, 2, 2:] = 1e4  # block 2 past position 6, and the padding block 0
    kv_cache[:, 0] = 1e4
    ops.paged_decode_attention(out2, q, kv_cache, tables, lens, 0.25)
    torch.testing.assert_close(out1, out2)


def test_decode_kernel_rejects_bad_inputs():
    q = torch.randn(2, 4, 16)
    kv_cache = torch.randn(2, 8, 4, 2, 16)
    tables, lens = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.paged_decode_attention(torch.empty_like(q), q.transpose(0, 1).contiguous().transpose(0, 1),
                                   kv_cache, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_decode_attention(torch.empty_like(q), q, kv_cache, tables.int(), lens, 1.0)
    with pytest.raises(RuntimeError, match="multiple"):
        ops.paged_decode_attention(torch.empty(2, 3, 16), torch.randn(2, 3, 16), kv_cache, tables, lens, 1.0)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("window", [None, 2, 5])
def test_paged_attention_decode_same_with_and_without_kernel(monkeypatch, use_kernel, window):
    """The layer's decode path gives the same result through the kernel and through the SDPA fallback."""
    monkeypatch.setattr("pdserve.model.attention.cpu_ops_for", lambda x: ops if use_kernel else None)
    g = torch.Generator().manual_seed(1)
    bs, hkv, h, d = 4, 2, 6, 16
    cache = torch.zeros(2, 16, bs, hkv, d)
    lens = [9, 3]
    blocks = [[7, 1, 12], [4]]
    for n, b in zip(lens, blocks):  # fill each context as a prefill
        paged_attention(torch.randn(n - 1, h, d, generator=g), torch.randn(n - 1, hkv, d, generator=g),
                        torch.randn(n - 1, hkv, d, generator=g), cache, build_metadata([(0, n - 1, b)], bs), 0.25)
    q, k, v = torch.randn(2, h, d, generator=g), torch.randn(2, hkv, d, generator=g), torch.randn(2, hkv, d, generator=g)
    meta = build_metadata([(lens[0] - 1, 1, blocks[0]), (lens[1] - 1, 1, blocks[1])], bs)
    out = paged_attention(q, k, v, cache, meta, 0.25, window)
    tables = torch.tensor([[7, 1, 12], [4, 0, 0]])
    torch.testing.assert_close(out, _reference(q, cache, tables, torch.tensor(lens), 0.25, window or 0))


def _hf_rms_norm(x, weight, eps):
    """Hugging Face's LlamaRMSNorm: float32 statistics, cast back, then the weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_kernels_match_hugging_face(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 576, generator=g).to(dtype)
    residual = torch.randn(37, 576, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(576, generator=g)).to(dtype)
    # float32: to rounding; narrower dtypes: one ulp at most (the sum of squares is accumulated in
    # another order, which may move a value across a rounding boundary).
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-3, rtol=8e-3)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, weight, 1e-5)
    torch.testing.assert_close(out, _hf_rms_norm(x, weight, 1e-5), **tol)
    want_residual = x + residual
    want = _hf_rms_norm(want_residual, weight, 1e-5)
    x2, r2 = x.clone(), residual.clone()
    ops.fused_add_rms_norm(x2, r2, weight, 1e-5)
    torch.testing.assert_close(r2, want_residual, atol=0, rtol=0)
    torch.testing.assert_close(x2, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(dtype):
    g = torch.Generator().manual_seed(3)
    x = (4 * torch.randn(9, 2 * 1536, generator=g)).to(dtype)
    out = torch.empty(9, 1536, dtype=dtype)
    ops.silu_and_mul(out, x)
    gate, up = x.chunk(2, dim=-1)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1.6e-2)  # 1-2 ulps
    torch.testing.assert_close(out, F.silu(gate) * up, **tol)


def test_layer_kernels_reject_bad_inputs():
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.empty(2, 8), torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.rms_norm(torch.empty(2, 8), torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="half the last dimension"):
        ops.silu_and_mul(torch.empty(2, 8), torch.randn(2, 8))
