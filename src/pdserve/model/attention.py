"""Paged attention over the block KV cache, in plain PyTorch (any device PyTorch drives).

KV cache layout, one tensor per layer: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``; index 0
holds keys, 1 values. A block's keys (and values) for one layer are contiguous, which is what KV transfer
and offload move. A *slot* is one token position: ``block_id * block_size + offset``.

A batch is laid out prefill chunks first (each a run of tokens of one request), then decodes (one token
each). On CPU, C++ kernels (``pdserve.kernels``) attend all prefill chunks in one call and all decodes in
another, reading K/V blocks where they lie in the cache. Elsewhere (or with the kernels off), prefill
chunks are attended one by one by SDPA with a causal mask offset by the chunk's start, and decodes all at
once by SDPA over their gathered, padded contexts.

The cache may be in a narrower dtype than the model's: float8_e4m3fn (``--kv-cache-dtype fp8``) holds K/V
as they are, saturated to +-448 (no scales), and is read back in the model's dtype (SDPA) or float32 (the
kernels). A step's own K/V are written rounded, so a prefill chunk's later decodes see what it saw; the SDPA
path's first chunk of a prompt attends to its unrounded K/V, as vLLM does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.kernels import cpu_ops_for

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value: K/V beyond it are saturated (vLLM's cast)


@dataclass
class PrefillChunk:
    token_start: int  # first row of this chunk in the batch's token dimension
    num_tokens: int
    context_start: int  # tokens of this request already in the cache before the chunk


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to. Built by ``build_metadata``."""

    slot_mapping: torch.Tensor  # (num_tokens,) int64
    prefills: list[PrefillChunk]
    num_prefill_tokens: int
    decode_block_tables: torch.Tensor | None  # (num_decodes, max_blocks) int64, padded with block 0
    decode_context_lens: torch.Tensor | None  # (num_decodes,) int64, tokens each decode attends to
    # The prefill chunks again, as tensors (None when there are none):
    prefill_block_tables: torch.Tensor | None = None  # (num_prefills, max_blocks) int64, padded with block 0
    prefill_query_starts: torch.Tensor | None = None  # (num_prefills + 1,) int64, first row of each, then the end
    prefill_context_starts: torch.Tensor | None = None  # (num_prefills,) int64, each chunk's first position

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_block_tables is None else self.decode_block_tables.shape[0]


