"""The quantized GEMM kernel (cpu_quant_gemm.cpp) against the packed bfloat16 GEMM (oneDNN) at the default
model's shapes: one layer's four projections (576 -> 960, 576 -> 576, 576 -> 3072, 1536 -> 576) and the LM
head (576 -> 49152), random Q4_1 weights (the head: Q8_0, as in the file), bfloat16 activations, for several
row counts; 15-bit and 8-bit activations. Each figure is the minimum of ``--timings`` timings (the least
disturbed by other work on a shared machine), all in the same process.

    .venv/bin/python benchmarks/quant_gemm.py [--rows 1,3,8,16,64,512,2048] [--timings 11]
"""
from __future__ import annotations

import argparse
import time

import gguf
import numpy as np
import torch
from gguf.quants import quantize

from pdserve.model.quant_weight import QuantizedWeight, blocks_from_gguf

LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out)
HEAD = (576, 49152)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,3,8,16,64,512,2048")
    ap.add_argument("--timings", type=int, default=11)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    weights = []
    for (k, n), qtype in [(s, "Q4_1") for s in LAYER] + [(HEAD, "Q8_0")]:
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        quant = QuantizedWeight.pack(blocks_from_gguf(quantize(w, gguf.GGMLQuantizationType[qtype]), qtype, k))
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.from_numpy(w).bfloat16(), 64)
        weights.append((k, quant, packed))
    print(f"{torch.get_num_threads()} threads; ms per call, minimum of {args.timings}")
    print("rows | layer: bf16 packed, quant 15-bit, quant 8-bit | LM head: bf16 packed, quant 15-bit, quant 8-bit")
    for rows in (int(r) for r in args.rows.split(",")):
        layer, head = np.zeros(3), np.zeros(3)
        for i, (k, quant, packed) in enumerate(weights):
            x = torch.randn(rows, k).bfloat16()
            xp = x if rows >= 3 else torch.cat([x, x.new_zeros(3 - rows, k)])  # as layers.linear pads
            t = [_min_ms(lambda: torch.ops.mkldnn._linear_pointwise(xp, packed, None, "none", [], ""), args.timings),
                 _min_ms(lambda: quant.linear(x, act_bits=16), args.timings),
                 _min_ms(lambda: quant.linear(x, act_bits=8), args.timings)]
            (head if i == len(LAYER) else layer)[:] += t
        print(f"{rows:5d} | {layer[0]:7.2f} {layer[1]:7.2f} ({layer[1] / layer[0]:.2f}x) {layer[2]:7.2f} "
              f"({layer[2] / layer[0]:.2f}x) | {head[0]:7.2f} {head[1]:7.2f} ({head[1] / head[0]:.2f}x) {head[2]:7.2f} "
              f"({head[2] / head[0]:.2f}x)", flush=True)


def _min_ms(fn, timings: int) -> float:
    fn()
    best = float("inf")
    for _ in range(timings):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


if __name__ == "__main__":
    main()
