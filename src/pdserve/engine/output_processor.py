"""Builds a request's text from its token stream: incremental detokenization, stop strings, and the
text deltas that are safe to stream. Used by the offline ``LLM`` and by the HTTP frontend alike."""
from __future__ import annotations

from pdserve.engine.outputs import EngineOutput, TokenLogprobs
from pdserve.sampling_params import SamplingParams


class TextState:
    """One output sequence as it grows. ``update`` takes an engine delta and returns the new text that
    can be shown; when it meets a stop string it sets ``finish_reason`` and the caller aborts the request
    in the engine."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        from pdserve.model.tokenizer import IncrementalDetokenizer

        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self._emitted = 0  # characters of ``text`` already handed out
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: EngineOutput) -> str:
        if self.finished:
            return ""
        self.num_cached_tokens = out.num_cached_tokens
        for i, token_id in enumerate(out.new_token_ids):
            self.token_ids.append(token_id)
            if out.new_logprobs is not None and i < len(out.new_logprobs):
                self.logprobs.append(out.new_logprobs[i])
            start = max(0, len(self.text) - self._holdback)
            self.text += self.detokenizer.push([token_id])
            if self.params.stop and self._check_stop_strings(start):
                return self._take(final=True)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
        return self._take(final=self.finished)

    def _check_stop_strings(self, search_from: int) -> bool:
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            idx = self.text.find(stop, search_from)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        self.text = self.text[: idx + len(stop)] if self.params.include_stop_str_in_output else self.text[:idx]
        self.finish_reason = "stop"
        self.stop_reason = stop
        return True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
