"""OpenAI request bodies as pydantic models: the one definition that both parses requests and is published
as their JSON schema in /openapi.json, so the validator and the document cannot drift.

Types follow OpenAI's API reference: a field OpenAI marks nullable takes ``null`` and it means the
field's default; integers follow JSON Schema, so ``5.0`` is the integer 5 as in vLLM, while ``5.5``, ``"5"``
and ``true`` are not (vLLM's lax types take the last two). A field pdserve does not implement is either
absent (an unknown field is a 400) or narrowed to the values it does implement (``echo``: only false;
``tools``: only empty), so the document says what this server accepts. vLLM's sampling extras (top_k,
min_p, min_tokens, ...) are accepted.

``request_types(limits)`` makes the two request types of one deployment: the served model's name, the
vocabulary and the server's max_tokens cap become part of the type (and so of the document).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, RootModel, ValidationInfo, WrapValidator,
                      create_model, model_validator)
from pydantic_core import PydanticCustomError

from pdserve.sampling_params import MAX_LOGPROBS
from pdserve.server.limits import Limits

MAX_N = 128
MAX_STOP = 16
MAX_CHAT_TOP_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _integral(value: Any) -> Any:
    """JSON Schema's integer: a number with no fractional part (5.0 is 5)."""
    if isinstance(value, float) and value.is_integer() and INT64_MIN <= value <= INT64_MAX:
        return int(value)
    return value


def integer(**bounds: int) -> Any:
    """An integer type with JSON Schema bounds (ge, gt, le, lt) that takes integral floats."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def only(value: Any) -> Any:
    """The one value ``value`` (a JSON Schema ``const``), of its exact type: 0 is not false."""
    def same_type(v: Any) -> Any:
        if type(v) is not type(value):
            raise PydanticCustomError("literal_error", f"Input should be {value!r}")
        return v
    return Annotated[Literal[value], BeforeValidator(same_type)]


def _one_error(message: str):
    """A validator that replaces a union's per-branch errors by one clear message."""
    def validate(value: Any, handler, info: ValidationInfo) -> Any:
        try:
            return handler(value)
        except ValueError:
            raise PydanticCustomError("invalid", message) from None
    return validate


