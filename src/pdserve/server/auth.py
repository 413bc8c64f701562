"""The HTTP surface's security policy: where the API key comes from and what it guards. (The internal
sockets between workers and frontend have their own keys: pdserve/security.py.)

The key comes from the environment (``PDSERVE_API_KEY``) or a file (``--api-key-file``), never from a
command line, where ``ps`` and shell histories would show it. When a key is set, every route requires
``Authorization: Bearer <key>`` (compared in constant time) except the public ones:

- ``/health`` answers everyone with ``{"status": ...}`` and its status code (load balancers need no key) and
  adds its details (workers, pids, hosts, addresses) only for a caller with the key;
- ``/dashboard`` and its assets (``/dashboard/*``): a static page that holds no data (a browser cannot put
  a Bearer header on a navigation); it asks the user for the key when ``/v1/cluster`` answers 401.

``/v1/cluster`` (the data behind the dashboard), ``/metrics``, ``/openapi.json``, ``/docs`` and ``/debug/*``
need the key. Unknown paths are refused too, so a route added later is guarded without a line of its own.
``/debug/*`` routes exist only with --enable-debug-endpoints.

The guard is a plain ASGI middleware: it passes ``receive`` and ``send`` through untouched, so routes
still see a client's disconnect (Starlette's BaseHTTPMiddleware would hide it).
"""
from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

API_KEY_ENV = "PDSERVE_API_KEY"
PUBLIC_PATHS = frozenset({"/health", "/dashboard"})  # answered without the key (/health's details need it)
PUBLIC_PREFIXES = ("/dashboard/",)  # the dashboard's static assets


def load_api_key(api_key_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key from ``api_key_file`` (its first line) or else ``$PDSERVE_API_KEY``; None when neither
    is given. ValueError for a file that cannot be read or an empty key."""
    environ = os.environ if environ is None else environ
    if api_key_file:
        try:
            text = Path(api_key_file).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the API key file {api_key_file}: {e.strerror}") from None
        key = text.splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ValueError(f"the API key file {api_key_file} is empty")
        return key
    key = environ.get(API_KEY_ENV)
    if key is None:
        return None
    if not key.strip():
        raise ValueError(f"{API_KEY_ENV} is set but empty")
    return key.strip()


def is_public(path: str) -> bool:
    """Whether ``path`` is answered without the key."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def is_authorized(api_key: str | None, authorization: bytes | str | None) -> bool:
    """Whether an Authorization header carries the key (constant-time comparison); True without a key."""
    if not api_key:
        return True
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    return hmac.compare_digest(authorization or b"", f"Bearer {api_key}".encode())


class ApiKeyGuard:
    """ASGI middleware: 401 in OpenAI's error shape for a request without the key, unless its path is
    public."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.api_key or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if is_authorized(self.api_key, authorization):
            await self.app(scope, receive, send)
            return
        await _send_json(send, 401, {"error": {
            "message": "Incorrect or missing API key (Authorization: Bearer ...)", "type": "invalid_request_error",
            "param": None, "code": "invalid_api_key"}}, [(b"www-authenticate", b"Bearer")])


class QuietErrors:
    """ASGI middleware: a bug in a route answers 500 in OpenAI's error shape and logs the exception's type
    only (its text, or a traceback's, may quote a prompt); the traceback is logged at DEBUG."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as e:  # a bug: answer (if still possible) and log without the request's content
            logger.error("%s %s failed: %s", scope.get("method"), scope.get("path"), type(e).__name__)
            logger.debug("traceback", exc_info=True)
            if not started:
                await _send_json(send, 500, {"error": {"message": "internal error", "type": "internal_error",
                                                       "param": None, "code": None}})


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})
