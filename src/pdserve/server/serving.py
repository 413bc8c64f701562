"""Completions and chat completions: from a validated request to OpenAI response bodies or SSE chunks.

Detokenization and stop strings happen here (``TextState``, shared with the offline LLM); a stop string
ends the choice at once and aborts its request on the workers.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pdserve.engine.output_processor import TextState
from pdserve.engine.outputs import EngineOutput, TokenLogprobs
from pdserve.errors import PdserveError
from pdserve.server import openai_protocol as op
from pdserve.server.client import FrontendClient
from pdserve.server.metrics import Metrics
from pdserve.protocol import TokenOutput


@dataclass
class Choice:
    """One output sequence (prompt p, sample i) as it streams."""

    index: int
    state: TextState
    prompt_index: int
    num_prompt_tokens: int
    first_token_s: float | None = None
    sent_role: bool = False
    logprob_tokens: list = field(default_factory=list)  # (token_id, logprob, top) in order


class Serving:
    def __init__(self, client: FrontendClient, tokenizer, model_name: str, max_model_len: int,
                 metrics: Metrics | None = None, vocab_size: int | None = None) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.vocab_size = vocab_size

    # -- entry points --------------------------------------------------------------------------------
    def prepare_completion(self, req: op.CompletionRequest) -> list[op.Prompt]:
        """Validate what needs the tokenizer and the model (raises InvalidRequestError)."""
        prompts = op.prompts(req, self.tokenizer, self.vocab_size)
        for pr in prompts:
            op.check_length(len(pr.token_ids), req.max_tokens, self.max_model_len)
        op.sampling_params(req, req.logprobs)  # validates ranges
        return prompts

    def prepare_chat(self, req: op.ChatRequest) -> list[op.Prompt]:
        ids = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt)
        op.check_length(len(ids), req.max_tokens, self.max_model_len)
        op.sampling_params(req, _chat_logprobs(req))
        return [op.Prompt(list(ids))]

    async def stream(self, req: op.CompletionRequest | op.ChatRequest, prompts: list[op.Prompt], chat: bool,
                     as_token_ids: bool = False) -> AsyncIterator[dict]:
        """Chunk bodies (dicts) of a streaming response; the last one carries usage when asked. An error
        after the first chunk comes as an ``{"error": ...}`` body."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"
        choices_out: list[Choice] = []
        run = self._run(req, prompts, chat, rid, choices_out)
        try:
            async for item in run:
                body = self._chunk_body(req, item, chat, as_token_ids)
                if body is not None:
                    yield {"id": rid, "object": obj, "created": created, "model": self.model_name,
                           "choices": [body]}
        finally:
            await run.aclose()
        if include_usage:
            yield {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [],
                   "usage": _usage(choices_out, prompts)}

    def _chunk_body(self, req, item, chat: bool, as_token_ids: bool) -> dict | None:
        choice, delta_text, new_lps, finished = item
        if chat:
            body_choice: dict = {"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": None}
            if not choice.sent_role:
                body_choice["delta"]["role"] = "assistant"
                choice.sent_role = True
            if delta_text or not finished:
                body_choice["delta"]["content"] = delta_text
            if new_lps:
                body_choice["logprobs"] = {"content": self._chat_logprobs(new_lps, req, as_token_ids)}
        else:
            body_choice = {"index": choice.index, "text": delta_text, "logprobs": None, "finish_reason": None}
            if new_lps:
                body_choice["logprobs"] = self._completion_logprobs(new_lps, as_token_ids)
        if finished:
            body_choice["finish_reason"] = choice.state.finish_reason
            body_choice["stop_reason"] = choice.state.stop_reason
        if not finished and not delta_text and not new_lps and body_choice.get("delta", {}).get("role") is None:
            return None
        return body_choice

    async def complete(self, req: op.CompletionRequest | op.ChatRequest, prompts: list[op.Prompt], chat: bool,
                       as_token_ids: bool = False) -> dict:
        """The whole (non-streaming) response body."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        choices: list[Choice] = []
        run = self._run(req, prompts, chat, rid, choices)
        try:
            async for _ in run:
                pass
        finally:
            await run.aclose()
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            lps = c.logprob_tokens
            if chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.state.text},
                            "logprobs": {"content": self._chat_logprobs(lps, req, as_token_ids)} if req.logprobs
                            else None,
                            "finish_reason": c.state.finish_reason, "stop_reason": c.state.stop_reason})
            else:
                out.append({"index": c.index, "text": c.state.text,
                            "logprobs": self._completion_logprobs(lps, as_token_ids) if req.logprobs is not None
                            else None,
                            "finish_reason": c.state.finish_reason, "stop_reason": c.state.stop_reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": out, "usage": _usage(choices, prompts)}

    # -- the shared loop -----------------------------------------------------------------------------
    async def _run(self, req, prompts: list[op.Prompt], chat: bool, rid: str, choices: list[Choice]):
        """Yields ``(choice, delta_text, new_logprob_tokens, finished)``; raises PdserveError when a
        choice fails (the caller turns it into an HTTP error or an error chunk)."""
        num_logprobs = _chat_logprobs(req) if chat else req.logprobs
        base = op.sampling_params(req, num_logprobs)
        start = time.monotonic()
        streams = []
        for pi, pr in enumerate(prompts):
            params = []
            for i in range(req.n):
                sp = _copy_params(base, i)
                params.append(sp)
                choices.append(Choice(pi * req.n + i, TextState(self.tokenizer, pr.token_ids, sp), pi,
                                      len(pr.token_ids)))
            streams.append(self.client.generate(pr.token_ids, params, request_id=f"{rid}-{pi}"))
        merged = _merge(streams)
        try:
            remaining = len(choices)
            async for pi, event in merged:
                choice = choices[pi * req.n + event.index]
                if choice.state.finished:
                    continue
                if event.error is not None:
                    raise event.error
                out = event.output
                if choice.first_token_s is None and out.new_token_ids:
                    choice.first_token_s = time.monotonic()
                delta = choice.state.update(_engine_output(out))
                new_lps = []
                if out.logprobs:
                    new_lps = [(e.token_id, e.logprob, list(zip(e.top_ids, e.top_logprobs))) for e in out.logprobs]
                    new_lps = new_lps[:max(0, len(choice.state.token_ids) - len(choice.logprob_tokens))]
                    choice.logprob_tokens.extend(new_lps)
                finished = choice.state.finished
                if finished:
                    remaining -= 1
                    if out.finish_reason is None:  # a stop string, seen here: stop the workers
                        self.client.abort_nowait([event.request_id])
                    self._observe(choice, start)
                yield choice, delta, new_lps, finished
                if remaining == 0:
                    return
        finally:
            await merged.aclose()

    def _observe(self, choice: Choice, start: float) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        ttft = None if choice.first_token_s is None else choice.first_token_s - start
        self.metrics.observe_request(ttft, now - start, len(choice.state.token_ids), choice.state.finish_reason,
                                     choice.num_prompt_tokens, choice.state.num_cached_tokens)

    # -- logprob bodies ------------------------------------------------------------------------------
    def _token_str(self, token_id: int, as_token_ids: bool) -> str:
        return f"token_id:{token_id}" if as_token_ids else self.tokenizer.decode([token_id],
                                                                                skip_special_tokens=False)

    def _completion_logprobs(self, lps: list, as_token_ids: bool) -> dict:
        tokens, token_lps, top, offsets = [], [], [], []
        offset = 0
        for token_id, lp, alts in lps:
            s = self._token_str(token_id, as_token_ids)
            tokens.append(s)
            token_lps.append(lp)
            top.append({self._token_str(t, as_token_ids): v for t, v in alts} or None)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": top, "text_offset": offsets}

    def _chat_logprobs(self, lps: list, req, as_token_ids: bool) -> list[dict]:
        k = req.top_logprobs or 0
        out = []
        for token_id, lp, alts in lps:
            s = self._token_str(token_id, as_token_ids)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": (ts := self._token_str(t, as_token_ids)), "logprob": v,
                                          "bytes": list(ts.encode())} for t, v in alts[:k]]})
        return out


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---- private --------------------------------------------------------------------------------------------


async def _merge(streams: list) -> AsyncIterator:
    """Interleave several async generators as ``(stream_index, item)``; closing this closes them all."""
    import asyncio

    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, gen):
        try:
            async for item in gen:
                await queue.put((i, item))
        except PdserveError as e:
            from pdserve.server.client import RequestEvent

            await queue.put((i, RequestEvent(0, "", error=e)))
        finally:
            await queue.put((i, done))

    if len(streams) == 1:  # the common case: no tasks
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is done:
                live -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for g in streams:
            await g.aclose()


def _engine_output(out: TokenOutput) -> EngineOutput:
    lps = None
    if out.logprobs:
        lps = [TokenLogprobs(e.token_id, e.logprob, e.rank, list(zip(e.top_ids, e.top_logprobs)))
               for e in out.logprobs]
    return EngineOutput(out.request_id, list(out.new_token_ids), out.finish_reason, out.stop_reason,
                        out.num_prompt_tokens, out.num_cached_tokens, lps)


def _copy_params(base, i: int):
    import copy

    sp = copy.copy(base)
    sp.stop = list(base.stop)
    sp.stop_token_ids = list(base.stop_token_ids)
    if base.seed is not None and i:
        sp.seed = base.seed + i
    return sp


def _chat_logprobs(req: op.ChatRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


def _usage(choices: list[Choice], prompts: list[op.Prompt]) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion = sum(len(c.state.token_ids) for c in choices)
    n = max(1, len(choices) // max(1, len(prompts)))  # choices per prompt
    cached = sum(c.state.num_cached_tokens for c in choices if c.index % n == 0)  # once per prompt
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
