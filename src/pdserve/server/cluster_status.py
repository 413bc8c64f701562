"""``GET /v1/cluster``: the cluster's state as one JSON document, for operators and the dashboard.

Built from the frontend client (each worker's ``WorkerInfo`` and latest ``Stats``, the router's view of it,
the rolling SLO attainment, the elastic controller) and the monitor's windows (server/monitor.py), which
read the same objects as /metrics. ``cluster_status`` assembles named sections, each a function of (client,
monitor, the snapshot of this moment, the figures of the last ``RATE_WINDOW_S``); a new part of the system
adds its own section to ``SECTIONS``, and the dashboard shows what it knows and ignores the rest.

Top level: ``mode`` (auto, colocated, disaggregated; None before any worker answered), ``num_inflight``,
``path_choice`` (whether each request's prefill place is chosen by predicted TTFT). Sections: ``workers``
(role as routing sees it now, cores and whether parked, step target and the step costs path choice reads,
device, queue, running batch, KV use, prefix-cache hit rate, busy time, price), ``rates`` and ``latency``
(over the last ``RATE_WINDOW_S``), ``attainment`` (the frontend's rolling attainment per phase, what the
controller reads), ``slo`` (objectives and attainment from the request counters, when objectives are set),
``cost`` (now, in total and over the rolling windows; ``planned``: the planner's figures for this layout
when the cluster was started from a plan, else None), ``elastic`` (the controller's objectives, window and
recent decisions with their reasons; None when it is off), ``ray`` (the Ray cluster's nodes and resources and
where each worker runs, when the workers run on Ray; None otherwise), ``history`` (points over time;
``history_since`` returns only newer ones).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from pdserve.server import cost as live_cost
from pdserve.server.monitor import WINDOWS_S, ClusterMonitor, Snapshot

RATE_WINDOW_S = 30.0


def cluster_status(client, monitor: ClusterMonitor, history_since: float | None = None) -> dict:
    """The whole document. ``history_since``: only history points after this Unix time (None: all)."""
    body = {"object": "cluster", "unix_s": time.time(),
            "mode": client.mode if client.conns or client.elastic is not None else None,
            "num_inflight": client.num_inflight, "path_choice": client.router.path_chooser is not None}
    now = monitor.snapshot()  # every figure below is of this moment
    recent = monitor.window(RATE_WINDOW_S, now)
    for name, section in SECTIONS.items():
        body[name] = section(client, monitor, now, recent)
    body["history"] = monitor.history(history_since)
    return body


def workers_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> list[dict]:
    """Every worker: /health's entry (one source for both), the router's view, device, busy time, price."""
    out = []
    for w in client.health()["workers"]:
        conn = client.conns.get(w.get("worker_id", ""))
        if conn is None:  # not connected yet: /health's entry as it is
            out.append(w)
            continue
        view = client.tracker.instances.get(w["worker_id"])
        if view is not None:
            w.update({"role": view.role, "cores": None if view.cores is None else list(view.cores),
                      "is_parked": view.is_parked, "step_target_s": view.step_target_s,
                      "queued_prefill_tokens": view.queued_prefill_tokens,
                      "prefill_token_s": view.prefill_token_s, "decode_step_s": view.decode_step_s})
        info, s = conn.info, conn.stats
        num_cores = live_cost.current_cores(info, s)
        price = live_cost.worker_price(info, monitor.prices, num_cores)
        uptime = s.uptime_s if s else 0.0
        w.update({
            "device": info.device, "device_name": info.device_name, "num_cores": num_cores,
            "hardware": info.hardware or None,
            "prefix_cache_hit_rate": (s.prefix_hit_tokens / s.prefix_query_tokens
                                      if s and s.prefix_query_tokens else None),
            "tier_hit_rates": _tier_hit_rates(s),
            "num_prompt_tokens": s.num_prompt_tokens if s else 0,
            "num_generation_tokens": s.num_generation_tokens if s else 0,
            "uptime_s": uptime, "busy_s": s.busy_s if s else 0.0,
            "prefill_busy_s": s.prefill_busy_s if s else 0.0, "core_s": s.core_s if s else 0.0,
            "busy_fraction": (s.busy_s / uptime) if s and uptime > 0 else None,
            "step_overhead_s": s.step_overhead_s if s else None,
            "price_per_hour": price.price_per_hour, "price_source": price.source,
            "num_devices": price.num_devices,
        })
        out.append(w)
    return out


def rates_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict:
    return {"window_s": recent["seconds"], **recent["rates"]}


def latency_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict:
    return {"window_s": recent["seconds"], **recent["latency"]}


def attainment_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict:
    a = client.attainment.window(time.monotonic())
    return {"window_s": client.attainment.window_s, "num_requests": a.num_requests, "ttft": a.ttft,
            "tpot": a.tpot, "both": a.both, "itl_p99_s": a.itl_p99_s}


def slo_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict | None:
    opts = monitor.options
    if not opts.has_objectives:
        return None
    total = monitor.window(None, now)["slo_attainment"]
    return {"ttft_s": opts.slo_ttft_s, "tpot_s": opts.slo_tpot_s, "window_s": recent["seconds"],
            "attainment": recent["slo_attainment"], "attainment_total": total}


def cost_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict:
    u = now.usage
    windows = {name: monitor.window(seconds, now)["cost"] for name, seconds in WINDOWS_S.items()}
    windows["total"] = monitor.window(None, now)["cost"]
    return {"price_per_hour": u.price_per_hour, "cost_usd": u.cost_usd, "device_hours": u.device_hours,
            "prices": monitor.prices or None, "windows": windows, "planned": monitor.options.planned}


def elastic_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict | None:
    return client.elastic.status() if client.elastic is not None else None


def ray_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict | None:
    """Ray's facts when the workers were found through Ray (server/ray_directory.py): the cluster's address
    and namespace, its nodes with their resources and labels, the resources in all and available, and where
    each worker runs (node, resources, whether Ray restarted it). None otherwise."""
    directory = getattr(client, "directory", None)
    return directory.status() if directory is not None else None


SECTIONS: dict[str, Callable[..., object]] = {
    "workers": workers_section,
    "rates": rates_section,
    "latency": latency_section,
    "attainment": attainment_section,
    "slo": slo_section,
    "cost": cost_section,
    "elastic": elastic_section,
    "ray": ray_section,
}


def _tier_hit_rates(s) -> dict[str, float]:
    """Per KV store tier (host, disk, remote) the worker looked blocks up in: the share it found there."""
    if s is None:
        return {}
    return {t.tier: t.hits / (t.hits + t.misses) for t in s.kv_store if t.hits + t.misses}
