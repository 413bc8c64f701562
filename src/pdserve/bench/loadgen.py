"""Asyncio load generator for any OpenAI-compatible /v1/completions endpoint (pdserve, vLLM, llama.cpp).

Each request is a streaming completion with the prompt as token ids::

    {"model": M, "prompt": [ids], "max_tokens": N, "stream": true, "temperature": 0,
     "stream_options": {"include_usage": true}, "ignore_eos": true}

The arrival time of every content chunk is recorded (``time.perf_counter`` relative to the start of
the run). Output tokens come from the final ``usage`` when the server sends it, else from the number
of content chunks. Server errors (HTTP status, error events, dropped streams, timeouts, connection
failures) are recorded on the request, never raised. A run is bounded by ``max_duration_s``: no request
is sent after it, and requests still running when it is reached are cut off (error "max duration").
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from pdserve.bench.metrics import RequestRecord
from pdserve.bench.workloads import RequestShape

logger = logging.getLogger(__name__)

_ERROR_BODY_CHARS = 300


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str
    model: str
    api_key: str | None = None
    ignore_eos: bool = True
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def completions_url(self) -> str:
        return api_url(self.base_url, "completions")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class LoadResult:
    records: list[RequestRecord]  # sent requests, in index order
    duration_s: float  # start of the run to the end of the last request
    num_not_sent: int  # requests never sent because max_duration_s ran out
    clock_origin_s: float = 0.0  # time.perf_counter() at the run's start: record times are relative to it


def api_url(base_url: str, path: str) -> str:
    """``http://h:p`` or ``http://h:p/v1`` + ``completions`` -> ``http://h:p/v1/completions``."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return f"{base}/{path}"


def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id listed by ``GET /v1/models``; raises RuntimeError if there is none."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(api_url(base_url, "models"), headers=headers, timeout=timeout_s)
        resp.raise_for_status()
        models = resp.json().get("data") or []
    except (httpx.HTTPError, ValueError) as e:
        raise RuntimeError(f"cannot list models at {base_url}: {e}") from e
    if not models:
        raise RuntimeError(f"{base_url} lists no models; pass --model")
    return str(models[0]["id"])


def run_load(
    shapes: Sequence[RequestShape],
    prompt_fn: Callable[[RequestShape], list[int]],
    endpoint: EndpointConfig,
    *,
    concurrency: int | None = None,
    max_duration_s: float | None = None,
    show_progress: bool = True,
    progress_desc: str = "bench",
) -> LoadResult:
    """Blocking wrapper around ``run_load_async`` (starts its own event loop)."""
    return asyncio.run(
        run_load_async(
            shapes,
            prompt_fn,
            endpoint,
            concurrency=concurrency,
            max_duration_s=max_duration_s,
            show_progress=show_progress,
            progress_desc=progress_desc,
        )
    )


async def run_load_async(
    shapes: Sequence[RequestShape],
    prompt_fn: Callable[[RequestShape], list[int]],
    endpoint: EndpointConfig,
    *,
    concurrency: int | None = None,
    max_duration_s: float | None = None,
    show_progress: bool = True,
    progress_desc: str = "bench",
) -> LoadResult:
    """Send ``shapes`` open loop at their ``arrival_s`` (``concurrency=None``) or closed loop."""
    if concurrency is None and any(s.arrival_s is None for s in shapes):
        raise ValueError("open-loop runs need an arrival time for every request (or pass concurrency)")
    max_duration_s = math.inf if max_duration_s is None else max_duration_s
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(endpoint.request_timeout_s, connect=min(30.0, endpoint.request_timeout_s))
    progress = tqdm(total=len(shapes), desc=progress_desc, unit="req", disable=not show_progress, leave=False)
    records: list[RequestRecord] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=endpoint.headers()) as client:
        run = _Run(client, endpoint, prompt_fn, time.perf_counter(), max_duration_s, records, progress)
        if concurrency is None:
            await run.open_loop(shapes)
        else:
            await run.closed_loop(shapes, concurrency)
        elapsed = time.perf_counter() - run.t0
    progress.close()
    records.sort(key=lambda r: r.index)
    ends = [r.end_s for r in records if r.end_s is not None]
    duration = max(ends) if ends else elapsed
    return LoadResult(records=records, duration_s=duration, num_not_sent=len(shapes) - len(records),
                      clock_origin_s=run.t0)


