"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /openapi.json,
/docs, from server/dashboard.py /v1/cluster and /dashboard, and /debug/kv_digests, /debug/check_integrity and
/debug/elastic when asked for. Which of them need the API key: server/auth.py.

Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input, 401
for a missing or wrong API key, 404 for a model not served here or an unknown path, 429/503 with
Retry-After under overload or without live workers. A streaming request waits for its first event before
answering, so early errors keep their status; a later error arrives as an error chunk, and every stream
ends with ``data: [DONE]``. A client that disconnects has its request aborted on every worker.
Request bodies and prompts are never logged.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.runtime import freeze_startup_objects
from pdserve.errors import InvalidRequestError, OverloadedError, PdserveError
from pdserve.server import openai_protocol as op
from pdserve.server import openapi
from pdserve.server.api_types import ElasticDecision, KVDigestsRequest, request_types
from pdserve.server.limits import DEFAULT_MAX_TOKENS_CAP, Limits
from pdserve.server.client import FrontendClient
from pdserve.server.dashboard import dashboard_router
from pdserve.server.metrics import Metrics
from pdserve.server.auth import ApiKeyGuard, QuietErrors, is_authorized
from pdserve.server.serving import SSE_DONE, Serving, sse

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def create_app(client: FrontendClient, served_model: str, tokenizer_loader, api_key: str | None = None,
               enable_debug: bool = False, monitor_options=None,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP) -> FastAPI:
    """``tokenizer_loader()`` returns the tokenizer (called once, at startup, after the workers answer)."""
    state: dict = {}
    secured = bool(api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        info = client.model_info()
        metrics = Metrics(served_model, lambda: [c.stats for c in client.conns.values() if c.is_alive])
        metrics.bind_attainment(client.attainment)
        client.metrics = metrics
        tokenizer = tokenizer_loader()
        limits = Limits(served_model, info.max_model_len if info else 2048, max_tokens_cap,
                        getattr(tokenizer, "vocab_size", None))
        state["types"] = request_types(limits)
        state["serving"] = Serving(client, tokenizer, limits, metrics)
        state["metrics"] = metrics
        state["created"] = int(time.time())
        freeze_startup_objects()  # the tokenizer and app are built: no full GC pass walks them mid-request
        yield
        await client.stop()

    app = FastAPI(title="pdserve", version="1", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description="OpenAI-compatible API of a pdserve cluster")
    app.add_middleware(ApiKeyGuard, api_key=api_key)
    app.add_middleware(QuietErrors)  # added last: the outermost
    _add_error_handlers(app)

    app.include_router(dashboard_router(client, monitor_options, secured))  # /v1/cluster, /dashboard

    @app.post("/v1/completions", **openapi.generation_route("Completion", "CompletionChunk", "CompletionRequest",
                                                            secured))
    async def completions(request: Request):
        try:
            req = op.parse_completion(await request.body(), state["types"][0])
            prompts = state["serving"].prepare_completion(req)
        except PdserveError as e:
            return _error_response(e)
        return await _respond(state["serving"], req, prompts, False, request)

    @app.post("/v1/chat/completions", **openapi.generation_route("ChatCompletion", "ChatCompletionChunk",
                                                                 "ChatRequest", secured))
    async def chat_completions(request: Request):
        try:
            req = op.parse_chat(await request.body(), state["types"][1])
            prompts = state["serving"].prepare_chat(req)
        except PdserveError as e:
            return _error_response(e)
        return await _respond(state["serving"], req, prompts, True, request)

    @app.get("/v1/models", **openapi.json_route("ModelList", "The served model", secured))
    async def models():
        info = client.model_info()
        return {"object": "list", "data": [{
            "id": served_model, "object": "model", "created": state.get("created", 0), "owned_by": "pdserve",
            "max_model_len": info.max_model_len if info else None}]}

    @app.get("/health", **openapi.health_route(secured))
    async def health(request: Request):
        body = client.health()
        status = 200 if body["status"] == "ok" else 503
        if not is_authorized(api_key, request.headers.get("authorization")):
            body = {"status": body["status"]}  # details (pids, hosts, addresses) only with the key
        return JSONResponse(body, status)

    @app.get("/metrics", response_class=PlainTextResponse, **openapi.metrics_route(secured))
    async def metrics():
        return Response(state["metrics"].render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json():
        if app.openapi_schema is None:
            request_models = [*state["types"]] + ([KVDigestsRequest, ElasticDecision] if enable_debug else [])
            app.openapi_schema = openapi.openapi_document(app, request_models, secured)
        return JSONResponse(app.openapi_schema)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="pdserve API")

    if enable_debug:
        @app.post("/debug/kv_digests", **openapi.json_route("KVDigests", "Digests of the cached blocks", secured,
                                                            "KVDigestsRequest", (400,)))
        async def kv_digests(request: Request):
            """Per worker, a digest of each cached full block of the prompt (token ids) in the body."""
            from pdserve.hashing import hash_block_tokens

            try:
                body = op.parse_model(await request.body(), KVDigestsRequest)
            except InvalidRequestError as e:
                return _error_response(e)
            info = client.model_info()
            hashes = hash_block_tokens(body.prompt_token_ids, info.block_size if info else 16)
            return {"block_hashes": [str(h) for h in hashes], "workers": await client.kv_digests(hashes)}

        @app.post("/debug/check_integrity", **openapi.json_route("IntegrityReport", "Each worker's KV check",
                                                                  secured))
        async def check_integrity():
            """Per worker, its KV bookkeeping check: "" when free + cached + used == total and every count
            is consistent, else the failure."""
            return {"workers": await client.check_integrity()}

        @app.post("/debug/elastic", **openapi.json_route("ElasticResult", "The decision, carried out", secured,
                                                          "ElasticDecision", (400,)))
        async def elastic_decision(request: Request):
            """Carry out one decision as the elastic controller would (``{"kind": "MoveCores", "src", "dst",
            "src_cores", "dst_cores"}``, ``{"kind": "ChangeRole", "worker_id", "role"}``, ``{"kind":
            "SetStepTarget", "worker_id", "step_target_s"}``)."""
            from pdserve.server.elastic import carry_out, decision_from_json

            try:
                body = op.parse_model(await request.body(), ElasticDecision)
                decision = decision_from_json(body.root.model_dump())
            except InvalidRequestError as e:
                return _error_response(e)
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
    except BaseException:  # a bug or a cancellation: end the request on the workers, then let it rise
        await chunks.aclose()
        raise

    async def body():
        try:
            if first is not None:
                yield sse(first)
            async for chunk in chunks:
                yield sse(chunk)
        except PdserveError as e:
            yield sse(op.error_body(str(e), e.error_type, getattr(e, "param", None), e.http_status))
        except Exception as e:  # a bug: the client still gets an error chunk and [DONE]
            logger.error("stream failed: %s", type(e).__name__)
            logger.debug("stream failure", exc_info=True)
            yield sse(op.error_body("internal error", "internal_error", None, 500))
        finally:
            await chunks.aclose()  # client gone: aborts the request on every worker
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _add_error_handlers(app: FastAPI) -> None:
    """OpenAI's error body for what Starlette answers itself (unknown path, method not allowed) and for a
    bad query parameter (FastAPI's 422 otherwise; e.g. /v1/cluster's history_since): a 400 naming it."""

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        param = str(err.get("loc", ("", ""))[-1]) or None
        return JSONResponse(op.error_body(f"{param}: {err.get('msg', 'invalid')}", "invalid_request_error", param),
                            400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(op.error_body(message), exc.status_code, headers=exc.headers)


def _error_response(e: PdserveError) -> JSONResponse:
    headers = {}
    status = e.http_status
    if isinstance(e, OverloadedError) or status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(getattr(e, "retry_after_s", 1.0))))
    if status >= 500 and status != 503:
        logger.error("request failed: %s", e)  # our own message, which quotes no prompt
    return JSONResponse(op.error_body(str(e), e.error_type, getattr(e, "param", None), getattr(e, "code", None)),
                        status, headers=headers)
