"""The frontend flags of the monitor (server/monitor.py): prices per pool, and the planner's predicted figures
for the running layout (``--planned``; ``pdserve up --config`` passes its cluster file's ``predicted:``). Its objectives are the frontend's
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
    g.add_argument("--planned", default=None, metavar="JSON",
                   help="the planner's predicted figures for this layout (a cluster file's predicted:, as JSON), "
                        "shown beside the live cost; pdserve up --config passes the file's own")


def monitor_options_from_args(args: argparse.Namespace):
    """The ``MonitorOptions`` the flags describe (prices, and the objectives of ``add_objective_args``);
    ValueError (with the flag's name) on bad values."""
    import json

    from pdserve.server.cost import parse_prices, planned
    from pdserve.server.monitor import MonitorOptions

    prices = parse_prices(getattr(args, "price_per_hour", None) or [])
    for name in ("slo_ttft", "slo_tpot"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    plan = getattr(args, "planned", None)
    if isinstance(plan, str):
        try:
            plan = json.loads(plan)
        except json.JSONDecodeError as e:
            raise ValueError(f"--planned: not JSON ({e})") from None
    try:
        plan = planned(plan) if plan else None
    except ValueError as e:
        raise ValueError(f"--planned: {e}") from None
    return MonitorOptions(prices=tuple(prices.items()), slo_ttft_s=getattr(args, "slo_ttft", None),
                          slo_tpot_s=getattr(args, "slo_tpot", None), planned=plan)


def monitor_args_to_argv(args: argparse.Namespace) -> list[str]:
    """``--price-per-hour`` and ``--planned`` for the frontend ``pdserve up`` starts (the objectives are passed
    with the controller's flags)."""
    import json

    argv = []
    for value in getattr(args, "price_per_hour", None) or []:
        argv += ["--price-per-hour", str(value)]
    plan = getattr(args, "planned", None)
    if plan:
        argv += ["--planned", plan if isinstance(plan, str) else json.dumps(plan)]
    return argv
