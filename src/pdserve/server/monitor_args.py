"""The frontend flags of the monitor (server/monitor.py): prices per pool and objectives.

Kept apart from the routes so that building the ``pdserve`` command line imports no web framework.
``pdserve up`` takes the same flags and hands them to its frontend (``monitor_args_to_argv``).
"""
from __future__ import annotations

import argparse


def add_monitor_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cost and objectives (/metrics, /v1/cluster, /dashboard)")
    g.add_argument("--price-per-hour", action="append", default=[], metavar="[POOL=]USD",
                   help="what one worker costs per hour, for every worker (USD) or a pool's (prefill=, decode=, "
                        "colocated=); repeatable; default: the hardware catalogue's price of its device")
    g.add_argument("--slo-ttft", type=float, default=None, metavar="SECONDS",
                   help="time-to-first-token objective: SLO attainment on /metrics and the dashboard")
    g.add_argument("--slo-tpot", type=float, default=None, metavar="SECONDS", help="time-per-output-token objective")


def monitor_options_from_args(args: argparse.Namespace):
    """The ``MonitorOptions`` the flags describe; ValueError (with the flag's name) on bad values."""
    from pdserve.server.cost import parse_prices
    from pdserve.server.monitor import MonitorOptions

    prices = parse_prices(getattr(args, "price_per_hour", None) or [])
    for name in ("slo_ttft", "slo_tpot"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    return MonitorOptions(prices=tuple(prices.items()), slo_ttft_s=getattr(args, "slo_ttft", None),
                          slo_tpot_s=getattr(args, "slo_tpot", None))


def monitor_args_to_argv(args: argparse.Namespace) -> list[str]:
    argv = []
    for value in getattr(args, "price_per_hour", None) or []:
        argv += ["--price-per-hour", str(value)]
    for name in ("slo_ttft", "slo_tpot"):
        if getattr(args, name, None) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv
