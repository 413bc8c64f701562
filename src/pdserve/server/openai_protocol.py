"""OpenAI request bodies: parsed with the deployment's request types (api_types.py), then the rules no JSON
schema states (fields that depend on each other, the context length, the endpoint's max_tokens default),
and their translation to SamplingParams.

Every failure is an InvalidRequestError (HTTP 400) naming the field in ``param``, or a ModelNotFoundError
(HTTP 404) for a model this server does not serve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import RootModel, ValidationError

from pdserve.errors import InvalidRequestError, ModelNotFoundError
from pdserve.sampling_params import SamplingParams
from pdserve.server.api_types import AssistantMessage, ChatRequest, CompletionRequest
from pdserve.server.limits import DEFAULT_MAX_TOKENS, Limits


@dataclass
class Prompt:
    """One prompt of a request: its token ids and, when given as text, the text."""

    token_ids: list[int]
    text: str | None = None


def parse_model(body: bytes, cls: type) -> Any:
    """Any request body of ours (``cls``: a model of api_types.py); InvalidRequestError when invalid."""
    return _parse(body, cls)


def parse_completion(body: bytes, cls: type[CompletionRequest] = CompletionRequest) -> CompletionRequest:
    req = _parse(body, cls)
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequestError("best_of other than n is not supported", "best_of")
    _check_common(req)
    return req


def parse_chat(body: bytes, cls: type[ChatRequest] = ChatRequest) -> ChatRequest:
    req = _parse(body, cls)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
    if req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise InvalidRequestError("give max_completion_tokens or max_tokens, not both", "max_tokens")
        req.max_tokens = req.max_completion_tokens
    _check_common(req)
    return req


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: text parts joined, no null fields."""
    out = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):
            d["content"] = "".join(part.text for part in content)
        elif content is None and isinstance(m, AssistantMessage):
            d["content"] = ""
        out.append(d)
    return out


def prompts(req: CompletionRequest, tokenizer) -> list[Prompt]:
    """The request's prompts as token ids (text is tokenized here). A null prompt is the start of a
    document: the model's BOS token, or its end-of-text token (OpenAI's "<|endoftext|>")."""
    p = req.prompt
    if p is None:
        start = getattr(tokenizer, "bos_token_id", None)
        if start is None:
            eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
            if not eos:
                raise InvalidRequestError("prompt: null needs a model with a BOS or end-of-text token", "prompt")
            start = eos[0]
        out = [Prompt([start])]
    elif isinstance(p, str):
        out = [Prompt(tokenizer.encode(p), p)]
    elif all(isinstance(x, str) for x in p):
        out = [Prompt(tokenizer.encode(x), x) for x in p]
    elif all(isinstance(x, int) for x in p):
        out = [Prompt(list(p))]
    else:
        out = [Prompt(list(x)) for x in p]
    for i, pr in enumerate(out):
        if not pr.token_ids:
            raise InvalidRequestError(f"prompt {i} has no tokens", "prompt")
    return out


def resolve_max_tokens(req: CompletionRequest | ChatRequest, num_prompt_tokens: int, limits: Limits,
                       chat: bool) -> int:
    """The request's max_tokens: given (at most the cap: the type says so), or the endpoint's default:
    16 for completions, for chat what fits the context up to the cap. 400 when it does not fit."""
    check_length(num_prompt_tokens, req.max_tokens, limits.max_model_len)
    if req.max_tokens is not None:
        return req.max_tokens
    if chat:
        return min(limits.max_tokens_cap, limits.max_model_len - num_prompt_tokens)
    default = min(DEFAULT_MAX_TOKENS, limits.max_tokens_cap)
    check_length(num_prompt_tokens, default, limits.max_model_len)
    return default


def sampling_params(req: CompletionRequest | ChatRequest, num_logprobs: int | None,
                    max_tokens: int | None) -> SamplingParams:
    """SamplingParams for the request (n is handled by the caller: one sub-request per choice).
    Raises InvalidRequestError for values that conflict (min_tokens above max_tokens)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        n=1, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=stop,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=num_logprobs,
        skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output)


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
    """OpenAI's error shape (api_responses.ErrorResponse)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# ---- private --------------------------------------------------------------------------------------------


def _parse(body: bytes, cls: type) -> Any:
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise _request_error(e, cls) from None


def _request_error(e: ValidationError, cls: type) -> InvalidRequestError:
    errors = e.errors(include_url=False)
    for err in errors:
        if err["loc"] == ("model",) and err["type"] == "literal_error":
            served = err.get("ctx", {}).get("expected", "")
            return ModelNotFoundError(f"The model `{err['input']}` does not exist; this server serves {served}")
    err = errors[0]
    loc = err["loc"]
    tagged = issubclass(cls, RootModel)  # a tagged union (ElasticDecision): the location starts with the tag
    if tagged:
        loc = loc[1:]
    kind, param = err["type"], _param(loc)
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a message's role, or the union's tag field
        param = "kind" if tagged else param + ".role"
    if kind == "json_invalid":
        return InvalidRequestError(f"the body is not valid JSON: {err['msg']}")
    if kind in ("model_type", "model_attributes_type") and not param:
        return InvalidRequestError("the body must be a JSON object")
    if kind == "extra_forbidden":
        return InvalidRequestError(f"unsupported or unknown field: {param}", param)
    if kind == "missing":
        return InvalidRequestError(f"{param} is required", param)
    message = err["msg"]
    field = None if tagged or not loc else cls.model_fields.get(loc[0])
    if field is not None and (field.description or "").startswith(("not supported", "only ")):
        message = field.description  # a field pdserve takes only in part
    return InvalidRequestError(f"{param}: {message}" if param else message, param or None)


def _param(loc: tuple) -> str:
    """``messages[0].content`` from pydantic's location, without its union branch and tag labels."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and isinstance(loc[i - 1], int) and loc[0] == "messages" and i == 2:
            continue  # the message's role (the union's tag)
        elif not part.isidentifier() or part in ("str", "int", "float", "bool", "none"):
            continue  # a union branch's label
        else:
            out += f".{part}" if out else part
    return out


def _check_common(req: CompletionRequest | ChatRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError("stream_options needs stream: true", "stream_options")
    if req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise InvalidRequestError(f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({req.max_tokens})",
                                  "min_tokens")
