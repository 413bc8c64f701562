"""The C++ attention kernels (pdserve.kernels, decode and prefill) against SDPA over gathered, masked
contexts, the paged-attention layer with the kernels on and off, and the fused element-wise layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve import kernels
from pdserve.model.attention import build_metadata, paged_attention
from pdserve.model.layers import RotaryEmbedding

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
@pytest.mark.parametrize("bs", [16, 4])
def test_decode_kernel_sliding_window_and_block_sizes(dtype, window, bs):
    g = torch.Generator().manual_seed(window)
    num_blocks, heads, kv_heads, head_dim = 1024 // bs, 8, 2, 64
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


def _prefill_reference(q, kv_cache, tables, query_starts, context_starts, scale, window=0):
    """Each chunk by SDPA over its gathered context, with the causal (and window) mask as a tensor."""
    _, _, bs, hkv, d = kv_cache.shape
    outs = []
    for c in range(len(context_starts)):
        rows = slice(int(query_starts[c]), int(query_starts[c + 1]))
        start, n = int(context_starts[c]), int(query_starts[c + 1] - query_starts[c])
        k = kv_cache[0].index_select(0, tables[c]).reshape(-1, hkv, d)[: start + n].transpose(0, 1)
        v = kv_cache[1].index_select(0, tables[c]).reshape(-1, hkv, d)[: start + n].transpose(0, 1)
        qpos, kpos = torch.arange(start, start + n)[:, None], torch.arange(start + n)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= kpos > qpos - window
        out = F.scaled_dot_product_attention(q[rows].float().transpose(0, 1), k.float(), v.float(), attn_mask=mask,
                                             scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def _prefill_case(g, chunks, bs, heads, kv_heads, head_dim, dtype, num_blocks=256):
    """Random cache and queries for chunks of (context_start, num_tokens) on distinct random blocks."""
    max_blocks = max(-(-(s + n) // bs) for s, n in chunks)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.stack([perm[i * max_blocks:(i + 1) * max_blocks] for i in range(len(chunks))])
    kv_cache = torch.randn(2, num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    query_starts = torch.tensor([0] + [n for _, n in chunks]).cumsum(0)
    q = torch.randn(int(query_starts[-1]), heads, head_dim, generator=g).to(dtype)
    return q, kv_cache, tables, query_starts, torch.tensor([s for s, _ in chunks])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 8, 128), (4, 1, 32), (6, 2, 80)])
def test_prefill_kernel_matches_sdpa(dtype, heads, kv_heads, head_dim):
    """Chunks with and without a cached context, of lengths around the 16-token tiles and blocks."""
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    chunks = [(0, 2), (0, 16), (0, 37), (16, 16), (5, 23), (100, 1), (40, 130)]
    q, kv_cache, tables, qs, cs = _prefill_case(g, chunks, 16, heads, kv_heads, head_dim, dtype)
    scale = head_dim ** -0.5
    out = torch.empty_like(q)
    ops.paged_prefill_attention(out, q, kv_cache, tables, qs, cs, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), _prefill_reference(q, kv_cache, tables, qs, cs, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 5, 16, 33, 1000])
@pytest.mark.parametrize("block_size", [16, 4, 32])
def test_prefill_kernel_sliding_window_and_block_sizes(dtype, window, block_size):
    g = torch.Generator().manual_seed(window + block_size)
    chunks = [(0, 50), (7, 9), (60, 70)]
    q, kv_cache, tables, qs, cs = _prefill_case(g, chunks, block_size, 8, 2, 64, dtype)
    out = torch.empty_like(q)
    ops.paged_prefill_attention(out, q, kv_cache, tables, qs, cs, 0.125, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), _prefill_reference(q, kv_cache, tables, qs, cs, 0.125, window),
                               atol=tol, rtol=tol)


def test_prefill_kernel_reads_only_each_chunks_positions():
    """Keys past a chunk's last position, padding table entries and other chunks' blocks never count."""
    g = torch.Generator().manual_seed(3)
    q, kv_cache, tables, qs, cs = _prefill_case(g, [(3, 6), (0, 20)], 4, 4, 2, 16, torch.float32, num_blocks=16)
    out1, out2 = torch.empty_like(q), torch.empty_like(q)
    ops.paged_prefill_attention(out1, q, kv_cache, tables, qs, cs, 0.25)
    used = {int(b) for b in tables[0, :3]} | {int(b) for b in tables[1, :5]}
    for b in range(16):
        if b not in used:
            kv_cache[:, b] = 1e4
    kv_cache[:, int(tables[0, 2]), 1:] = 1e4  # chunk 0 ends at position 8: block 2, offset 0
    ops.paged_prefill_attention(out2, q, kv_cache, tables, qs, cs, 0.25)
    torch.testing.assert_close(out1, out2)


def test_prefill_kernel_rejects_bad_inputs():
    q = torch.randn(5, 4, 16)
    kv_cache = torch.randn(2, 8, 4, 2, 16)
    tables, qs, cs = torch.zeros(1, 2, dtype=torch.long), torch.tensor([0, 5]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="end at"):
        ops.paged_prefill_attention(torch.empty_like(q), q, kv_cache, tables, torch.tensor([0, 4]), cs, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_prefill_attention(torch.empty_like(q), q, kv_cache, tables.int(), qs, cs, 1.0)
    with pytest.raises(RuntimeError, match="multiple"):
        ops.paged_prefill_attention(torch.empty(5, 3, 16), torch.randn(5, 3, 16), kv_cache, tables, qs, cs, 1.0)


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_prefill_same_with_and_without_kernel(monkeypatch, window):
    """A batch of chunks (one on a cached prefix) then decodes: kernel and SDPA fallback agree."""
    g = torch.Generator().manual_seed(4)
    bs, hkv, h, d = 4, 2, 6, 16
    blocks = [[7, 1, 12, 3], [4, 9], [5, 6, 2]]
    chunks = [(0, 13, blocks[0]), (2, 5, blocks[1]), (0, 1, blocks[2])]  # the second continues a context
    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr("pdserve.model.attention.cpu_ops_for", lambda x: ops if use_kernel else None)
        cache = torch.zeros(2, 16, bs, hkv, d)
        gen = torch.Generator().manual_seed(5)
        paged_attention(torch.randn(2, h, d, generator=gen), torch.randn(2, hkv, d, generator=gen),
                        torch.randn(2, hkv, d, generator=gen), cache, build_metadata([(0, 2, blocks[1])], bs), 0.25)
        q, k, v = (torch.randn(19, n, d, generator=g) for n in (h, hkv, hkv))
        results.append(paged_attention(q, k, v, cache, build_metadata(chunks, bs), 0.25, window))
        g = torch.Generator().manual_seed(4)
    torch.testing.assert_close(results[0], results[1])


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
    torch.testing.assert_close(ops.silu_mul(x), out, atol=0, rtol=0)  # the allocating form


def test_qkv_rope_and_cache_equals_rope_and_cache_on_views():
    g = torch.Generator().manual_seed(4)
    T, H, Hkv, D, bs = 5, 9, 3, 64, 16
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).bfloat16()
    cos, sin = torch.randn(T, D // 2, generator=g).bfloat16(), torch.randn(T, D // 2, generator=g).bfloat16()
    slots = torch.tensor([3, 17, 40, 41, 5])
    cache_a, cache_b = torch.zeros(2, 4, bs, Hkv, D).bfloat16(), torch.zeros(2, 4, bs, Hkv, D).bfloat16()
    q_a = torch.empty(T, H, D).bfloat16()
    ops.rope_and_cache(q_a, qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), qkv[:, (H + Hkv) * D:].view(T, Hkv, D),
                       cos, sin, cache_a, slots)
    q_b = ops.qkv_rope_and_cache(qkv, cos, sin, cache_b, slots, H, Hkv)
    assert torch.equal(q_a, q_b) and torch.equal(cache_a, cache_b)
    with pytest.raises(RuntimeError, match="columns"):
        ops.qkv_rope_and_cache(qkv, cos, sin, cache_b, slots, H + 1, Hkv)


def test_layer_kernels_reject_bad_inputs():
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.empty(2, 8), torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.rms_norm(torch.empty(2, 8), torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="half the last dimension"):
        ops.silu_and_mul(torch.empty(2, 8), torch.randn(2, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_and_cache_matches_rotary_embedding_and_index_copy(dtype):
    """q rotated into q_out, rotated k and plain v at each token's slot, from a strided view of a QKV row
    as the model passes it; the rest of the cache untouched."""
    g = torch.Generator().manual_seed(6)
    T, H, Hkv, D, bs = 7, 6, 2, 32, 4
    rope = RotaryEmbedding(D, 64, 10000.0, None, dtype, "cpu")
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    qk, v = qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
    positions = torch.tensor([0, 1, 2, 9, 10, 33, 63])
    slots = torch.tensor([5, 6, 7, 12, 13, 0, 31])
    cos_sin = rope.lookup(positions)
    cache = torch.randn(2, 8, bs, Hkv, D, generator=g).to(dtype)
    expected_cache = cache.clone()
    rotated = RotaryEmbedding.apply(qk, cos_sin)
    expected_cache[0].view(-1, Hkv, D)[slots] = rotated[:, H:]
    expected_cache[1].view(-1, Hkv, D)[slots] = v
    q = torch.empty(T, H, D, dtype=dtype)
    ops.rope_and_cache(q, qk, v, *cos_sin, cache, slots)
    torch.testing.assert_close(q, rotated[:, :H], atol=1e-6, rtol=0) if dtype == torch.float32 else \
        torch.testing.assert_close(q, rotated[:, :H], atol=0, rtol=0)
    torch.testing.assert_close(cache, expected_cache, atol=1e-6 if dtype == torch.float32 else 0, rtol=0)


def test_rope_and_cache_rejects_bad_inputs():
    q, qk, v = torch.empty(2, 4, 8), torch.randn(2, 6, 8), torch.randn(2, 2, 8)
    cos = sin = torch.ones(2, 4)
    cache = torch.zeros(2, 2, 4, 2, 8)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.rope_and_cache(q, qk, v, cos, sin, cache, torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="int64"):
        ops.rope_and_cache(q, qk, v, cos, sin, cache, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="H \\+ Hkv"):
        ops.rope_and_cache(q, torch.randn(2, 5, 8), v, cos, sin, cache, torch.tensor([0, 1]))
