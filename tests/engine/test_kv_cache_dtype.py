"""``--kv-cache-dtype fp8`` on the default model: twice the blocks in one budget, and greedy decoding that
agrees with the model-dtype cache's. Agreement is measured two ways: free-running greedy continuations (the
first tokens, before a near-tie flips one and the texts part), and teacher-forced next tokens (each position
of the bfloat16 cache's continuation asked again as a prompt, its prefix read from the cache: no drift).
The default model's weights are 4-bit (Q4_1): its greedy text meets near-ties early (measured: a gap of 0.125
nats between the top two tokens at the third token of one prompt), so a free-running text may part after a
few tokens; where fp8 picks another token, the model-dtype cache's top two must have been close."""
from __future__ import annotations

import logging

import pytest

from pdserve import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small workshop at the edge of a quiet town, there lived a robot named Pixel who",
    "The three primary colors are",
]
NUM_TOKENS = 24
MIN_TEACHER_FORCED = 0.9  # measured 0.938 (90 of 96 positions); the first free-running divergences at 5, 24, 2, 24
NEAR_TIE_NATS = 1.0  # fp8 may flip a token only where the model-dtype cache's top two are this close

logger = logging.getLogger(__name__)


def _engine(kv_cache_dtype: str) -> LLM:
    return LLM("smollm2-135m", kv_cache_memory="64MiB", max_model_len=512, kv_cache_dtype=kv_cache_dtype)


def _greedy(llm: LLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)]


def _teacher_forced(llm: LLM, prompt_ids: list[list[int]], continuations: list[list[int]]
                    ) -> tuple[list[int], list[float]]:
    """The greedy next token after every prefix ``prompt + continuation[:i]``, and its logprob's lead over
    the second most likely token's."""
    prompts = [{"prompt_token_ids": p + c[:i]} for p, c in zip(prompt_ids, continuations) for i in range(len(c))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=2))
    tops = [o.outputs[0].logprobs[0].top for o in outs]
    return [o.outputs[0].token_ids[0] for o in outs], [top[0][1] - top[1][1] for top in tops]


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def runs(default_model_path):
    """Greedy and teacher-forced tokens of each KV cache dtype (the teacher: the model-dtype cache's text)."""
    out = {}
    for kv in ("auto", "fp8"):
        llm = _engine(kv)
        prompt_ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
        greedy = _greedy(llm, prompt_ids)
        teacher = out["auto"]["greedy"] if kv == "fp8" else greedy
        forced, margins = _teacher_forced(llm, prompt_ids, teacher)
        out[kv] = {"greedy": greedy, "forced": forced, "margins": margins,
                   "num_blocks": llm.engine.num_blocks, "kv_bytes_per_block": llm.engine.kv_bytes_per_block,
                   "kv_dtype": str(llm.engine.kv_cache.dtype)}
        del llm
    return out


def test_fp8_holds_twice_the_blocks_in_the_same_budget(runs):
    auto, fp8 = runs["auto"], runs["fp8"]
    assert fp8["kv_dtype"] == "torch.float8_e4m3fn" and auto["kv_dtype"] != fp8["kv_dtype"]
    if auto["kv_dtype"] == "torch.bfloat16":
        assert fp8["kv_bytes_per_block"] * 2 == auto["kv_bytes_per_block"]
    assert fp8["num_blocks"] == 64 * 2**20 // fp8["kv_bytes_per_block"] >= 2 * auto["num_blocks"]


def test_fp8_greedy_decoding_agrees_with_the_model_dtype_cache(runs):
    auto, fp8 = runs["auto"], runs["fp8"]
    first = [_first_divergence(a, b) for a, b in zip(auto["greedy"], fp8["greedy"])]
    same = sum(x == y for x, y in zip(auto["forced"], fp8["forced"])) / len(auto["forced"])
    flipped = [m for a, b, m in zip(auto["forced"], fp8["forced"], auto["margins"]) if a != b]
    print(f"\nfp8 vs model-dtype KV: first divergence at tokens {first} of {NUM_TOKENS}; teacher-forced "
          f"next-token agreement {same:.3f} over {len(auto['forced'])} positions; the model-dtype cache's lead "
          f"at the flipped ones: {[round(m, 3) for m in flipped]} nats")
    assert min(first) >= 1  # every prompt's first token
    assert same >= MIN_TEACHER_FORCED
    assert all(m < NEAR_TIE_NATS for m in flipped)
    # the method's own noise: the model-dtype cache's teacher-forced tokens against its greedy text, the same
    # positions computed by prefill instead of decode (other GEMM shapes; bfloat16 logits come in steps of
    # 1/8 here, so ties are common): measured 0.958, as far from 1 as fp8's agreement above
    own = [t for g in auto["greedy"] for t in g]
    print(f"model-dtype KV, teacher-forced against its own greedy text: "
          f"{sum(x == y for x, y in zip(auto['forced'], own)) / len(own):.3f}")
    assert sum(x == y for x, y in zip(auto["forced"], own)) >= 0.9 * len(own)
