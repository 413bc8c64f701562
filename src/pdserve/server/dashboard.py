"""The frontend's operator routes: ``GET /v1/cluster`` (JSON), ``GET /dashboard`` (a page) and its assets.

``dashboard_router`` returns an ``APIRouter`` the app includes; its lifespan attaches a ``ClusterMonitor``
to the app's ``Metrics`` (``client.metrics``, set by the app's own lifespan, which runs first) and samples
it in the background. ``/v1/cluster`` takes the same API key as every data route (the app's ``denied``
check). The page and its assets hold no data and are served without a key: a browser cannot put a Bearer
header on a navigation; the page asks for the key when /v1/cluster answers 401 and sends it as
``Authorization: Bearer`` from then on.

The assets live in ``server/static`` (package data): plain HTML, CSS and JavaScript, no build step, no
CDN. The frontend flags that configure the monitor are in server/monitor_args.py (prices) and server/main.py
(the objectives, shared with the elastic controller).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from pdserve.server.cluster_status import cluster_status
from pdserve.server.monitor import ClusterMonitor, MonitorOptions

logger = logging.getLogger(__name__)

ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}


def dashboard_router(client, denied: Callable[[Request], Response | None],
                     options: MonitorOptions | None = None) -> APIRouter:
    """``denied(request)``: the app's API-key check (a response to return, or None to go on). Without
    ``options``, the monitor judges requests against the client's objectives (``FrontendOptions.objectives``)."""
    if options is None:
        objectives = client.options.objectives
        options = MonitorOptions(slo_ttft_s=objectives.ttft_s, slo_tpot_s=objectives.tpot_s)
    monitor = ClusterMonitor(client, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        monitor.attach(client.metrics)
        task = asyncio.create_task(monitor.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    router = APIRouter(lifespan=lifespan)
    router.monitor = monitor  # for tests and for the parts that extend /v1/cluster

    @router.get("/v1/cluster")
    async def cluster(request: Request, history_since: float | None = None):
        if (refusal := denied(request)) is not None:
            return refusal
        return JSONResponse(_finite(cluster_status(client, monitor, history_since)))

    @router.get("/dashboard", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(_asset("dashboard.html"), headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/{name}")
    async def asset(name: str):
        if name not in ASSETS:
            return JSONResponse({"error": {"message": f"no asset {name!r}", "type": "not_found_error",
                                           "param": None, "code": None}}, 404)
        return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    return router


def _asset(name: str) -> bytes:
    return resources.files("pdserve.server").joinpath("static", name).read_bytes()


def _finite(value):
    """JSON has no NaN or infinity: None instead."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
