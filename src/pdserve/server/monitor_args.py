"""The frontend flags of the monitor (server/monitor.py): prices per pool. Its objectives are the frontend's
one set of objective flags (``--slo-ttft``, ``--slo-tpot``: server/main.py ``add_objective_args``), which
steer the elastic controller too.

Kept apart from the routes so that building the ``pdserve`` command line imports no web framework.
``pdserve up`` takes the same flag and hands it to its frontend (``monitor_args_to_argv``).
"""
from __future__ import annotations

import argparse


def add_monitor_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cost (/metrics, /v1/cluster, /dashboard)")
    g.add_argument("--price-per-hour", action="append", default=[], metavar="[POOL=]USD",
                   help="what one worker costs per hour, for every worker (USD) or a pool's (prefill=, decode=, "
                        "colocated=); repeatable; default: the hardware catalogue's price of its device")


def monitor_options_from_args(args: argparse.Namespace):
    """The ``MonitorOptions`` the flags describe (prices, and the objectives of ``add_objective_args``);
    ValueError (with the flag's name) on bad values."""
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
    """``--price-per-hour`` for the frontend ``pdserve up`` starts (the objectives are passed with the
    controller's flags)."""
    argv = []
    for value in getattr(args, "price_per_hour", None) or []:
        argv += ["--price-per-hour", str(value)]
    return argv
