"""``layers.linear`` over weights packed for oneDNN: the same rows as ``F.linear`` for every batch size,
including the small ones it pads (``MIN_GEMM_ROWS``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.model import layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_packed_linear_matches_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 32, generator=g).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    if not layers.can_pack_linear_weight(weight):
        pytest.skip("no oneDNN GEMM for this dtype here")
    packed = layers.pack_linear_weight(weight)
    x = torch.randn(rows, 32, generator=g).to(dtype)
    out = layers.linear(x, packed, bias)
    assert out.shape == (rows, 48)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float(), bias.float()), atol=tol, rtol=tol)
