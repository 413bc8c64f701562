"""Response bodies as pydantic models: published in /openapi.json and checked against the bodies the
server sends (tests validate real responses with them; the schema fuzz checks every response it gets).

The server builds its bodies as plain dicts on the hot path (one per streamed chunk); these models are
their contract, strict (``additionalProperties: false``) so that a field added to a body without being
added here fails the tests.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Union[Literal["stop", "length", "abort"], None]
StopReason = Union[int, str, None]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors ---------------------------------------------------------------------------------------------


class ErrorInfo(_Out):
    message: str
    type: str = Field(description="invalid_request_error, overloaded, worker_unavailable, internal_error, ...")
    param: Union[str, None] = Field(description="the request field at fault, if one is")
    code: Union[str, int, None] = Field(description="e.g. invalid_api_key, model_not_found")


class ErrorResponse(_Out):
    """OpenAI's error body; also the body of a stream's error chunk."""

    error: ErrorInfo


# ---- shared ---------------------------------------------------------------------------------------------


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Union[PromptTokensDetails, None] = None


# ---- completions ----------------------------------------------------------------------------------------


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[Union[dict[str, float], None]]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Union[CompletionLogprobs, None]
    finish_reason: FinishReason
    stop_reason: StopReason = Field(None, description="vLLM's extra: the stop string or token id that ended it")


class Completion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Out):
    """One `data:` event of a streamed completion; the last may carry only usage (choices empty)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Union[Usage, None] = None


# ---- chat completions -----------------------------------------------------------------------------------


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: Union[list[int], None]


class TokenLogprob(_Out):
    token: str
    logprob: float
    bytes: Union[list[int], None]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Out):
    content: Union[list[TokenLogprob], None]


class AssistantReply(_Out):
    role: Literal["assistant"]
    content: Union[str, None]


class ChatChoice(_Out):
    index: int
    message: AssistantReply
    logprobs: Union[ChoiceLogprobs, None]
    finish_reason: FinishReason
    stop_reason: StopReason = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Out):
    role: Union[Literal["assistant"], None] = None
    content: Union[str, None] = None


class ChatChunkChoice(_Out):
    index: int
    delta: Delta
    logprobs: Union[ChoiceLogprobs, None]
    finish_reason: FinishReason
    stop_reason: StopReason = None


