"""Prefill and decode throughput of pdserve's engine beside transformers on the same device, at the shapes
of a big model with random weights (default Llama-3.1-8B, bfloat16 on CUDA).

    .venv/bin/python benchmarks/gpu_throughput.py --model llama-3.1-8b --batches 1,16,64
    .venv/bin/python benchmarks/gpu_throughput.py --model smollm2-135m --device cpu --input-len 64 \
        --decode-steps 8 --batches 1,4          # a quick CPU run that checks the script itself

Prefill: B prompts of --input-len tokens, timed until every first token is sampled; tokens/s counts
prompt tokens. Decode: --decode-steps further steps of the same B requests; tokens/s counts generated
tokens. transformers: one forward pass over the (B, input_len) batch for prefill, then ``generate``'s extra
time per token for decode, with the same random-weight shape (LlamaForCausalLM from an equivalent config).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_size
from pdserve.engine.core import EngineCore
from pdserve.model.dummy import dummy_arch
from pdserve.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="16GiB")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    max_batch = max(batches)

    core = EngineCore(EngineConfig(
        model=ModelConfig(model=args.model, load_format="dummy", dtype=args.dtype, device=args.device,
                          max_model_len=args.input_len + args.decode_steps + 8),
        cache=CacheConfig(kv_cache_memory_bytes=parse_size(args.kv_cache_memory)),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_batch * args.input_len, max_num_seqs=max_batch)))
    print(f"{args.model} ({core.arch.num_params() / 1e9:.2f}B params) on {core.device}, {core.dtype}; "
          f"prompts of {args.input_len} tokens, {args.decode_steps} decode steps")
    rng = random.Random(0)
    rows = []
    for batch in batches:
        prefill_tps, decode_tps = run_pdserve(core, batch, args, rng)
        row = {"batch": batch, "pd_prefill": prefill_tps, "pd_decode": decode_tps}
        rows.append(row)
    del core
    if not args.skip_hf:
        model = build_transformers(args)
        for row in rows:
            row["hf_prefill"], row["hf_decode"] = run_transformers(model, row["batch"], args)
    print(f"{'batch':>5} {'prefill tok/s':>14} {'(hf)':>10} {'ratio':>6} {'decode tok/s':>13} {'(hf)':>10} {'ratio':>6}")
    for r in rows:
        hp, hd = r.get("hf_prefill"), r.get("hf_decode")
        print(f"{r['batch']:>5} {r['pd_prefill']:>14.0f} {hp or 0:>10.0f} {r['pd_prefill'] / hp if hp else 0:>6.2f} "
              f"{r['pd_decode']:>13.0f} {hd or 0:>10.0f} {r['pd_decode'] / hd if hd else 0:>6.2f}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_pdserve(core: EngineCore, batch: int, args, rng: random.Random) -> tuple[float, float]:
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_steps + 1, ignore_eos=True)
    vocab = core.arch.vocab_size
    core.add_request("warm", [rng.randrange(vocab) for _ in range(16)], SamplingParams(temperature=0, max_tokens=2))
    while core.has_unfinished_requests():
        core.step()
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        core.add_request(rid, [rng.randrange(vocab) for _ in range(args.input_len)], params)
    _sync(args.device)
    t = time.perf_counter()
    while any(r.num_computed_tokens < args.input_len for r in core.scheduler.requests.values()) \
            or core.scheduler.num_waiting:
        core.step()
    _sync(args.device)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    steps = 0
    while core.has_unfinished_requests():
        core.step()
        steps += 1
    _sync(args.device)
    decode_s = time.perf_counter() - t
    return batch * args.input_len / prefill_s, batch * steps / decode_s


def build_transformers(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dummy_arch(args.model)
    config = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                         num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                         head_dim=arch.head_dim, rms_norm_eps=arch.rms_norm_eps, rope_theta=arch.rope_theta,
                         max_position_embeddings=args.input_len + args.decode_steps + 8,
                         tie_word_embeddings=arch.tie_word_embeddings)
    from pdserve.model.loader import resolve_dtype

    dtype = resolve_dtype(args.dtype, args.device)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def run_transformers(model, batch: int, args) -> tuple[float, float]:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, args.input_len), device=args.device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.generate(ids[:1, :16], max_new_tokens=2, do_sample=False, pad_token_id=0)
        _sync(args.device)
        t = time.perf_counter()
        model(ids, attention_mask=mask, logits_to_keep=1)
        _sync(args.device)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=args.decode_steps + 1,
                       min_new_tokens=args.decode_steps + 1, do_sample=False, pad_token_id=0)
        _sync(args.device)
        decode_s = time.perf_counter() - t - prefill_s
    return batch * args.input_len / prefill_s, batch * args.decode_steps / decode_s


if __name__ == "__main__":
    main()
