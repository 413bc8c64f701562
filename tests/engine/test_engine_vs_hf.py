"""The engine against Hugging Face transformers on the default model (the same GGUF, loaded by
transformers as the reference): greedy tokens equal, one batch of 24 prompts of mixed length, with
chunked prefill forced small and with prefix-cache hits.

The reference is transformers' greedy choice at every position of the engine's output (one forward
pass over prompt + output, teacher-forced): the engine's tokens equal ``generate(do_sample=False)``'s
exactly when each of them is the reference's argmax given the tokens before it, and one forward pass
per prompt is much cheaper than generating token by token."""
from __future__ import annotations

import pytest
import torch

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.core import EngineCore
from pdserve.model.registry import resolve_model_path
from pdserve.sampling_params import SamplingParams

NUM_NEW = 24
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4, 5,",
    "Photosynthesis is the process by which",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The quick brown fox",
    "import numpy as np\nimport torch\n\n# Load the dataset and",
    "In 1969, astronauts",
    "Translate to French: Good morning, how are you?",
    "Hi",
    "The three primary colors are",
    "A haiku about autumn leaves:\n",
    "SELECT name, age FROM users WHERE",
    "The mitochondria is often called",
    "List of prime numbers: 2, 3, 5, 7,",
    "Water is made of",
    "Dear hiring manager, I am writing to apply for the position of software engineer at your company. "
    "I have five years of experience building distributed systems, and I",
    "The largest planet in our solar system is",
    "To make a cup of tea, first",
    "Machine learning is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Roses are red, violets are blue,",
    "The speed of light in vacuum is approximately",
]


@pytest.fixture(scope="module", autouse=True)
def fine_activations():
    """The default model's weights stay quantized; exact greedy equality needs the kernels' 15-bit
    activations at every batch size (by default prefill takes 8 bits: see test_default_model.py)."""
    from pdserve.model import quant_weight

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant_weight, "ACTIVATION_BITS", "16")
        yield


@pytest.fixture(scope="module")
def reference(default_model_path):
    transformers = pytest.importorskip("transformers")
    path = default_model_path
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    prompts = [tok(t).input_ids for t in TEXTS]
    return model, prompts


def _reference_choices(model, prompts: list[list[int]], outputs: list[list[int]]) -> list[list[int]]:
    """transformers' greedy token at each output position, given the prompt and the outputs before it."""
    choices = []
    with torch.inference_mode():
        for ids, out in zip(prompts, outputs):
            logits = model(torch.tensor([ids + out[:-1]])).logits[0]  # (len, vocab)
            choices.append(logits[len(ids) - 1:].argmax(dim=-1).tolist())
    return choices


def _engine(**sched) -> EngineCore:
    # float32: the reference is transformers in float32 (bfloat16, the CPU default where it is fast,
    # rounds differently, so equality of every token is a float32 property).
    return EngineCore(EngineConfig(model=ModelConfig("smollm2-135m", dtype="float32"),
                                   cache=CacheConfig(num_blocks=512), scheduler=SchedulerConfig(**sched)))


def _run(core: EngineCore, prompts: list[list[int]], tag: str) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW)
    for i, ids in enumerate(prompts):
        core.add_request(f"{tag}{i}", ids, params)
    tokens: dict[str, list[int]] = {f"{tag}{i}": [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
        core.scheduler.check_integrity()
    return [tokens[f"{tag}{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def engine(default_model_path):
    return _engine()


def _assert_same(got, expected):
    mismatches = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not mismatches, f"{len(mismatches)} of {len(expected)} prompts differ; first: {mismatches[0]}"


@pytest.fixture(scope="module")
def first_outputs(engine, reference):
    model, prompts = reference
    got = _run(engine, prompts, "a")
    assert all(len(g) == NUM_NEW or g[-1] in engine.arch.eos_token_ids for g in got)
    return got


def test_greedy_batch_matches_transformers(engine, reference, first_outputs):
    model, prompts = reference
    _assert_same(first_outputs, _reference_choices(model, prompts, first_outputs))


def test_prefix_cache_hits_give_the_same_tokens(engine, reference, first_outputs):
    _, prompts = reference
    hits_before = engine.kv.stats.num_hit_tokens
    _assert_same(_run(engine, prompts, "b"), first_outputs)  # every full prompt block is now a hit
    assert engine.kv.stats.num_hit_tokens > hits_before


def test_small_chunks_and_shared_prefixes_match_transformers(reference, first_outputs):
    model, prompts = reference
    core = _engine(max_num_batched_tokens=16)  # every prompt longer than 16 tokens is chunked
    _assert_same(_run(core, prompts, "c"), first_outputs)
    # Prompts that share a long prefix with each other.
    long = prompts[17]
    shared = [long + p[:3] for p in prompts[:6]]
    hits_before = core.kv.stats.num_hit_tokens
    got = _run(core, shared, "d")
    _assert_same(got, _reference_choices(model, shared, got))
    assert core.kv.stats.num_hit_tokens - hits_before >= 6 * (len(long) // 16) * 16


def test_logits_close_to_transformers(engine, reference):
    model, prompts = reference
    ids = prompts[2]
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0, -1]
        from pdserve.model.attention import build_metadata

        engine.kv.pool.reset_prefix_cache()
        blocks = list(range(engine.kv.num_blocks_for(len(ids))))
        meta = build_metadata([(0, len(ids), blocks)], engine.block_size)
        hidden = engine.model(torch.tensor(ids), torch.arange(len(ids)), engine.runner.kv_caches, meta)
        got = engine.model.compute_logits(hidden[-1:])[0]
    # The default model's Q4_1/Q8_0 weights stay quantized (quantization=auto), its activations rounded
    # to 15 bits per 32-value block here: ~0.02 from the dequantized reference (test_default_model.py).
    atol = 2e-3 if engine.model.weight_formats() == "float32 x121" else 0.05
    assert torch.allclose(got, ref, atol=atol, rtol=1e-4), (got - ref).abs().max()
    assert got.argmax() == ref.argmax()
