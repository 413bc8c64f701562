"""Paged attention against plain causal attention on contiguous tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.model.attention import build_metadata, paged_attention

H, HKV, D, BS = 4, 2, 8, 4


def _reference(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, enable_gqa=True)
    return out[0].transpose(0, 1)


def _seq(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H, D, generator=g), torch.randn(n, HKV, D, generator=g),
            torch.randn(n, HKV, D, generator=g))


def test_prefill_chunks_and_decodes_in_one_batch_match_contiguous_attention():
    cache = torch.zeros(2, 16, BS, HKV, D)
    qa, ka, va = _seq(7, 0)  # request a: blocks 3, 5
    qb, kb, vb = _seq(5, 1)  # request b: blocks 9, 2
    scale = D ** -0.5
    # Step 1: b's first 4 tokens and a's first 3, both fresh prefills.
    meta = build_metadata([(0, 4, [9]), (0, 3, [3])], BS)
    out = paged_attention(torch.cat([qb[:4], qa[:3]]), torch.cat([kb[:4], ka[:3]]), torch.cat([vb[:4], va[:3]]),
                          cache, meta, scale)
    torch.testing.assert_close(out[:4], _reference(qb, kb, vb)[:4])
    torch.testing.assert_close(out[4:], _reference(qa, ka, va)[:3])
    # Step 2: a's remaining 4 tokens as a chunk over cached context, and b's 5th token as a decode.
    meta = build_metadata([(3, 4, [3, 5]), (4, 1, [9, 2])], BS)
    assert meta.num_prefill_tokens == 4 and meta.num_decodes == 1
    out = paged_attention(torch.cat([qa[3:], qb[4:]]), torch.cat([ka[3:], kb[4:]]), torch.cat([va[3:], vb[4:]]),
                          cache, meta, scale)
    torch.testing.assert_close(out[:4], _reference(qa, ka, va)[3:])
    torch.testing.assert_close(out[4:], _reference(qb, kb, vb)[4:])
    # The cache holds each token's K at its slot.
    torch.testing.assert_close(cache[0, 5, 2], ka[6])
    torch.testing.assert_close(cache[1, 2, 0], vb[4])


def test_decodes_of_different_lengths_are_masked():
    cache = torch.zeros(2, 8, BS, HKV, D)
    q1, k1, v1 = _seq(2, 2)
    q2, k2, v2 = _seq(6, 3)
    scale = D ** -0.5
    paged_attention(torch.cat([q2[:5], q1[:1]]), torch.cat([k2[:5], k1[:1]]), torch.cat([v2[:5], v1[:1]]),
                    cache, build_metadata([(0, 5, [1, 4]), (0, 1, [6])], BS), scale)
    meta = build_metadata([(5, 1, [1, 4]), (1, 1, [6])], BS)
    out = paged_attention(torch.cat([q2[5:], q1[1:]]), torch.cat([k2[5:], k1[1:]]), torch.cat([v2[5:], v1[1:]]),
                          cache, meta, scale)
    torch.testing.assert_close(out[0:1], _reference(q2, k2, v2)[5:])
    torch.testing.assert_close(out[1:2], _reference(q1, k1, v1)[1:])
