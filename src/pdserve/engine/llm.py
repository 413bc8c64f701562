"""The offline API, shaped like vLLM's: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.config import EngineConfig
from pdserve.engine.core import EngineCore
from pdserve.engine.output_processor import TextState
from pdserve.engine.outputs import TokenLogprobs
from pdserve.errors import InvalidRequestError
from pdserve.sampling_params import SamplingParams

Prompt = str | dict


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    finished: bool = True


class LLM:
    """Loads a model into one engine and runs batches of prompts to completion."""

    def __init__(self, model: str = "smollm2-135m", *, tokenizer: str | None = None, **settings) -> None:
        """``settings``: engine settings by name, the same as ``pdserve worker``'s engine flags and cluster
        files' ``engine:`` keys (``settings.py``): ``kv_cache_memory="1GiB"``, ``max_num_seqs=64``,
        ``dtype="float32"``, ``max_model_len=2048``, ... ValueError names an unknown one."""
        from pdserve.settings import engine_config

        self._init(engine_config(model=model, **settings), tokenizer)

    @classmethod
    def from_engine_config(cls, config: EngineConfig, tokenizer: str | None = None) -> LLM:
        """An LLM over an engine built from a whole EngineConfig (e.g. from the CLI's engine flags)."""
        llm = cls.__new__(cls)
        llm._init(config, tokenizer)
        return llm

    def _init(self, config: EngineConfig, tokenizer: str | None) -> None:
        self.engine = EngineCore(config)
        self._tokenizer = None
        self._tokenizer_source = tokenizer
        self._counter = itertools.count()

    def get_tokenizer(self):
        if self._tokenizer is None:
            from pdserve.model.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer_source or self.engine.config.model.model)
        return self._tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One result per prompt, in order. A prompt is a string or ``{"prompt_token_ids": [...]}``.
        A bad prompt raises InvalidRequestError before anything runs."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise InvalidRequestError("give one SamplingParams, or one per prompt")
        inputs = [self._prompt_ids(p) for p in prompts]
        return self._run(inputs, params_list, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's own chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        prompts = [{"prompt_token_ids": tokenizer.apply_chat_template(c, add_generation_prompt=True)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    # -- private -------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.get_tokenizer().encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        raise InvalidRequestError("a prompt is a string or {'prompt_token_ids': [...]}", param="prompt")

    def _run(self, inputs: list[tuple[str | None, list[int]]], params_list: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        tokenizer = self.get_tokenizer()
        results: list[RequestOutput] = []
        states: dict[str, tuple[RequestOutput, int, TextState]] = {}
        added: list[str] = []
        try:
            for (text, ids), params in zip(inputs, params_list):
                rid = str(next(self._counter))
                result = RequestOutput(rid, text, ids, outputs=[None] * params.n)
                results.append(result)
                for i in range(params.n):
                    sub = params
                    if params.n > 1:
                        sub = copy.copy(params)
                        sub.n = 1
                        if params.seed is not None:
                            sub.seed = params.seed + i
                    sub_id = f"{rid}-{i}"
                    engine.add_request(sub_id, ids, sub)
                    added.append(sub_id)
                    states[sub_id] = (result, i, TextState(tokenizer, ids, sub))
            bar = _progress(len(states)) if use_tqdm else None
            while engine.has_unfinished_requests():
                stopped = []
                for out in engine.step():
                    result, index, state = states[out.request_id]
                    state.update(out)
                    if state.finished:
                        if not out.finished:
                            stopped.append(out.request_id)  # a stop string, seen here
                        result.num_cached_tokens = state.num_cached_tokens
                        result.outputs[index] = _completion(index, state)
                        if bar is not None:
                            bar.update(1)
                if stopped:
                    engine.abort_requests(stopped)
            if bar is not None:
                bar.close()
        except BaseException:
            engine.abort_requests(added)
            raise
        return results


def _completion(index: int, state: TextState) -> CompletionOutput:
    return CompletionOutput(index, state.text, list(state.token_ids), state.finish_reason, state.stop_reason,
                            list(state.logprobs) if state.params.logprobs is not None else None)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
