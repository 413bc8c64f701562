"""Offline throughput of pdserve's engine vs Hugging Face transformers ``generate``, in the same run.

Workload (issue 2): N requests of random 256-token prompts, 128 output tokens each (ignore_eos), on the
default model, in pdserve's dtype (``auto``: bfloat16 on a CPU with bfloat16 arithmetic, else float32;
transformers runs in the same one). Prints output tokens/s of both and their ratio, the arithmetic rate
pdserve achieves as a fraction of this machine's measured matmul peak in that dtype, single-request decode
speed as a fraction of the memory-bandwidth limit, and resident memory against weights + KV budget.

    .venv/bin/python benchmarks/offline_throughput.py [--num-requests 64] [--dtype auto|float32|bfloat16]
        [--skip-hf] [--repeats 1] [--quantization auto,none] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import psutil
import torch

from pdserve import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each system (median reported)")
    ap.add_argument("--skip-hf", action="store_true", help="do not run the transformers baseline")
    ap.add_argument("--hf-batch", type=int, default=64, help="transformers generate batch size")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="pdserve's dtype; transformers runs in the dtype pdserve resolved")
    ap.add_argument("--quantization", default="auto,none",
                    help="pdserve's weight modes, comma-separated, each run in turn (ratios: first / others)")
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args()
    results: dict = {"num_requests": args.num_requests, "input_len": args.input_len,
                     "output_len": args.output_len}

    rng = random.Random(0)
    prompts = [[rng.randint(1000, 48000) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    num_out = args.num_requests * args.output_len
    proc = psutil.Process(os.getpid())

    dtype = None
    for quantization in args.quantization.split(","):
        run = run_pdserve(args, prompts, quantization, proc)
        dtype = run.pop("torch_dtype")
        results[f"pdserve_{quantization}"] = run
    first, *others = args.quantization.split(",")
    for other in others:
        a, b = results[f"pdserve_{first}"], results[f"pdserve_{other}"]
        print(f"ratio pdserve --quantization {first} / {other}: output tokens/s "
              f"{a['pdserve_output_tps'] / b['pdserve_output_tps']:.2f}x, single-request decode "
              f"{a['single_decode_tps'] / b['single_decode_tps']:.2f}x, memory at rest "
              f"{a['rss_at_rest_bytes'] / b['rss_at_rest_bytes']:.2f}x")
    results.update(results[f"pdserve_{first}"])  # the first mode's figures at the top level, as before
    num_out = args.num_requests * args.output_len
    pd_tps = results["pdserve_output_tps"]
    dtype_name = str(dtype).removeprefix("torch.")

    if not args.skip_hf:
        hf_s = run_transformers(args, prompts, dtype)
        hf_tps = num_out / hf_s
        print(f"transformers generate (batch {args.hf_batch}, {dtype_name}): {hf_s:.1f} s, {hf_tps:.0f} output "
              f"tokens/s")
        print(f"ratio pdserve / transformers: {pd_tps / hf_tps:.2f}x")
        results.update(transformers_s=hf_s, transformers_output_tps=hf_tps, ratio_vs_transformers=pd_tps / hf_tps)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def run_pdserve(args: argparse.Namespace, prompts: list[list[int]], quantization: str,
                proc: psutil.Process) -> dict:
    """Load pdserve's engine with ``--quantization quantization``, time the workload (median of
    ``--repeats``) and a single request's decode; returns the figures."""
    results: dict = {"quantization": quantization}
    num_out = args.num_requests * args.output_len
    rss0 = proc.memory_info().rss
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
              max_num_batched_tokens=args.max_num_batched_tokens, quantization=quantization)
    engine = llm.engine
    arch = engine.arch
    dtype = engine.dtype
    peak_gflops = matmul_peak_gflops(dtype)
    copy_gbs = copy_bandwidth_gbs()
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{dtype_name} matmul peak {peak_gflops:.1f} GFLOP/s, copy bandwidth {copy_gbs:.1f} GB/s")
    results.update(dtype=dtype_name)
    model = engine.model
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                       if t is not model.rope.cos)  # the quantized weights are buffers
    head = engine.model._packed_tied_head
    head_bytes = 0 if head is None else head.numel() * head.element_size()
    kv_bytes = engine.kv_cache.numel() * engine.kv_cache.element_size()
    rss_rest = proc.memory_info().rss - rss0
    print(f"== pdserve --quantization {quantization} (weights {model.weight_formats()})")
    print(f"model: {arch.architecture}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
          f"weights {weight_bytes / 2**20:.0f} MiB, KV cache {kv_bytes / 2**20:.0f} MiB "
          f"({engine.max_num_kv_tokens} tokens)")
    print(f"memory at rest: {rss_rest / 2**20:.0f} MiB resident after loading = weights + KV budget "
          f"{(weight_bytes + kv_bytes) / 2**20:.0f} MiB + {(rss_rest - weight_bytes - kv_bytes) / 2**20:.0f} MiB "
          f"overhead (of which {head_bytes / 2**20:.0f} MiB the tied LM head's packed copy; RoPE tables, "
          f"allocator, the dequantization's leftovers)")

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:32]}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    times = []
    for _ in range(args.repeats):
        engine.kv.pool.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        times.append(time.perf_counter() - t)
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    pd_s = statistics.median(times)
    pd_tps = num_out / pd_s
    flops = _workload_flops(arch, args.num_requests, args.input_len, args.output_len)
    results.update(pdserve_s=pd_s, pdserve_runs_s=times, pdserve_output_tps=pd_tps,
                   pdserve_requests_per_s=args.num_requests / pd_s, matmul_peak_gflops=peak_gflops,
                   pdserve_gflops=flops / pd_s / 1e9, copy_bandwidth_gbs=copy_gbs,
                   rss_at_rest_bytes=rss_rest, weight_bytes=weight_bytes, kv_bytes=kv_bytes)
    print(f"pdserve: {pd_s:.1f} s, {args.num_requests / pd_s:.2f} requests/s, {pd_tps:.0f} output tokens/s, "
          f"{(args.num_requests * (args.input_len + args.output_len)) / pd_s:.0f} total tokens/s; "
          f"{flops / pd_s / 1e9:.1f} GFLOP/s = {flops / pd_s / 1e9 / peak_gflops:.0%} of matmul peak")

    # Single-request decode against the memory-bandwidth limit (weights read once per token).
    single = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[1][:16]}], SamplingParams(temperature=0, max_tokens=1))
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompts[1][:16]}], SamplingParams(temperature=0, max_tokens=1))
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompts[1][:16]}], single)
    decode_s = (time.perf_counter() - t - prefill_s) / 128
    limit_tps = copy_gbs * 1e9 / weight_bytes
    print(f"single-request decode: {1 / decode_s:.1f} tokens/s; bandwidth limit {limit_tps:.1f} tokens/s "
          f"({weight_bytes / 2**20:.0f} MiB of weights per token at {copy_gbs:.1f} GB/s) = "
          f"{(1 / decode_s) / limit_tps:.0%} of the limit")
    results.update(single_decode_tps=1 / decode_s, bandwidth_limit_tps=limit_tps)
    del llm, engine, model
    results["torch_dtype"] = dtype
    return results


