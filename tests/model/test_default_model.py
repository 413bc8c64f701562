"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers' own GGUF loading."""
from __future__ import annotations

import pytest
import torch

from pdserve import kernels
from pdserve.config import ModelConfig
from pdserve.model.loader import load_model
from pdserve.model.tokenizer import IncrementalDetokenizer, Tokenizer

from model_helpers import prefill_logits

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Hello 世界! 🎉🎉 naïve café — ok\n\tTabs   and  spaces",
    "",
]
MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本語で話して"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name)


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return Tokenizer.from_pretrained(default_model_path)


@pytest.fixture(scope="module")
def hf_model(default_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name,
                                                dtype=torch.float32).eval()


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS[:3]] + [tokenizer.apply_chat_template(MESSAGES[1])]


# ``none``: dequantized at load, as transformers does. ``auto``: the file's Q4_1/Q8_0 weights multiplied as
# they are by the CPU kernels, activations rounded to 15 bits per 32-value block (measured: max |logit
# difference| 0.02 over these prompts, on logits of magnitude ~20; every argmax the same) or to 8 bits as
# prefill does by default (``quant_weight.activation_bits``; measured: max difference 1.7, 96 of 97 argmaxes).
@pytest.mark.parametrize("quantization,act_bits,tol,min_agreement", [
    ("none", "16", 1e-3, 1.0), ("auto", "16", 0.05, 1.0), ("auto", "auto", 3.0, 0.95)])
def test_logits_match_transformers(default_model_path, tokenizer, hf_model, quantization, act_bits, tol,
                                   min_agreement, monkeypatch):
    from pdserve.model import quant_weight

    monkeypatch.setattr(quant_weight, "ACTIVATION_BITS", act_bits)
    model, arch = load_model(ModelConfig(model=str(default_model_path), dtype="float32", device="cpu",
                                         quantization=quantization), max_model_len=512)
    assert (arch.architecture, arch.num_layers, arch.num_kv_heads, arch.tie_word_embeddings) == \
        ("llama", 30, 3, True)
    is_quantized = quantization == "auto" and kernels.cpu_ops() is not None
    assert model.weight_formats() == ("Q4_1 x120, Q8_0 x1" if is_quantized else "float32 x121")
    num_same = num_positions = 0
    for ids in _prompts(tokenizer):
        ours = prefill_logits(model, ids)
        with torch.inference_mode():
            theirs = hf_model(torch.tensor([ids])).logits[0].float()
        assert (ours - theirs).abs().max() < tol
        num_same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        num_positions += len(ids)
    assert num_same >= min_agreement * num_positions, (num_same, num_positions)


def test_quantized_greedy_decode_matches_transformers(default_model_path, tokenizer, hf_model, monkeypatch):
    """The engine decoding the prompts together, a token each a step, with the weights kept quantized,
    picks transformers' greedy tokens on the dequantized weights, 24 of them per prompt (float32; the
    first prompt's 30th token is a near-tie that even the dequantized path resolves the other way)."""
    from pdserve import LLM, SamplingParams
    from pdserve.model import quant_weight

    monkeypatch.setattr(quant_weight, "ACTIVATION_BITS", "16")  # prefill too (8 bits by default)
    llm = LLM(str(default_model_path), dtype="float32", quantization="auto", kv_cache_memory="64MiB",
              max_model_len=512)
    prompts = _prompts(tokenizer)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()


def test_encode_decode_match_transformers(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert tokenizer.bos_token_id == 1 and 2 in tokenizer.eos_token_ids
    for text in TEXTS:
        for special in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=special)
            assert ids == hf_tokenizer.encode(text, add_special_tokens=special)
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_matches_transformers(tokenizer, hf_tokenizer):
    for messages in MESSAGES:
        for gen in (True, False):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert text == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=gen,
                                                            tokenize=False)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            assert ids == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                                           return_dict=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenizer_multibyte(tokenizer, chunk):
    prompt = tokenizer.encode("Say something:")
    text = "Emoji 🎉👍🏽 and 中文字符, 日本語 ✓ — ﬁne. Ünïcödé!\n🤖"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    assert "".join(deltas) == detok.text == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas if chunk == 1 else True  # some emoji span several byte tokens


def test_incremental_detokenizer_special_tokens(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi ✓"}]) + \
        tokenizer.encode("ok 🎉", add_special_tokens=False) + [2]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        out = "".join(detok.push([i]) for i in ids)
        assert out == tokenizer.decode(ids, skip_special_tokens=skip)


def test_load_tokenizer_by_name(default_model_path, tokenizer):
    from pdserve.model.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m", eos_token_ids=(2, 7))
    assert tok.eos_token_ids == (2, 7)
    assert tok.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])


def test_tokenizer_from_hf_folder(tokenizer, hf_tokenizer, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
    assert tok.apply_chat_template(MESSAGES[0]) == tokenizer.apply_chat_template(MESSAGES[0])


def test_no_chat_template_is_invalid_request(tokenizer, hf_tokenizer):
    from pdserve.errors import InvalidRequestError

    bare = Tokenizer(hf_tokenizer)
    bare.chat_template = None
    with pytest.raises(InvalidRequestError, match="chat template"):
        bare.apply_chat_template(MESSAGES[0])