def build_metadata(chunks: list[tuple[int, int, list[int]]], block_size: int,
                   device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for a batch of ``(start, num_tokens, block_ids)`` chunks.

    Chunks with more than one token must come before single-token (decode) chunks; ``block_ids`` must
    cover positions ``[0, start + num_tokens)``. Everything is built as host lists and copied once.
    """
    slot_mapping: list[int] = []
    prefills: list[PrefillChunk] = []
    prefill_tables: list[list[int]] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    token_pos = 0
    for start, num_tokens, block_ids in chunks:
        end = start + num_tokens
        for pos in range(start, end):
            slot_mapping.append(block_ids[pos // block_size] * block_size + pos % block_size)
        used = block_ids[: -(-end // block_size)]
        if num_tokens > 1:
            assert not decode_tables, "prefill chunks must precede decodes"
            prefills.append(PrefillChunk(token_pos, num_tokens, start))
            prefill_tables.append(used)
        else:
            decode_tables.append(used)
            decode_lens.append(end)
        token_pos += num_tokens
    num_prefill_tokens = sum(p.num_tokens for p in prefills)
    tables = lens = None
    if decode_tables:
        tables = _padded(decode_tables).to(device)
        lens = torch.tensor(decode_lens, dtype=torch.long).to(device)
    prefill_kernel_args: tuple[torch.Tensor | None, ...] = (None, None, None)
    if prefills:
        prefill_kernel_args = (
            _padded(prefill_tables).to(device),
            torch.tensor([p.token_start for p in prefills] + [num_prefill_tokens], dtype=torch.long).to(device),
            torch.tensor([p.context_start for p in prefills], dtype=torch.long).to(device))
    return AttentionMetadata(torch.tensor(slot_mapping, dtype=torch.long).to(device), prefills,
                             num_prefill_tokens, tables, lens, *prefill_kernel_args)


def _padded(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one (len(tables), longest) int64 tensor, padded with block 0 (never read)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int | None = None) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend (to the ``window`` latest tokens only, itself
    included, when a sliding window is given).

    q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim);
    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim). Returns (num_tokens, num_heads, head_dim).
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]  # each (num_blocks, block_size, num_kv_heads, head_dim)
    write_slots(k_cache, meta.slot_mapping, k)
    write_slots(v_cache, meta.slot_mapping, v)

    if cpu_ops_for(q) is not None:
        return cached_attention(q, kv_cache, meta, scale, window)
    out = torch.empty_like(q)
    for i, p in enumerate(meta.prefills):
        rows = slice(p.token_start, p.token_start + p.num_tokens)
        qi = q[rows].transpose(0, 1).unsqueeze(0)  # (1, num_heads, num_tokens, head_dim)
        if p.context_start == 0 and (window is None or p.num_tokens <= window):
            ki = k[rows].transpose(0, 1).unsqueeze(0)  # (1, num_kv_heads, num_tokens, head_dim)
            vi = v[rows].transpose(0, 1).unsqueeze(0)
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ctx_len = p.context_start + p.num_tokens
            if p.context_start == 0:
                ki, vi = k[rows], v[rows]
            else:
                blocks = meta.prefill_block_tables[i, :-(-ctx_len // block_size)]  # covering the context
                ki = _gather(k_cache, blocks, q.dtype)[:ctx_len]  # (ctx, num_kv_heads, head_dim)
                vi = _gather(v_cache, blocks, q.dtype)[:ctx_len]
            mask = torch.ones(p.num_tokens, ctx_len, dtype=torch.bool, device=q.device).tril(p.context_start)
            if window is not None:  # query i (at position context_start + i) sees keys j > position - window
                mask &= ~mask.tril(p.context_start - window)
            oi = F.scaled_dot_product_attention(qi, ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0),
                                                attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = oi.squeeze(0).transpose(0, 1)
    if meta.decode_block_tables is not None:
        num_decodes, max_blocks = meta.decode_block_tables.shape
        rows = slice(meta.num_prefill_tokens, meta.num_prefill_tokens + num_decodes)
        qd = q[rows].unsqueeze(2)  # (num_decodes, num_heads, 1, head_dim)
        kd = _gather(k_cache, meta.decode_block_tables.view(-1), q.dtype).view(
            num_decodes, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)  # (B, kv, ctx, hd)
        vd = _gather(v_cache, meta.decode_block_tables.view(-1), q.dtype).view(
            num_decodes, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
        positions = torch.arange(max_blocks * block_size, device=q.device)
        lens = meta.decode_context_lens[:, None, None, None]
        mask = positions < lens  # (num_decodes, 1, 1, max_ctx), True = attend
        if window is not None:
            mask &= positions >= lens - window  # the earliest position each decode sees
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = od.squeeze(2)
    return out


def cached_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """Attention by the CPU kernels once this step's K/V are in the cache: all prefill chunks in one call,
    all decodes in another, each reading its blocks in place. q: (num_tokens, num_heads, head_dim) on the CPU;
    ``pdserve.kernels.cpu_ops()`` must be available."""
    ops = cpu_ops_for(q)
    assert ops is not None, "cached_attention needs the CPU kernels"
    if not q.is_contiguous():
        q = q.contiguous()
    out = torch.empty_like(q)
    if not meta.prefills:  # decodes only: no row slices
        ops.paged_decode_attention(out, q, kv_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
                                   window or 0)
        return out
    if meta.prefills:
        rows = slice(0, meta.num_prefill_tokens)
        ops.paged_prefill_attention(out[rows], q[rows], kv_cache, meta.prefill_block_tables,
                                    meta.prefill_query_starts, meta.prefill_context_starts, scale, window or 0)
    if meta.decode_block_tables is not None:
        rows = slice(meta.num_prefill_tokens, meta.num_prefill_tokens + meta.num_decodes)
        ops.paged_decode_attention(out[rows], q[rows], kv_cache, meta.decode_block_tables,
                                   meta.decode_context_lens, scale, window or 0)
    return out


def write_slots(cache: torch.Tensor, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
    """x (num_tokens, num_kv_heads, head_dim) into one half (keys or values) of a layer's cache,
    (num_blocks, block_size, num_kv_heads, head_dim), at the tokens' slots, in the cache's dtype."""
    rows = cache.view(-1, *cache.shape[2:])  # (num_slots, num_kv_heads, head_dim)
    if cache.dtype == torch.float8_e4m3fn:  # saturated, then rounded; index_copy_ has no float8 kernel: bytes
        x8 = x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        rows.view(torch.uint8).index_copy_(0, slot_mapping, x8.view(torch.uint8))
    else:
        rows.index_copy_(0, slot_mapping, x.to(cache.dtype))


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks, copied block by block: (len(block_ids) * block_size, num_kv_heads, head_dim)."""
    blocks = cache.index_select(0, block_ids)  # (n, block_size, num_kv_heads, head_dim)
    return blocks.view(-1, *cache.shape[2:]).to(dtype)
