"""The OpenAPI document of one deployment (GET /openapi.json): each route's request body, responses and
errors, with every schema generated from the pydantic models that parse requests (api_types.py, as
``request_types`` made them for this deployment) and describe responses (api_responses.py).

Streams are ``text/event-stream``; as OpenAPI 3.1 reads it there, the media type's schema is one event:
its ``data`` is a JSON chunk (or an error body, after which the stream ends) or the final ``[DONE]``.
Errors are OpenAI's body; 429 and 503 carry Retry-After. /metrics is Prometheus text, /dashboard a page
(``text/html``) open to all; the dashboard's assets are left out (static files, no API).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from pdserve.server import api_responses as r

SECURITY_SCHEME = "bearerAuth"
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    r.ErrorResponse, r.Completion, r.CompletionChunk, r.ChatCompletion, r.ChatCompletionChunk, r.ModelList,
    r.Health, r.KVDigests, r.ClusterStatus, r.IntegrityReport, r.ElasticResult)
_ERRORS = {
    400: "Invalid request: OpenAI's error body, `param` names the field at fault",
    401: "Missing or wrong API key",
    404: "The request names a model this server does not serve (code model_not_found)",
    429: "Overloaded: retry after Retry-After seconds",
    503: "No live worker can serve the request: retry after Retry-After seconds",
    504: "The request's deadline (--request-timeout) passed: it was aborted on every worker",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}}


def generation_route(response: str, chunk: str, request: str, secured: bool) -> dict[str, Any]:
    """Keyword arguments for ``app.post`` of /v1/completions or /v1/chat/completions."""
    ok = {"description": f"A {response}; with stream: true, server-sent events of {chunk} ending with "
                         "`data: [DONE]` (an error after the first event comes as an error body, then [DONE])",
          "content": {"application/json": {"schema": _ref(response)}, "text/event-stream": _sse(chunk)}}
    return _route({200: ok, **_errors(400, 404, 429, 503, 504)}, secured, request)


def json_route(model: str, description: str, secured: bool, request: str | None = None,
               error_codes: tuple[int, ...] = ()) -> dict[str, Any]:
    """Keyword arguments for a route that answers ``model`` as JSON."""
    ok = {"description": description, "content": {"application/json": {"schema": _ref(model)}}}
    return _route({200: ok, **_errors(*error_codes)}, secured, request)


def health_route(secured: bool) -> dict[str, Any]:
    """/health: open to all (its details only with the key, when a key is set)."""
    body = {"application/json": {"schema": _ref("Health")}}
    responses = {200: {"description": "Serving", "content": body},
                 503: {"description": "No live worker can serve requests", "content": body}}
    route = {"responses": responses}
    if secured:
        route["openapi_extra"] = {"security": [{}, {SECURITY_SCHEME: []}]}
    return route


def page_route(description: str) -> dict[str, Any]:
    """A page for a browser (/dashboard), open to all even with a key: it holds no data."""
    ok = {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}
    return {"responses": {200: ok}, "openapi_extra": {"security": []}}


def metrics_route(secured: bool) -> dict[str, Any]:
    ok = {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return _route({200: ok}, secured, None)


def openapi_document(app: FastAPI, request_models: list[type[BaseModel]], secured: bool) -> dict[str, Any]:
    """The whole document: paths from the app's routes, schemas from the models."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for operations in doc["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)  # FastAPI's own: this app answers 400 (app.py)
    _, defs = models_json_schema([(m, "validation") for m in (*request_models, *RESPONSE_MODELS)],
                                 ref_template="#/components/schemas/{model}")
    components = doc.setdefault("components", {})
    components["schemas"] = defs["$defs"]
    if secured:
        components["securitySchemes"] = {SECURITY_SCHEME: {
            "type": "http", "scheme": "bearer",
            "description": "the API key ($PDSERVE_API_KEY or --api-key-file of the frontend)"}}
    return doc


# ---- private --------------------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[int, dict]:
    out = {}
    for code in codes:
        out[code] = {"description": _ERRORS[code], "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
        if code in (429, 503):
            out[code]["headers"] = _RETRY_AFTER
    return out


def _route(responses: dict[int, dict], secured: bool, request: str | None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if request is not None:
        extra["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    if secured:
        extra["security"] = [{SECURITY_SCHEME: []}]
        responses = {**responses, **{401: {"description": _ERRORS[401],
                                           "content": {"application/json": {"schema": _ref("ErrorResponse")}}}}}
    return {"responses": responses, "openapi_extra": extra}


def _sse(chunk: str) -> dict[str, Any]:
    """One server-sent event: ``data`` is a JSON chunk or error body, or ``[DONE]``."""
    data = {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json",
                     "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}}}
    return {"schema": {"type": "object", "required": ["data"],
                       "properties": {"data": data, "event": {"const": "message"}}}}
