"""What an engine step reports per request: new tokens and, at the end, why it finished."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    """Log-probability of one sampled token and the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class EngineOutput:
    """Delta for one request after one step (only requests that produced a token or finished)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    new_logprobs: list[TokenLogprobs] | None = None
    kv_block_ids: list[int] | None = None  # prefill role: the blocks held for transfer

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class KVReservation:
    """Blocks allocated for a request whose KV is loaded from outside (a remote prefill, a store): the
    blocks of tokens ``[num_cached_tokens, num_cached_tokens + num_external_tokens)`` are to be written, the
    leading ``num_cached_tokens`` are local prefix-cache hits."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int
    num_external_tokens: int = 0