class _Body(BaseModel):
    """Strict types (no "5" for 5, no 1 for true), unknown fields refused, and null in a field whose default
    is not null means that default."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _null_means_default(self):
        for name, info in type(self).model_fields.items():
            if not info.is_required() and info.default is not None and getattr(self, name) is None:
                object.__setattr__(self, name, info.default)
        return self


class StreamOptions(_Body):
    include_usage: Union[bool, None] = Field(False, description="a last chunk with the usage, before [DONE]")
    continuous_usage_stats: Union[bool, None] = Field(False, description="vLLM's extra; accepted, no effect")


NonEmptyStr = Annotated[str, Field(min_length=1)]
Stop = Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)], None]


class _Sampling(_Body):
    """Fields common to both endpoints."""

    model: str = Field(description="the served model's id (GET /v1/models)")
    max_tokens: Union[integer(ge=1), None] = Field(None, description=(
        "most tokens to generate; prompt + max_tokens must fit the context. Default: 16 for completions; "
        "for chat, what fits the context up to the server's cap"))
    temperature: Union[float, None] = Field(1.0, ge=0.0)
    top_p: Union[float, None] = Field(1.0, gt=0.0, le=1.0)
    n: Union[integer(ge=1, le=MAX_N), None] = Field(1, description="choices per prompt")
    stream: Union[bool, None] = Field(False, description="server-sent events, ending with `data: [DONE]`")
    stream_options: Union[StreamOptions, None] = Field(None, description="only with stream: true")
    stop: Stop = Field(None, description=f"up to {MAX_STOP} non-empty strings that end the output")
    seed: Union[integer(ge=INT64_MIN, le=INT64_MAX - MAX_N), None] = None
    presence_penalty: Union[float, None] = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Union[float, None] = Field(0.0, ge=-2.0, le=2.0)
    user: Union[str, None] = None
    logit_bias: Union[Annotated[dict[str, float], Field(max_length=0)], None] = Field(
        None, description="not supported: only null or {}")
    # vLLM's extras
    top_k: Union[integer(ge=-1, le=2**31 - 1), None] = Field(0, description="vLLM's extra; 0 or -1: off")
    min_p: Union[float, None] = Field(0.0, ge=0.0, le=1.0, description="vLLM's extra")
    min_tokens: Union[integer(ge=0, le=2**31 - 1), None] = Field(0, description="vLLM's extra; at most max_tokens")
    ignore_eos: Union[bool, None] = Field(False, description="vLLM's extra")
    repetition_penalty: Union[float, None] = Field(1.0, gt=0.0, description="vLLM's extra")
    stop_token_ids: Union[Annotated[list[integer(ge=0, le=INT64_MAX)], Field(max_length=1024)],
                          None] = Field(None, description="vLLM's extra")
    skip_special_tokens: Union[bool, None] = Field(True, description="vLLM's extra")
    include_stop_str_in_output: Union[bool, None] = Field(False, description="vLLM's extra")
    return_tokens_as_token_ids: Union[bool, None] = Field(
        False, description="vLLM's extra: logprob tokens as 'token_id:<id>'")


def _prompt_type(vocab_size: int | None) -> Any:
    token = integer(ge=0) if vocab_size is None else integer(ge=0, lt=vocab_size)
    union = Union[NonEmptyStr,
                  Annotated[list[NonEmptyStr], Field(min_length=1)],
                  Annotated[list[token], Field(min_length=1)],
                  Annotated[list[Annotated[list[token], Field(min_length=1)]], Field(min_length=1)]]
    limit = f" in [0, {vocab_size})" if vocab_size is not None else ""
    return Annotated[union, WrapValidator(_one_error(
        f"prompt must be a non-empty string, a list of non-empty strings, a list of token ids{limit}, or a "
        "list of such lists"))]


_PROMPT_DOC = ("text, texts, token ids or lists of token ids; null: generate from the start of a document "
               "(the model's BOS token, or its end-of-text token)")


def _example(**body: Any):
    """``json_schema_extra`` giving one example request, for the class's own model name."""
    def add(schema: dict[str, Any], cls: type[BaseModel]) -> None:
        args = getattr(cls.model_fields["model"].annotation, "__args__", None)
        schema["examples"] = [{"model": args[0] if args else "MODEL", **body}]
    return add


_NULL_ONLY = "not supported: only null"


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=_example(prompt="The capital of France is", temperature=0))

    prompt: Union[_prompt_type(None), None] = Field(description=_PROMPT_DOC)
    logprobs: Union[integer(ge=0, le=MAX_LOGPROBS), None] = Field(None,
                                       description="alternatives per token besides the sampled one")
    echo: Union[only(False), None] = Field(False, description="not supported: only false")
    best_of: Union[integer(ge=1, le=MAX_N), None] = Field(None, description="supported only equal to n")
    suffix: None = Field(None, description=_NULL_ONLY)


class TextPart(_Body):
    type: Literal["text"]
    text: str


Content = Annotated[Union[str, Annotated[list[TextPart], Field(min_length=1)]], WrapValidator(_one_error(
    "content must be a string or a non-empty list of text parts ({'type': 'text', 'text': ...})"))]


class SystemMessage(_Body):
    role: Literal["system"]
    content: Content
    name: Union[str, None] = None


class DeveloperMessage(_Body):
    role: Literal["developer"]
    content: Content
    name: Union[str, None] = None


class UserMessage(_Body):
    role: Literal["user"]
    content: Content
    name: Union[str, None] = None


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: Union[Content, None] = None
    name: Union[str, None] = None


class ToolMessage(_Body):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage],
                    Field(discriminator="role")]


class ResponseFormatText(_Body):
    type: Literal["text"]


class ChatRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=_example(messages=[{"role": "user", "content": "Name three colors."}]))

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Union[integer(ge=1), None] = Field(None, description="max_tokens' newer name")
    logprobs: Union[bool, None] = False
    top_logprobs: Union[integer(ge=0, le=MAX_CHAT_TOP_LOGPROBS), None] = Field(None, description="needs logprobs")
    tools: Union[Annotated[list[dict[str, Any]], Field(max_length=0)], None] = Field(
        None, description="not supported: only null or []")
    tool_choice: Union[only("none"), None] = Field(None, description="not supported: only null or 'none'")
    parallel_tool_calls: Union[bool, None] = None
    response_format: Union[ResponseFormatText, None] = Field(None, description="only {'type': 'text'}")
    add_generation_prompt: Union[bool, None] = Field(True, description="vLLM's extra")
    # OpenAI's nullable fields that pdserve does not implement: null (or their default) only
    store: Union[only(False), None] = Field(False, description="not supported: only false or null")
    audio: None = Field(None, description=_NULL_ONLY)
    metadata: None = Field(None, description=_NULL_ONLY)
    modalities: None = Field(None, description=_NULL_ONLY)
    moderation: None = Field(None, description=_NULL_ONLY)
    prediction: None = Field(None, description=_NULL_ONLY)
    prompt_cache_key: None = Field(None, description=_NULL_ONLY)
    prompt_cache_retention: None = Field(None, description=_NULL_ONLY)
    reasoning_effort: None = Field(None, description=_NULL_ONLY)
    safety_identifier: None = Field(None, description=_NULL_ONLY)
    service_tier: None = Field(None, description=_NULL_ONLY)
    verbosity: None = Field(None, description=_NULL_ONLY)


def request_types(limits: Limits) -> tuple[type[CompletionRequest], type[ChatRequest]]:
    """This deployment's request types: ``model`` is the served model, ``max_tokens`` at most the cap,
    token ids inside the vocabulary. Subclasses, named as their bases, so the document's names stay."""
    model = (Literal[limits.served_model], Field(description="the served model's id (GET /v1/models)"))
    max_tokens = (Union[integer(ge=1, le=limits.max_tokens_cap), None], Field(None, description=(
        "most tokens to generate; prompt + max_tokens must fit the context. Default: 16 for completions; "
        f"for chat, what fits the context, at most {limits.max_tokens_cap}")))
    completion = create_model(
        "CompletionRequest", __base__=CompletionRequest, __module__=__name__, model=model, max_tokens=max_tokens,
        prompt=(Union[_prompt_type(limits.vocab_size), None], Field(description=_PROMPT_DOC)))
    chat = create_model(
        "ChatRequest", __base__=ChatRequest, __module__=__name__, model=model, max_tokens=max_tokens,
        max_completion_tokens=(Union[integer(ge=1, le=limits.max_tokens_cap), None],
                               Field(None, description="max_tokens' newer name")))
    return completion, chat


class KVDigestsRequest(_Body):
    """POST /debug/kv_digests (only with --enable-debug-endpoints)."""

    prompt_token_ids: Annotated[list[integer(ge=0, le=INT64_MAX)], Field(max_length=1 << 20)]


class _Decision(_Body):
    reason: str = Field("operator", description="logged, and shown in /v1/cluster's elastic decisions")


class MoveCores(_Decision):
    """Give cores from one worker to another: each keeps the listed cores ([] parks a worker)."""

    kind: Literal["MoveCores"]
    src: str = Field(description="the giving worker's id")
    dst: str = Field(description="the receiving worker's id")
    src_cores: Annotated[list[integer(ge=0, le=65535)], Field(max_length=4096)]
    dst_cores: Annotated[list[integer(ge=0, le=65535)], Field(max_length=4096)]


class ChangeRole(_Decision):
    """What the router sends a worker from now on (the requests running there finish there)."""

    kind: Literal["ChangeRole"]
    worker_id: str
    role: Literal["prefill", "decode", "both"]


class SetStepTarget(_Decision):
    """A worker's step-time target, seconds (null: none)."""

    kind: Literal["SetStepTarget"]
    worker_id: str
    step_target_s: Union[Annotated[float, Field(gt=0)], None]


class ElasticDecision(RootModel[Annotated[Union[MoveCores, ChangeRole, SetStepTarget], Field(discriminator="kind")]]):
    """POST /debug/elastic (only with --enable-debug-endpoints): one decision, carried out as the elastic
    controller carries out its own."""
