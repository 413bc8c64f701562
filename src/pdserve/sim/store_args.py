"""The KV store's flags for `pdserve sim` and `pdserve plan`: `pdserve up`'s store flags and the simulator's
figures for the tiers (docs/sim.md, "KV store tiers")."""
from __future__ import annotations

import argparse


def add_store_args(p: argparse.ArgumentParser) -> None:
    """`pdserve up`'s KV store flags, and the simulator's figures for the tiers (docs/sim.md)."""
    from pdserve.config import parse_size
    from pdserve.settings import add_store_flags
    add_store_flags(p)
    g = p.add_argument_group("KV store, as the simulator models it (docs/sim.md, \"KV store tiers\")")
    g.add_argument("--kv-remote-memory", type=parse_size, default=None,
                   help="the remote tier's size (default: 2GiB for a server `pdserve up` starts, else unbounded)")
    g.add_argument("--kv-host-gbs", type=float, default=None, help="host tier load/save GB/s per card")
    g.add_argument("--kv-disk-gbs", type=float, default=None, help="disk tier load/save GB/s per instance")
    g.add_argument("--kv-remote-gbs", type=float, default=None, help="remote tier load/save GB/s per card")
    g.add_argument("--kv-cards-per-host", type=int, default=None,
                   help="cards that share a host's tiers (default: the card's node_size; a CPU entry's cores)")


def store_from_args(args: argparse.Namespace, settings: dict, planning: dict) -> tuple[dict, dict]:
    """The cluster's ``kv_store`` settings and planning figures, with the flags given over them."""
    from pdserve.settings import STORE_SETTINGS
    settings, planning = dict(settings), dict(planning)
    for name, s in STORE_SETTINGS.items():
        value = getattr(args, name, s.default)
        if value != s.default:
            settings[name] = s.show(value) if "show" in s.meta else value
    if getattr(args, "kv_remote_memory", None) is not None:
        settings["kv_remote_memory"] = args.kv_remote_memory
    for key in ("host_gbs", "disk_gbs", "remote_gbs", "cards_per_host"):
        value = getattr(args, f"kv_{key}", None)
        if value is not None:
            planning[key] = value
    return settings, planning
