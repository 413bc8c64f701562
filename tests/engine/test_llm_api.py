"""The offline API on the default model: prompts as text or ids, chat, stop strings, n, seeds,
logprobs, and bad input that fails clearly without disturbing the engine."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve import LLM, SamplingParams
from pdserve.errors import InvalidRequestError, ModelLoadError


@pytest.fixture(scope="module")
def llm(default_model_path):
    return LLM("smollm2-135m", kv_cache_memory="256MiB", max_model_len=512)


def test_generate_text_and_token_id_prompts(llm):
    ids = llm.get_tokenizer().encode("The capital of France is")
    a, b = llm.generate(["The capital of France is", {"prompt_token_ids": ids}],
                        SamplingParams(temperature=0, max_tokens=8))
    assert a.prompt_token_ids == ids and b.prompt is None
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) <= 8
    assert "Paris" in a.outputs[0].text
    assert a.outputs[0].finish_reason in ("stop", "length")


def test_chat_applies_the_models_template(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16))
    expected_prompt = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    assert out.prompt_token_ids == expected_prompt
    assert "Paris" in out.outputs[0].text


def test_stop_string_truncates_and_reports_it(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    (full,) = llm.generate(["Count: 1, 2, 3, 4,"], params)
    text = full.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    (cut,) = llm.generate(["Count: 1, 2, 3, 4,"],
                          SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    out = cut.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert not llm.engine.has_unfinished_requests()


def test_max_tokens_and_length_finish(llm):
    (out,) = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=1234, n=3, ignore_eos=True)
    first = llm.generate(["Write a word:"], params)[0]
    # Same seeds in another batch composition: same samples.
    again = llm.generate(["Something else entirely", "Write a word:"], params)[1]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1


def test_logprobs(llm):
    (out,) = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3, logprobs=2))
    lps = out.outputs[0].logprobs
    assert len(lps) == len(out.outputs[0].token_ids)
    for lp, tok in zip(lps, out.outputs[0].token_ids):
        assert lp.token_id == tok and lp.rank == 1 and lp.logprob <= 0 and len(lp.top) == 2
        assert lp.top[0][0] == tok


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -5}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"n": 0}, "n"), ({"logprobs": 100}, "logprobs"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
])
def test_out_of_range_sampling_values_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_bad_prompts_fail_clearly_and_the_engine_serves_the_next(llm):
    params = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], params)
    with pytest.raises(InvalidRequestError, match="context"):
        llm.generate(["fine", {"prompt_token_ids": [100] * 600}], params)
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([{"prompt_token_ids": [10**9]}], params)
    assert not llm.engine.has_unfinished_requests()
    llm.engine.scheduler.check_integrity()
    (ok,) = llm.generate(["The capital of France is"], params)
    assert ok.outputs[0].token_ids


def test_unknown_model_path_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        LLM(str(tmp_path / "nope.gguf"))


def test_cli_generate(default_model_path):
    run = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "--max-tokens", "6",
                          "The capital of France is"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "--model", "/no/such/model.gguf",
                          "x"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "not found" in bad.stderr and "Traceback" not in bad.stderr