class _Run:
    """One run's shared state: client, clock origin, deadline, collected records."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        endpoint: EndpointConfig,
        prompt_fn: Callable[[RequestShape], list[int]],
        t0: float,
        max_duration_s: float,
        records: list[RequestRecord],
        progress: tqdm,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.prompt_fn = prompt_fn
        self.t0 = t0
        self.deadline = t0 + max_duration_s
        self.records = records
        self.progress = progress

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def open_loop(self, shapes: Sequence[RequestShape]) -> None:
        tasks: list[asyncio.Task[None]] = []
        for shape in sorted(shapes, key=lambda s: (s.arrival_s or 0.0, s.index)):
            send_at = self.t0 + (shape.arrival_s or 0.0)
            if send_at >= self.deadline:
                break
            delay = send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(shape)))
        if tasks:
            await asyncio.gather(*tasks)

    async def closed_loop(self, shapes: Sequence[RequestShape], concurrency: int) -> None:
        queue = iter(sorted(shapes, key=lambda s: s.index))

        async def user() -> None:
            for shape in queue:  # the shared iterator hands each shape to exactly one user
                if time.perf_counter() >= self.deadline:
                    return
                await self.send(shape)

        await asyncio.gather(*(user() for _ in range(concurrency)))

    async def send(self, shape: RequestShape) -> None:
        prompt = self.prompt_fn(shape)
        record = RequestRecord(
            index=shape.index, input_len=len(prompt), output_len=shape.output_len, send_s=0.0
        )
        self.records.append(record)
        budget_s = min(self.endpoint.request_timeout_s, self.deadline - time.perf_counter())
        cut_by_deadline = budget_s < self.endpoint.request_timeout_s
        record.send_s = self.now()
        try:
            async with asyncio.timeout(budget_s):
                await self._stream(prompt, shape.output_len, record)
        except TimeoutError:
            _fail(record, "max duration" if cut_by_deadline else "timeout", f"after {budget_s:.1f} s")
        except httpx.TimeoutException as e:
            _fail(record, "timeout", repr(e))
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            _fail(record, "dropped stream", repr(e))
        except httpx.ConnectError as e:
            _fail(record, "connect error", repr(e))
        except (httpx.HTTPError, httpx.StreamError) as e:
            _fail(record, "http error", repr(e))
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # a malformed event
            _fail(record, "bad response", repr(e))
        finally:
            if record.end_s is None:
                record.end_s = self.now()
            self.progress.update(1)
        if record.error is not None:
            logger.debug("request %d failed: %s (%s)", record.index, record.error, record.error_detail)

    async def _stream(self, prompt: list[int], max_tokens: int, record: RequestRecord) -> None:
        payload = {
            "model": self.endpoint.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint.ignore_eos:
            payload["ignore_eos"] = True
        num_chunks = 0
        usage_tokens: int | None = None
        is_finished = False
        async with self.client.stream("POST", self.endpoint.completions_url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                _fail(record, f"HTTP {resp.status_code}", body[:_ERROR_BODY_CHARS])
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    is_finished = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    _fail(record, "bad event", data[:_ERROR_BODY_CHARS])
                    return
                if "error" in event:
                    _fail(record, "error event", json.dumps(event["error"])[:_ERROR_BODY_CHARS])
                    return
                choices = event.get("choices") or []
                if choices:
                    finish_reason = choices[0].get("finish_reason")
                    if choices[0].get("text") or finish_reason is None:  # not a bare end-of-stream chunk
                        record.chunk_times_s.append(self.now())
                        num_chunks += 1
                    if finish_reason:
                        is_finished = True
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
        record.end_s = self.now()
        record.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
        if not is_finished:
            _fail(record, "dropped stream", "stream ended without [DONE] or finish_reason")


def _fail(record: RequestRecord, error: str, detail: str) -> None:
    record.error = error
    record.error_detail = detail