def run_transformers(args: argparse.Namespace, prompts: list[list[int]], dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    from pdserve.model.registry import resolve_model_path

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return time_generate(model, prompts, args.hf_batch, args.output_len)[0]


def time_generate(model, prompts: list[list[int]], batch_size: int, output_len: int
                  ) -> tuple[float, list[list[int]]]:
    """transformers ``generate`` (greedy, exactly ``output_len`` tokens) over equal-length token-id prompts
    in batches of ``batch_size``, after a warm-up: (seconds, each prompt's output tokens)."""
    ids = torch.tensor(prompts, dtype=torch.long)
    input_len, tokens = ids.shape[1], []
    with torch.inference_mode():
        model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        t = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            batch = ids[start:start + batch_size]
            out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
            assert out.shape[1] == input_len + output_len
            tokens += out[:, input_len:].tolist()
        return time.perf_counter() - t, tokens


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def copy_bandwidth_gbs(num_bytes: int = 512 * 2**20, reps: int = 5) -> float:
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * num_bytes / best / 1e9  # read + write


def _workload_flops(arch, num_requests: int, input_len: int, output_len: int) -> float:
    """Multiply-adds x2 of the linear layers for every token, the LM head for sampled tokens only, and
    attention scores and values over each token's context."""
    h, layers = arch.hidden_size, arch.num_layers
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    linear = layers * (h * (q + 2 * kv) + q * h + 3 * h * arch.intermediate_size)
    tokens = num_requests * (input_len + output_len)
    attn_ctx = num_requests * sum(range(1, input_len + output_len + 1))  # sum of context lengths
    return 2 * linear * tokens + 2 * h * arch.vocab_size * num_requests * output_len + 4 * q * layers * attn_ctx


if __name__ == "__main__":
    main()
