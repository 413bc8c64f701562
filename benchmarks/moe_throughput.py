"""Offline throughput of a mixture of experts: pdserve's engine vs Hugging Face transformers ``generate``
on the same model, weights and prompts, in the same run.

The model is Qwen3-30B-A3B's shape (hidden 2048, 128 experts of width 768, top-8, 32 query / 4 KV heads,
vocab 151936) at reduced depth (``--num-layers``, default 2), with pdserve's seeded dummy weights; the
transformers model gets the very same tensors, so both route every token to the same experts. Workload:
N requests of random prompts, a fixed number of output tokens each (ignore_eos), in pdserve's dtype
(``auto``: bfloat16 on a CPU with bfloat16 arithmetic, else float32; transformers runs in the same one).
Prints output tokens/s of both and their ratio. pdserve's side is the engine itself (``EngineCore``, token
ids in and out: the model has no tokenizer), as transformers' is ``generate`` on token ids.

    .venv/bin/python benchmarks/moe_throughput.py [--num-layers 2] [--num-requests 16] [--input-len 128]
        [--output-len 32] [--hf-batch 16] [--dtype auto] [--out FILE.json]

Smaller settings for a quick check (same widths, fewer experts or a smaller vocabulary change the model):
``--num-experts 16 --vocab-size 4096 --num-requests 2 --input-len 16 --output-len 4``.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pdserve import SamplingParams
from pdserve.engine.core import EngineCore
from pdserve.model.arch import BUILTIN_ARCHS, ModelArch
from pdserve.model.dummy import load_dummy
from pdserve.settings import engine_config

from offline_throughput import time_generate  # benchmarks/: the script's own folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--num-experts", type=int, default=128, help="routed experts per layer (the real model: 128)")
    ap.add_argument("--vocab-size", type=int, default=151936)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=16, help="transformers generate batch size")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args()

    arch = replace(BUILTIN_ARCHS["qwen3-30b-a3b"], num_layers=args.num_layers, num_experts=args.num_experts,
                   vocab_size=args.vocab_size)
    rng = random.Random(0)
    prompts = [[rng.randint(100, args.vocab_size - 1) for _ in range(args.input_len)]
               for _ in range(args.num_requests)]
    num_out = args.num_requests * args.output_len
    with tempfile.TemporaryDirectory(prefix="pdserve-moe-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config(arch)))
        engine = EngineCore(engine_config(
            model=tmp, load_format="dummy", seed=0, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.input_len + args.output_len))
    dtype = engine.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"model: qwen3_moe, {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_experts} experts "
          f"(top-{arch.num_experts_per_tok}, width {arch.moe_intermediate_size}), vocab {arch.vocab_size}: "
          f"{arch.num_params() / 1e9:.2f}B params, {arch.num_active_params() / 1e9:.2f}B active; {dtype_name}, "
          f"{torch.get_num_threads()} threads")
    print(f"workload: {args.num_requests} requests x {args.input_len} prompt + {args.output_len} output tokens")

    generate(engine, [prompts[0][:8]], 2)  # warm-up
    engine.kv.pool.reset_prefix_cache()
    t = time.perf_counter()
    pd_tokens = generate(engine, prompts, args.output_len)
    pd_s = time.perf_counter() - t
    assert all(len(out) == args.output_len for out in pd_tokens)
    del engine
    print(f"pdserve: {pd_s:.2f} s, {num_out / pd_s:.1f} output tokens/s")

    hf_model = transformers_model(arch, dtype)
    print(f"transformers experts implementation: {getattr(hf_model.config, '_experts_implementation_internal', '?')}")
    hf_s, hf_tokens = time_generate(hf_model, prompts, args.hf_batch, args.output_len)
    print(f"transformers generate (batch {args.hf_batch}): {hf_s:.2f} s, {num_out / hf_s:.1f} output tokens/s")
    ratio = hf_s / pd_s
    same = sum(a == b for a, b in zip(pd_tokens, hf_tokens))
    print(f"ratio pdserve / transformers: {ratio:.2f}x (greedy outputs identical for {same} of "
          f"{len(prompts)} requests; {dtype_name} rounding may split them)")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            vars(args), dtype=dtype_name, num_params=arch.num_params(), num_active_params=arch.num_active_params(),
            pdserve_s=pd_s, pdserve_output_tps=num_out / pd_s, transformers_s=hf_s,
            transformers_output_tps=num_out / hf_s, ratio_vs_transformers=ratio), indent=2))


def generate(engine: EngineCore, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """Greedy, ``output_len`` tokens for every prompt, all submitted at once."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"{i}-{time.monotonic_ns()}": [] for i in range(len(prompts))}  # in order
    for request_id, ids in zip(tokens, prompts):
        engine.add_request(request_id, ids, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return list(tokens.values())


def hf_config(arch: ModelArch) -> dict:
    """A Qwen3-MoE config.json of ``arch``'s shape (every layer sparse)."""
    return dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
        rms_norm_eps=arch.rms_norm_eps, rope_theta=arch.rope_theta,
        max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=arch.tie_word_embeddings,
        num_experts=arch.num_experts, num_experts_per_tok=arch.num_experts_per_tok,
        moe_intermediate_size=arch.moe_intermediate_size, norm_topk_prob=arch.norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", eos_token_id=list(arch.eos_token_ids))


def transformers_model(arch: ModelArch, dtype: torch.dtype):
    """transformers' Qwen3-MoE holding pdserve's dummy weights (same seed as the engine's: same tensors)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    ours = load_dummy(arch, dtype, "cpu", seed=0)
    state = {name: t for name, t in ours.checkpoint_weights() if ".mlp.experts." not in name}
    for i, layer in enumerate(ours.layers):
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = layer.mlp.w13  # (E, 2I, H): [gate | up]
        state[f"model.layers.{i}.mlp.experts.down_proj"] = layer.mlp.w2  # (E, H, I)
    config = hf_config(arch)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config))
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its buffers were built on meta
    return model.eval()


if __name__ == "__main__":
    main()