class ChatCompletionChunk(_Out):
    """One `data:` event of a streamed chat completion; the last may carry only usage (choices empty)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Union[Usage, None] = None


# ---- models, health -------------------------------------------------------------------------------------


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: Union[int, None] = None


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class WorkerHealth(_Out):
    """One worker as the frontend sees it (a worker that never answered has only address, alive, role)."""

    address: str
    alive: bool
    role: Union[Literal["prefill", "decode", "both"], None]
    worker_id: Union[str, None] = None
    pid: Union[int, None] = None
    host: Union[str, None] = None
    last_seen_s: Union[float, None] = Field(None, description="seconds since its last message")
    num_inflight: Union[int, None] = None
    num_running: Union[int, None] = None
    num_waiting: Union[int, None] = None
    num_awaiting_kv: Union[int, None] = None
    num_held_kv: Union[int, None] = None
    kv_usage: Union[float, None] = None
    num_blocks: Union[int, None] = None
    num_free_blocks: Union[int, None] = None


class Health(_Out):
    """``status`` always; the rest only with the API key when one is set."""

    status: Literal["ok", "unavailable"]
    mode: Union[str, None] = None
    num_inflight: Union[int, None] = None
    workers: Union[list[WorkerHealth], None] = None


class KVDigests(_Out):
    """Per worker, a digest of each cached full block of the prompt ("" where a block is not cached)."""

    block_hashes: list[str]
    workers: dict[str, list[str]]


# ---- the cluster's state: GET /v1/cluster ---------------------------------------------------------------


class _Open(BaseModel):
    """A part of /v1/cluster: the fields listed here always, and a later part of the system may add its own
    (the dashboard shows what it knows and ignores the rest, server/cluster_status.py)."""

    model_config = ConfigDict(extra="allow")


class WorkerStatus(WorkerHealth):
    """One worker in /v1/cluster: its /health entry, the router's view of it (role, cores, parked, step
    target, the step costs path choice reads), its device, busy time and price."""

    model_config = ConfigDict(extra="allow")
    cores: Union[list[int], None] = Field(None, description="the cores it runs on ([] parked; null: not pinned)")
    is_parked: Union[bool, None] = None
    step_target_s: Union[float, None] = None
    queued_prefill_tokens: Union[int, None] = None
    prefill_token_s: Union[float, None] = None
    decode_step_s: Union[float, None] = None
    step_overhead_s: Union[float, None] = Field(None, description="seconds between two forward passes of the "
                                                "busy engine; stall-free chunking leaves them out of its step target")
    device: Union[str, None] = None
    device_name: Union[str, None] = None
    num_cores: Union[int, None] = None
    hardware: Union[str, None] = None
    prefix_cache_hit_rate: Union[float, None] = None
    tier_hit_rates: Union[dict[str, float], None] = None
    num_prompt_tokens: Union[int, None] = None
    num_generation_tokens: Union[int, None] = None
    uptime_s: Union[float, None] = None
    busy_s: Union[float, None] = None
    prefill_busy_s: Union[float, None] = None
    core_s: Union[float, None] = None
    busy_fraction: Union[float, None] = None
    price_per_hour: Union[float, None] = None
    price_source: Union[str, None] = Field(None, description='"--price-per-hour", "catalogue:<entry>" or "unknown"')
    num_devices: Union[float, None] = Field(None, description="devices in the price catalogue's unit")


class ElasticDecisionRecord(_Open):
    unix_s: float
    kind: Literal["MoveCores", "ChangeRole", "SetStepTarget"]
    reason: str


class ElasticHold(_Open):
    move: str = Field(description='"cores SRC DST" or "role WORKER ROLE"')
    until_unix_s: float


class ElasticStatus(_Open):
    """The elastic controller (mode auto): its objectives, the last window and its recent decisions."""

    objectives: dict[str, Union[float, None]]
    window: dict[str, Union[float, int, None]]
    starving: Union[str, None] = Field(None, description="the phase missing its objective while the other has slack")
    decisions: list[ElasticDecisionRecord]
    held: list[ElasticHold] = Field(default_factory=list,
                                    description="moves undone soon after they were made, not made again until then")


class ClusterStatus(_Open):
    """GET /v1/cluster: the cluster's state as one document (docs/monitoring.md has each part)."""

    object: Literal["cluster"]
    unix_s: float
    mode: Union[Literal["auto", "colocated", "disaggregated"], None] = Field(
        description="null before any worker answered")
    num_inflight: int
    path_choice: bool = Field(description="whether each request's prefill place is chosen by predicted TTFT")
    workers: list[WorkerStatus]
    rates: dict[str, Any] = Field(description="requests and tokens per second over the last window")
    latency: dict[str, Any] = Field(description="TTFT and TPOT quantiles over the last window")
    attainment: dict[str, Any] = Field(description="the frontend's rolling SLO attainment, per phase")
    slo: Union[dict[str, Any], None] = Field(description="objectives and attainment; null without objectives")
    cost: dict[str, Any] = Field(description="price now, cost in total and over the rolling windows, and the "
                                 "planner's figures for this layout (planned; null when none)")
    elastic: Union[ElasticStatus, None] = Field(description="null when the controller is off")
    history: list[dict[str, Any]] = Field(description="a point every few seconds (?history_since: newer only)")


# ---- debug routes (--enable-debug-endpoints) ------------------------------------------------------------


class IntegrityReport(_Out):
    """Per worker, its KV bookkeeping check: "" when consistent, else the failure."""

    workers: dict[str, str]


class ElasticResult(_Out):
    ok: Literal[True]
    decision: str = Field(description="the decision's reason")
