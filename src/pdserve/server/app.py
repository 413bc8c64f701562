"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics (and, from
server/dashboard.py, /v1/cluster and /dashboard).

Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input,
401 for a missing or wrong API key, 429/503 with Retry-After under overload or without live workers.
A streaming request waits for its first event before answering, so early errors keep their status;
later errors arrive as an error chunk. A client that disconnects has its request aborted on every worker.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.runtime import freeze_startup_objects
from pdserve.errors import InvalidRequestError, OverloadedError, PdserveError
from pdserve.server import openai_protocol as op
from pdserve.server.client import FrontendClient
from pdserve.server.dashboard import dashboard_router
from pdserve.server.metrics import Metrics
from pdserve.server.serving import SSE_DONE, Serving, sse

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def create_app(client: FrontendClient, served_model: str, tokenizer_loader, api_key: str | None = None,
               enable_debug: bool = False, monitor_options=None) -> FastAPI:
    """``tokenizer_loader()`` returns the tokenizer (called once, at startup, after the workers answer)."""
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        info = client.model_info()
        metrics = Metrics(served_model, lambda: [c.stats for c in client.conns.values() if c.is_alive])
        metrics.bind_attainment(client.attainment)
        client.metrics = metrics
        tokenizer = tokenizer_loader()
        max_model_len = info.max_model_len if info else 2048
        state["serving"] = Serving(client, tokenizer, served_model, max_model_len, metrics,
                                   getattr(tokenizer, "vocab_size", None))
        state["metrics"] = metrics
        state["created"] = int(time.time())
        freeze_startup_objects()  # the tokenizer and app are built: no full GC pass walks them mid-request
        yield
        await client.stop()

    app = FastAPI(title="pdserve", lifespan=lifespan)

    def denied(request: Request) -> JSONResponse | None:
        """401 unless the request carries the API key (a check per route, not an HTTP middleware: those
        hide client disconnects from the routes)."""
        if not api_key:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            return None
        return JSONResponse(op.error_body("Incorrect or missing API key (Authorization: Bearer ...)",
                                          "invalid_request_error", None, "invalid_api_key"), 401)

    app.include_router(dashboard_router(client, denied, monitor_options))  # /v1/cluster, /dashboard

    @app.get("/v1/models")
    async def models(request: Request):
        if (refusal := denied(request)) is not None:
            return refusal
        info = client.model_info()
        return {"object": "list", "data": [{
            "id": served_model, "object": "model", "created": state.get("created", 0), "owned_by": "pdserve",
            "max_model_len": info.max_model_len if info else None}]}

    @app.get("/health")
    async def health():
        body = client.health()
        return JSONResponse(body, 200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state["metrics"].render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        if (refusal := denied(request)) is not None:
            return refusal
        try:
            req = op.parse_completion(await request.body())
            _check_model(req.model, served_model)
            prompts = state["serving"].prepare_completion(req)
        except PdserveError as e:
            return _error_response(e)
        return await _respond(state["serving"], req, prompts, False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (refusal := denied(request)) is not None:
            return refusal
        try:
            req = op.parse_chat(await request.body())
            _check_model(req.model, served_model)
            prompts = state["serving"].prepare_chat(req)
        except PdserveError as e:
            return _error_response(e)
        return await _respond(state["serving"], req, prompts, True, request)

    if enable_debug:
        @app.post("/debug/kv_digests")
        async def kv_digests(request: Request):
            """Per worker, a digest of each cached full block of the prompt (token ids) in the body."""
            from pdserve.hashing import hash_block_tokens

            body = await request.json()
            info = client.model_info()
            hashes = hash_block_tokens(body["prompt_token_ids"], info.block_size if info else 16)
            return {"block_hashes": [str(h) for h in hashes], "workers": await client.kv_digests(hashes)}

        @app.post("/debug/check_integrity")
        async def check_integrity():
            """Per worker, its KV bookkeeping check: "" when free + cached + used == total and every count
            is consistent, else the failure."""
            return {"workers": await client.check_integrity()}

        @app.post("/debug/elastic")
        async def elastic_decision(request: Request):
            """Carry out one decision as the elastic controller would (``{"kind": "MoveCores", "src", "dst",
            "src_cores", "dst_cores"}``, ``{"kind": "ChangeRole", "worker_id", "role"}``, ``{"kind":
            "SetStepTarget", "worker_id", "step_target_s"}``)."""
            from pdserve.server.elastic import carry_out, decision_from_json

            try:
                decision = decision_from_json(await request.json())
            except ValueError as e:
                return _error_response(InvalidRequestError(str(e)))
            carry_out(client, [decision])
            if client.elastic is not None:
                client.elastic.controller.record(time.monotonic(), [decision])
            return {"ok": True, "decision": decision.reason}

    return app


async def _respond(serving: Serving, req, prompts, chat: bool, http_request: Request):
    as_ids = req.return_tokens_as_token_ids
    if not req.stream:
        task = asyncio.create_task(serving.complete(req, prompts, chat, as_ids))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await http_request.is_disconnected():
                task.cancel()  # the client is gone: abort the request on every worker
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return Response(status_code=499)
        try:
            return task.result()
        except PdserveError as e:
            return _error_response(e)
    chunks = serving.stream(req, prompts, chat, as_ids)
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except PdserveError as e:
        await chunks.aclose()
        return _error_response(e)

    async def body():
        try:
            if first is not None:
                yield sse(first)
            async for chunk in chunks:
                yield sse(chunk)
        except PdserveError as e:
            yield sse(op.error_body(str(e), e.error_type, getattr(e, "param", None), e.http_status))
        finally:
            await chunks.aclose()  # client gone: aborts the request on every worker
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _check_model(model: str, served_model: str) -> None:
    if model != served_model:
        raise InvalidRequestError(f"The model `{model}` does not exist; this server serves `{served_model}`",
                                  "model")


def _error_response(e: PdserveError) -> JSONResponse:
    code = "model_not_found" if getattr(e, "param", None) == "model" else None
    headers = {}
    status = e.http_status
    if isinstance(e, OverloadedError) or status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(getattr(e, "retry_after_s", 1.0))))
    if status >= 500 and status != 503:
        logger.error("request failed: %s", e)
    return JSONResponse(op.error_body(str(e), e.error_type, getattr(e, "param", None), code), status,
                        headers=headers)
