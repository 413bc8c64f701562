"""``GET /v1/cluster``: the cluster's state as one JSON document, for operators and the dashboard.

Built from the frontend client's connections (each worker's ``WorkerInfo`` and latest ``Stats``) and the
monitor's windows (server/monitor.py), which read the same objects as /metrics. ``cluster_status``
assembles named sections, each a function of (client, monitor, the snapshot of this moment, the
figures of the last ``RATE_WINDOW_S``); a new part of the system (the elastic controller's decisions, say)
adds its own section to ``SECTIONS``, and the dashboard shows what it knows and ignores the rest.

Sections: ``workers`` (role, device, cores, queue, running batch, KV use, prefix-cache hit rate, price),
``rates`` and ``latency`` (over the last ``RATE_WINDOW_S``), ``slo`` (objectives and attainment, when
objectives are set), ``cost`` (now, in total and over the rolling windows), ``history`` (points over
time; ``history_since`` returns only newer ones).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from pdserve.server import cost as live_cost
from pdserve.server.monitor import WINDOWS_S, ClusterMonitor, Snapshot

RATE_WINDOW_S = 30.0


def cluster_status(client, monitor: ClusterMonitor, history_since: float | None = None) -> dict:
    """The whole document. ``history_since``: only history points after this Unix time (None: all)."""
    body = {"object": "cluster", "unix_s": time.time(), "mode": client.mode if client.conns else None,
            "num_inflight": client.num_inflight}
    now = monitor.snapshot()  # every figure below is of this moment
    recent = monitor.window(RATE_WINDOW_S, now)
    for name, section in SECTIONS.items():
        body[name] = section(client, monitor, now, recent)
    body["history"] = monitor.history(history_since)
    return body


def workers_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> list[dict]:
    out = []
    for wid, conn in client.conns.items():
        info, s = conn.info, conn.stats
        price = live_cost.worker_price(info, monitor.prices)
        uptime = s.uptime_s if s else 0.0
        out.append({
            "worker_id": wid, "role": info.role, "alive": conn.is_alive, "address": conn.address,
            "host": info.host, "pid": info.pid, "device": info.device, "device_name": info.device_name,
            "num_cores": info.num_cores, "hardware": info.hardware or None,
            "num_inflight": len(conn.request_ids),
            "num_running": s.num_running if s else 0, "num_waiting": s.num_waiting if s else 0,
            "num_awaiting_kv": s.num_awaiting_kv if s else 0, "num_held_kv": s.num_held_kv if s else 0,
            "kv_usage": s.kv_usage if s else 0.0, "num_blocks": info.num_blocks,
            "num_free_blocks": s.num_free_blocks if s else info.num_blocks,
            "prefix_cache_hit_rate": (s.prefix_hit_tokens / s.prefix_query_tokens
                                      if s and s.prefix_query_tokens else None),
            "tier_hit_rates": {},  # KV tiers (host memory, disk, remote) report here when they exist
            "num_prompt_tokens": s.num_prompt_tokens if s else 0,
            "num_generation_tokens": s.num_generation_tokens if s else 0,
            "uptime_s": uptime, "busy_s": s.busy_s if s else 0.0,
            "prefill_busy_s": s.prefill_busy_s if s else 0.0,
            "busy_fraction": (s.busy_s / uptime) if s and uptime > 0 else None,
            "price_per_hour": price.price_per_hour, "price_source": price.source,
            "num_devices": price.num_devices,
        })
    return out


def rates_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict:
    return {"window_s": recent["seconds"], **recent["rates"]}


def latency_section(client, monitor: ClusterMonitor, now: Snapshot, recent: dict) -> dict:
    return {"window_s": recent["seconds"], **recent["latency"]}


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
            "prices": monitor.prices or None, "windows": windows}


SECTIONS: dict[str, Callable[..., object]] = {
    "workers": workers_section,
    "rates": rates_section,
    "latency": latency_section,
    "slo": slo_section,
    "cost": cost_section,
}
