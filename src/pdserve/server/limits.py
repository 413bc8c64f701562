"""What one deployment allows a request: the served model, the context, the output-token cap, the
vocabulary. Plain values (no pydantic), so the command line can read its defaults cheaply."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 16  # completions without max_tokens (OpenAI's and vLLM's default)
DEFAULT_MAX_TOKENS_CAP = 4096  # the server's bound on any request's output tokens (--max-tokens-cap)


@dataclass(frozen=True)
class Limits:
    """What a deployment puts into its request types."""

    served_model: str
    max_model_len: int
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be >= 1, got {self.max_tokens_cap}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
