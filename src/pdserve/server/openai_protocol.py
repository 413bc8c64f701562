"""OpenAI request bodies, strictly validated, and their translation to SamplingParams.

Bodies are decoded with msgspec against structs that forbid unknown fields and do not coerce types, so a
misspelt or unsupported field, or a string where a number belongs, is an HTTP 400 naming the field
(``param``), never silently ignored. Supported: OpenAI's fields that pdserve implements, plus vLLM's
sampling extras (top_k, min_p, min_tokens, ignore_eos, repetition_penalty, stop_token_ids,
skip_special_tokens, include_stop_str_in_output).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

import msgspec

from pdserve.errors import InvalidRequestError
from pdserve.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 128
MAX_CHAT_TOP_LOGPROBS = 20


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(msgspec.Struct, forbid_unknown_fields=True):
    """Fields common to both endpoints."""

    model: str
    max_tokens: Union[int, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    n: int = 1
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    stop: Union[str, list[str], None] = None
    seed: Union[int, None] = None
    presence_penalty: Union[float, None] = None
    frequency_penalty: Union[float, None] = None
    user: Union[str, None] = None
    logit_bias: Union[dict[str, float], None] = None
    # vLLM's extras
    top_k: Union[int, None] = None
    min_p: Union[float, None] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: Union[float, None] = None
    stop_token_ids: Union[list[int], None] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:<id>" (vLLM's extra)


class CompletionRequest(_Sampling, forbid_unknown_fields=True):
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]], checked by ``prompts``
    logprobs: Union[int, None] = None
    echo: bool = False
    best_of: Union[int, None] = None
    suffix: Union[str, None] = None


class ChatRequest(_Sampling, forbid_unknown_fields=True):
    messages: list[dict[str, Any]] = []
    max_completion_tokens: Union[int, None] = None
    logprobs: bool = False
    top_logprobs: Union[int, None] = None
    tools: Union[list[Any], None] = None
    tool_choice: Any = None
    response_format: Union[dict[str, Any], None] = None
    parallel_tool_calls: Union[bool, None] = None
    add_generation_prompt: bool = True


@dataclass
class Prompt:
    """One prompt of a request: its token ids and, when given as text, the text."""

    token_ids: list[int]
    text: str | None = None


def parse_completion(body: bytes) -> CompletionRequest:
    req = _decode(body, CompletionRequest)
    if req.prompt is None:
        raise InvalidRequestError("prompt is required", "prompt")
    _check_unsupported(req.echo, "echo", "echo is not supported")
    _check_unsupported(req.suffix is not None, "suffix", "suffix is not supported")
    _check_unsupported(req.best_of is not None and req.best_of != req.n, "best_of",
                       "best_of other than n is not supported")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {req.logprobs}", "logprobs")
    _check_common(req)
    return req


def parse_chat(body: bytes) -> ChatRequest:
    req = _decode(body, ChatRequest)
    if not req.messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    for i, m in enumerate(req.messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise InvalidRequestError(f"messages[{i}].role must be system, user, assistant, developer or tool",
                                      f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidRequestError("only text content parts are supported", f"messages[{i}].content")
            m["content"] = "".join(p["text"] for p in content)
        elif not isinstance(content, str) and not (content is None and role == "assistant"):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of text parts",
                                      f"messages[{i}].content")
    _check_unsupported(bool(req.tools), "tools", "tools are not supported")
    _check_unsupported(req.tool_choice not in (None, "none"), "tool_choice", "tool_choice is not supported")
    _check_unsupported(req.response_format is not None and req.response_format.get("type") != "text",
                       "response_format", "only response_format {'type': 'text'} is supported")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_CHAT_TOP_LOGPROBS}]", "top_logprobs")
    if req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise InvalidRequestError("give max_completion_tokens or max_tokens, not both", "max_tokens")
        req.max_tokens = req.max_completion_tokens
    _check_common(req)
    return req


def prompts(req: CompletionRequest, tokenizer, vocab_size: int | None = None) -> list[Prompt]:
    """The request's prompts as token ids (text is tokenized here)."""
    p = req.prompt
    if isinstance(p, str):
        return [Prompt(tokenizer.encode(p), p)]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return [Prompt(tokenizer.encode(x), x) for x in p]
        if all(_is_token(x) for x in p):
            return [Prompt(_checked_ids(p, vocab_size))]
        if all(isinstance(x, list) and x and all(_is_token(t) for t in x) for x in p):
            return [Prompt(_checked_ids(x, vocab_size)) for x in p]
    raise InvalidRequestError("prompt must be a non-empty string, list of strings, list of token ids or list of "
                              "token-id lists", "prompt")


def sampling_params(req: CompletionRequest | ChatRequest, num_logprobs: int | None) -> SamplingParams:
    """SamplingParams for the request (n is handled by the caller: one sub-request per choice)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        n=1,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        max_tokens=req.max_tokens,
        min_tokens=req.min_tokens,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=num_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def check_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """vLLM's rule: prompt plus requested output must fit the context."""
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequestError(f"This model's maximum context length is {max_model_len} tokens. However, your "
                                  f"prompt has {num_prompt_tokens} tokens.", "prompt")
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequestError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                                  f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in "
                                  f"the prompt, {max_tokens} in the completion).", "max_tokens")


def error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# ---- private --------------------------------------------------------------------------------------------

_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
_FIELD_RE = re.compile(r"field `([^`]*)`")


def _decode(body: bytes, cls: type) -> Any:
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _PATH_RE.search(text) or _FIELD_RE.search(text)
        param = m.group(1) if m else None
        if "unknown field" in text:
            text = f"unsupported or unknown field: {text}"
        raise InvalidRequestError(text, param or None) from None
    except msgspec.DecodeError as e:
        raise InvalidRequestError(f"the body is not valid JSON: {e}") from None


def _check_common(req: CompletionRequest | ChatRequest) -> None:
    if not 1 <= req.n <= MAX_N:
        raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {req.n}", "n")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {req.max_tokens}", "max_tokens")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError("stream_options needs stream: true", "stream_options")
    _check_unsupported(bool(req.logit_bias), "logit_bias", "logit_bias is not supported")
    if isinstance(req.stop, list) and len(req.stop) > 16:
        raise InvalidRequestError("at most 16 stop strings", "stop")
    if req.stop == "" or (isinstance(req.stop, list) and "" in req.stop):
        raise InvalidRequestError("stop strings must be non-empty", "stop")


def _check_unsupported(bad: bool, param: str, message: str) -> None:
    if bad:
        raise InvalidRequestError(message, param)


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _checked_ids(ids: list[int], vocab_size: int | None) -> list[int]:
    if any(t < 0 or (vocab_size is not None and t >= vocab_size) for t in ids):
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size})", "prompt")
    return list(ids)
