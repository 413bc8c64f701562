"""Paged attention over the block KV cache, in plain PyTorch (any device PyTorch drives).

KV cache layout, one tensor per layer: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``; index 0
holds keys, 1 values. A block's keys (and values) for one layer are contiguous, which is what KV transfer
and offload move. A *slot* is one token position: ``block_id * block_size + offset``.

A batch is laid out prefill chunks first (each a run of tokens of one request), then decodes (one token
each). Prefill chunks are attended one by one with a causal mask offset by the chunk's start; decodes are
attended all at once over their gathered, padded contexts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    token_start: int  # first row of this chunk in the batch's token dimension
    num_tokens: int
    context_start: int  # tokens of this request already in the cache before the chunk
    context_slots: torch.Tensor | None  # (context_start + num_tokens,) slots; None when context_start == 0


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to. Built by ``build_metadata``."""

    slot_mapping: torch.Tensor  # (num_tokens,) int64
    prefills: list[PrefillChunk]
    num_prefill_tokens: int
    decode_slots: torch.Tensor | None  # (num_decodes, max_context) int64, padded with slot 0
    decode_mask: torch.Tensor | None  # (num_decodes, 1, 1, max_context) bool, True = attend

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_slots is None else self.decode_slots.shape[0]


def build_metadata(chunks: list[tuple[int, int, list[int]]], block_size: int,
                   device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for a batch of ``(start, num_tokens, block_ids)`` chunks.

    Chunks with more than one token must come before single-token (decode) chunks; ``block_ids`` must
    cover positions ``[0, start + num_tokens)``. Everything is built as host lists and copied once.
    """
    slot_mapping: list[int] = []
    prefills: list[PrefillChunk] = []
    decode_rows: list[list[int]] = []
    token_pos = 0
    for start, num_tokens, block_ids in chunks:
        end = start + num_tokens
        slots = _slots(block_ids, block_size, end)
        slot_mapping.extend(slots[start:end])
        if num_tokens > 1:
            assert not decode_rows, "prefill chunks must precede decodes"
            ctx = torch.tensor(slots, dtype=torch.long, device=device) if start > 0 else None
            prefills.append(PrefillChunk(token_pos, num_tokens, start, ctx))
        else:
            decode_rows.append(slots)
        token_pos += num_tokens
    num_prefill_tokens = sum(p.num_tokens for p in prefills)
    decode_slots = decode_mask = None
    if decode_rows:
        max_len = max(len(r) for r in decode_rows)
        padded = [r + [0] * (max_len - len(r)) for r in decode_rows]
        lens = torch.tensor([len(r) for r in decode_rows])
        decode_slots = torch.tensor(padded, dtype=torch.long).to(device)
        mask = torch.arange(max_len)[None, :] < lens[:, None]  # (num_decodes, max_context)
        decode_mask = mask[:, None, None, :].to(device)
    return AttentionMetadata(torch.tensor(slot_mapping, dtype=torch.long).to(device), prefills,
                             num_prefill_tokens, decode_slots, decode_mask)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend.

    q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim);
    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim). Returns (num_tokens, num_heads, head_dim).
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)  # (num_slots, num_kv_heads, head_dim)
    v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, meta.slot_mapping, k.to(kv_cache.dtype))
    v_flat.index_copy_(0, meta.slot_mapping, v.to(kv_cache.dtype))

    out = torch.empty_like(q)
    for p in meta.prefills:
        rows = slice(p.token_start, p.token_start + p.num_tokens)
        qi = q[rows].transpose(0, 1).unsqueeze(0)  # (1, num_heads, num_tokens, head_dim)
        if p.context_slots is None:
            ki = k[rows].transpose(0, 1).unsqueeze(0)  # (1, num_kv_heads, num_tokens, head_dim)
            vi = v[rows].transpose(0, 1).unsqueeze(0)
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ki = k_flat[p.context_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)  # (1, kv, ctx, hd)
            vi = v_flat[p.context_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
            ctx_len = p.context_start + p.num_tokens
            mask = torch.ones(p.num_tokens, ctx_len, dtype=torch.bool, device=q.device).tril(p.context_start)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = oi.squeeze(0).transpose(0, 1)
    if meta.decode_slots is not None:
        rows = slice(meta.num_prefill_tokens, meta.num_prefill_tokens + meta.num_decodes)
        qd = q[rows].unsqueeze(2)  # (num_decodes, num_heads, 1, head_dim)
        kd = k_flat[meta.decode_slots].to(q.dtype).transpose(1, 2)  # (num_decodes, kv, max_ctx, hd)
        vd = v_flat[meta.decode_slots].to(q.dtype).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                            enable_gqa=True)
        out[rows] = od.squeeze(2)
    return out


def _slots(block_ids: list[int], block_size: int, num_tokens: int) -> list[int]:
    slots = []
    for block_id in block_ids[: -(-num_tokens // block_size)]:
        base = block_id * block_size
        slots.extend(range(base, base + block_size))
    return slots[:num_tokens]
