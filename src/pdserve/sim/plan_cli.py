"""``pdserve plan``: its flags, the run, and what it writes (ranked.json, pareto.png, best-cluster.yaml)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.planner import MAX_PROBE_REQUESTS, Planner, PlanOptions, best_cluster, rank
from pdserve.sim.store import StoreSpec


def add_plan_args(p) -> None:
    g = p.add_argument_group("plan")
    g.add_argument("--model", required=True)
    g.add_argument("--hardware", default="h100-sxm", help="comma-separated catalogue names")
    g.add_argument("--hardware-file", default=None)
    g.add_argument("--precision", default="auto",
                   help="auto (bf16, and fp8 on cards with an fp8 rate) or a comma-separated list of bf16, fp8, "
                        "int8, fp4 (each searched on the cards whose catalogue entry has its rate; bf16 on all)")
    g.add_argument("--parallelism", default="auto",
                   help="how an instance's cards split the model: auto (tp; and ep for MoE models), tp, ep or tp,ep")
    g.add_argument("--moe-imbalance", type=float, default=1.0,
                   help="ep layouts: the busiest expert rank's routed tokens over the mean (>= 1)")
    g.add_argument("--ep-overlap", action="store_true",
                   help="ep layouts: two micro-batches per step hide the all-to-alls behind computation")
    g.add_argument("--attainment", type=float, default=0.9)
    g.add_argument("--cards", type=int, default=None, help="cards available")
    g.add_argument("--budget-per-hour", type=float, default=None, help="USD per hour available")
    g.add_argument("--modes", default="colocated,disaggregated")
    g.add_argument("--tp-options", default=None, help="comma-separated TP degrees (default: the smallest that fits)")
    g.add_argument("--probe-requests", type=int, default=300, help="requests per simulated rate probe")
    g.add_argument("--max-probe-requests", type=int, default=MAX_PROBE_REQUESTS,
                   help="cap on requests per probe (probes span several request lifetimes up to this)")
    g.add_argument("--perf-model", default="analytic")
    g.add_argument("--routing", default="least_loaded", choices=("round_robin", "least_loaded", "prefix_aware"))
    g.add_argument("--out-dir", default="plan-out")
    g.add_argument("--top", type=int, default=10)
    from pdserve.sim.store_args import add_store_args
    add_store_args(p)


def run_plan_command(args) -> int:
    from pdserve.sim.store_args import store_from_args
    from pdserve.sim.workload import work_items, workload_from_args
    try:
        if (args.cards is None) == (args.budget_per_hour is None):
            raise ValueError("give exactly one of --cards N or --budget-per-hour X")
        if (args.cards is not None and args.cards < 1) or (args.budget_per_hour is not None and args.budget_per_hour <= 0):
            raise ValueError("--cards / --budget-per-hour must be positive")
        if args.slo_ttft is None and args.slo_tpot is None:
            raise ValueError("give at least one objective: --slo-ttft and/or --slo-tpot")
        if not 0 < args.attainment <= 1:
            raise ValueError("--attainment must be in (0, 1]")
        modes = tuple(m for m in args.modes.split(",") if m)
        if not modes or set(modes) - {"colocated", "disaggregated"}:
            raise ValueError("--modes takes colocated and/or disaggregated")
        tps = [int(t) for t in args.tp_options.split(",")] if args.tp_options else None
        options = PlanOptions((args.slo_ttft, args.slo_tpot), args.attainment, args.precision, modes, tps,
                              args.probe_requests, args.max_probe_requests, args.perf_model, args.hardware_file,
                              args.routing, args.parallelism, args.progress, args.seed,
                              moe_imbalance=args.moe_imbalance, ep_overlap=args.ep_overlap)
        store, store_planning = store_from_args(args, {}, {})
        StoreSpec.from_settings(store, store_planning)  # ValueError on bad KV store settings
        options = replace(options, kv_store=store, kv_store_planning=store_planning)
        planner = Planner(args.model, [h for h in args.hardware.split(",") if h],
                          work_items(workload_from_args(args)[0]), options)
    except (ValueError, OSError) as e:
        print(f"pdserve plan: error: {e}", file=sys.stderr)
        return 2
    cands = planner.search()
    rows = rank(cands, planner.catalogue, args.cards, args.budget_per_hour)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
            "attainment": args.attainment, "cards": args.cards, "budget_per_hour": args.budget_per_hour,
            "hardware": args.hardware, "precisions": planner.precisions, "parallelisms": planner.parallelisms,
            "probe_requests": args.probe_requests,
            "simulations": planner.num_sims, "probes_over_cap": planner.num_capped,
            "method": "unit goodput by rate search, scaled linearly"}
    (out / "ranked.json").write_text(json.dumps({**meta, "ranked": rows}, indent=1) + "\n", encoding="utf-8")
    if not rows:
        print("no configuration meets the objectives within the cards/budget", file=sys.stderr)
        return 1
    pareto_plot(rows, out / "pareto.png")
    best_cluster(rows[0]).dump(out / "best-cluster.yaml")
    print(format_table(rows, args.top))
    print(format_details(rows, min(3, args.top), args.attainment))
    if planner.num_capped:
        print(f"note: {planner.num_capped} probes needed more than --max-probe-requests x instances requests to "
              "show sustained load and counted as misses; goodputs near that limit are lower bounds")
    print(f"{planner.num_sims} simulations; wrote {out / 'ranked.json'}, {out / 'pareto.png'}, "
          f"{out / 'best-cluster.yaml'}")
    return 0


def format_table(rows: list[dict], top: int) -> str:
    lines = [f"{'#':>3} {'mode':<6} {'layout':<38}{'cards':>6}{'goodput':>9}{'/card':>7}{'$/h':>9}"
             f"{'$/Mtok in':>10}{'$/Mtok out':>11}{'TTFT90':>8}{'TPOT90':>8}"]
    for r in rows[:top]:
        lines.append(f"{r['rank']:>3} {r['mode'][:6]:<6} {_layout(r):<38}{r['cards']:>6}{r['goodput_rps']:>9.1f}"
                     f"{r['goodput_per_card']:>7.2f}{r['price_per_hour']:>9.0f}"
                     f"{r['cost_per_mtok']['uncached_input_per_mtok']:>10.4f}{r['cost_per_mtok']['output_per_mtok']:>11.4f}"
                     f"{r['ttft_p90_s'] * 1e3:>8.0f}{r['tpot_p90_s'] * 1e3:>8.1f}")
    lines.append("(goodput in req/s at the attainment target; TTFT/TPOT p90 in ms of one unit at its goodput)")
    return "\n".join(lines)


def format_details(rows: list[dict], top: int, target: float) -> str:
    """What a buyer reads for the best few plans: cards by kind, cost per million tokens by kind of token,
    attainment at the goodput, and the headroom to the rate where attainment falls under the target."""
    lines = []
    for r in rows[:top]:
        c = r["cost_per_mtok"]
        kinds = ", ".join(f"{n} x {hw}" for hw, n in sorted(r["cards_by_kind"].items()))
        if r["misses_at_rps"] is None:
            edge = "no probed rate missed it"
        else:
            edge = (f"under it between {r['goodput_rps']:.1f} and {r['misses_at_rps']:.1f} req/s "
                    f"(+{r['misses_at_rps'] / r['goodput_rps'] - 1:.0%} at most)")
        lines += [f"#{r['rank']}: {kinds}; ${r['price_per_hour']:,.0f}/h, {r['power_kw_tdp']:.1f} kW (TDP)",
                  f"    $/Mtok: cached in {c['cached_input_per_mtok']:.4f}, uncached in "
                  f"{c['uncached_input_per_mtok']:.4f}, out {c['output_per_mtok']:.4f}, blended "
                  f"{c['blended_per_mtok']:.4f}",
                  f"    attainment {r['attainment']:.1%} at {r['goodput_rps']:.1f} req/s (target {target:.0%}); "
                  f"{edge}"]
    return "\n".join(lines)


def pareto_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in (("colocated", "o"), ("disaggregated", "s")):
        pts = [(r["price_per_hour"], r["goodput_rps"]) for r in rows if r["mode"] == mode]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=mode, alpha=0.7)
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["price_per_hour"], -r["goodput_rps"])):
        if r["goodput_rps"] > best:
            front.append((r["price_per_hour"], r["goodput_rps"]))
            best = r["goodput_rps"]
    if front:
        ax.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front")
    ax.set_xlabel("cluster cost (USD/hour)")
    ax.set_ylabel("goodput (requests/s meeting TTFT and TPOT)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layout(r: dict) -> str:
    spec = ClusterSpec.from_dict(r["unit"])

    def pool(p: PoolSpec) -> str:
        return f"{p.hardware} {p.parallelism}{p.tp}" + (f"/a{p.attn_tp}" if p.attn_tp > 1 else "")
    tag = "" if spec.precision == "bf16" else f" {spec.precision}"
    if spec.mode == "colocated":
        c = spec.colocated
        return f"{r['units']}x {pool(c)} b{c.max_num_batched_tokens} s{c.max_num_seqs}{tag}"
    p, d = spec.prefill, spec.decode
    return f"{r['units']}x({p.instances}P {pool(p)} : {d.instances}D {pool(d)} s{d.max_num_seqs}){tag}"
