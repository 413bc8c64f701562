"""The simulator's KV store tiers against the live store: ``benchmarks/kv_store.py replay``'s multi-turn workload
(conversations of ``--turns`` turns, each turn the conversation so far plus a new message, on two colocated
workers of SmolLM2-135M behind round-robin routing, one request at a time) simulated store off and with each
tier, as that replay runs it (its tier flags, float32 KV, a ``--kv-cache`` of KV per worker, ``--gap-s`` between
requests; the remote tier on the cpu entry's network, as if on another host); reported as the replay reports it: prompt tokens computed, hit rate against the reusable tokens
(earlier turns' prompts and answers, whole blocks, as the replay counts them), TTFT p50 and p90.

``--measured FILE`` (a ``kv_store.py replay --out`` file) prints the live figures beside the simulated ones
and the differences. Takes well under a second: the simulation only (no cluster is started).

    .venv/bin/python benchmarks/sim_kv_store.py --kv-cache 256MiB [--measured replay.json]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

from pdserve.config import parse_size
from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.models import get_model
from pdserve.sim.simulator import SimOptions, Simulator
from pdserve.sim.workload import multi_turn_items

BLOCK = 16
TIERS = {"off": {}, "host": {"kv_host_memory": "1GiB"}, "disk": {"kv_disk": "/tmp/pdserve-kvdisk:4GiB"},
         "redis": {"kv_remote": "redis", "kv_remote_memory": "1GiB"},
         "mooncake": {"kv_remote": "mooncake", "kv_remote_memory": "1GiB"}}  # kv_store.py replay's tiers


def simulate(args, tier: str) -> dict:
    store = TIERS[tier]
    spec = ClusterSpec("smollm2-135m", colocated=PoolSpec(args.hardware, 2), precision="fp32", kv_dtype="fp32",
                       routing="round_robin", kv_store=store)
    block_bytes = get_model(spec.model).kv_bytes_per_token(4.0) * BLOCK
    items = multi_turn_items(args.conversations, args.turns, args.first_len, args.turn_len, args.turn_output, BLOCK)
    items = [replace(it, arrival_s=i * args.gap_s) for i, it in enumerate(items)]  # as sequential as the replay
    num_blocks = int(parse_size(args.kv_cache) // block_bytes)
    r = Simulator(spec, items, SimOptions(num_blocks=num_blocks, seed=args.seed)).run()
    reusable = sum((it.input_len - args.turn_len - 1) // BLOCK * BLOCK for it in items[args.conversations:])
    cached = r["total_cached_input_tokens"]
    return {"requests": r["completed"], "prompt_tokens": r["total_input_tokens"],
            "computed_tokens": sum(p["prompt_tokens_computed"] for p in r["sim"]["pools"].values()),
            "cached_tokens": cached, "reusable_tokens": reusable, "hit_rate_of_reusable": cached / reusable,
            "ttft_p50_s": r["ttft_s"]["p50"], "ttft_p90_s": r["ttft_s"]["p90"],
            "kv_store": r["sim"].get("kv_store")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiers", default="off,host,redis")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--first-len", type=int, default=600)
    ap.add_argument("--turn-len", type=int, default=64)
    ap.add_argument("--turn-output", type=int, default=32)
    ap.add_argument("--gap-s", type=float, default=2.0, help="seconds between two requests' arrivals (each "
                    "ends well before the next: the replay sends one at a time)")
    ap.add_argument("--kv-cache", default="96MiB", help="KV per worker (the replay's --kv-cache)")
    ap.add_argument("--hardware", default="cpu-this-machine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measured", default=None, help="a `benchmarks/kv_store.py replay --out` file")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    measured = json.load(open(args.measured))["result"] if args.measured else {}
    out = {}
    for tier in args.tiers.split(","):
        s = out[tier] = simulate(args, tier)
        print(f"sim   {tier:8s} prompt {s['prompt_tokens']:6d} computed {s['computed_tokens']:6d} hit/reusable "
              f"{s['hit_rate_of_reusable']:.3f}  TTFT p50 {s['ttft_p50_s'] * 1e3:7.1f} ms  p90 "
              f"{s['ttft_p90_s'] * 1e3:7.1f} ms")
        m = measured.get(tier, {}).get("multi_turn")
        if m:
            print(f"live  {tier:8s} prompt {m['prompt_tokens']:6d} computed {m['computed_tokens']:6d} hit/reusable "
                  f"{m['hit_rate_of_reusable']:.3f}  TTFT p50 {m['ttft_p50_s'] * 1e3:7.1f} ms  p90 "
                  f"{m['ttft_p90_s'] * 1e3:7.1f} ms  (sim/live TTFT p50 {s['ttft_p50_s'] / m['ttft_p50_s']:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "result": out}, f, indent=1)


if __name__ == "__main__":
    main()
