"""The planner: the cheapest, highest-goodput cluster for a workload and latency objectives
(``pdserve plan``, whose command is ``sim/plan_cli.py``).

Method (fast search: simulate a unit, then scale):

1. Candidate units: a colocated instance (hardware, TP, token budget = chunk size, max_num_seqs), or a
   disaggregated group of x prefill and y decode instances (each pool its own hardware and TP, so mixed
   fleets are searched too), for each precision (``--precision auto``: bf16, and fp8 on cards the
   catalogue gives an fp8 rate) and, for MoE models, each way to split an instance's cards
   (``--parallelism auto``: tensor parallel, and expert parallel over 2 or more cards with attention
   tensor-parallel over 1 to a node's cards in each data-parallel group: ``moe.layouts``; of the
   attention TPs at one card count, the unit keeps the one with the best rate: simulated for a prefill
   pool, analytic for a decode pool and a colocated unit).
2. For each unit, the simulator (real scheduler, analytic or calibrated step times) replays the
   workload's requests re-timed as a Poisson stream (from the analytic capacity by factors of 1.5, then
   bisection); the unit's goodput is the highest rate whose SLO attainment (TTFT and TPOT both met)
   reaches the target, over the whole probe and over its last quarter of arrivals (an overloaded
   unit's queue grows through the probe, so its latest arrivals show it first).
3. P:D ratios come from per-pool capacities: a prefill instance's rate (simulated alone on the TTFT
   objective) and a decode instance's rate (steady-state batch that meets TPOT and fits the KV cache);
   the ratios nearest to their quotient are then simulated as groups.
4. A unit's goodput scales linearly with the number of units that fit the card count or the hourly
   budget (independent units behind a load balancer); cost per million tokens comes from the unit's
   simulation at its goodput rate.

(Over 400 lines: the search is one method, steps 1-4 above, sharing the unit cache and the probe; the
command line, the cluster file and the workload are in plan_cli.py, cluster_file.py and workload.py.)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np

from pdserve.sim import moe
from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.hardware import load_catalogue
from pdserve.sim.models import get_model
from pdserve.sim.perf_model import AnalyticPerfModel, instance_kv_blocks, min_tp
from pdserve.sim.pools import moe_settings
from pdserve.sim.simulator import SimOptions, Simulator, WorkItem

logger = logging.getLogger(__name__)

MAX_PROBE_REQUESTS = 1500  # per instance of the unit
AUTO_PRECISIONS = ("bf16", "fp8")  # --precision auto: bf16 everywhere, fp8 where the card has an fp8 rate


@dataclass
class Candidate:
    spec: ClusterSpec  # one unit
    goodput: float = 0.0  # unit req/s at the attainment target
    miss_rate: float | None = None  # the lowest unit rate probed that missed it (None: none did)
    probe: dict | None = None  # the unit's simulation at that rate

    @property
    def unit_cards(self) -> int:
        return self.spec.num_cards


@dataclass(frozen=True)
class PlanOptions:
    """How the planner searches: objectives, what to try, how hard to probe."""

    slo: tuple[float | None, float | None]  # TTFT and TPOT objectives, seconds
    attainment: float = 0.9
    precision: str = "bf16"  # one name, a comma-separated list, or auto
    modes: tuple[str, ...] = ("colocated", "disaggregated")
    tp_options: list[int] | None = None  # None: the smallest TP that fits
    probe_requests: int = 300
    max_probe_requests: int = MAX_PROBE_REQUESTS
    perf_model: str = "analytic"
    hardware_file: str | None = None
    routing: str = "least_loaded"
    parallelism: str = "tp"  # tp, ep, tp,ep or auto (ep only for MoE models)
    progress: bool = False
    seed: int = 0
    moe_imbalance: float = 1.0  # ep pools: the busiest expert rank's load over the mean
    ep_overlap: bool = False  # ep pools: two micro-batches hide the all-to-alls
    # The KV store every candidate runs with (ClusterSpec.kv_store, .kv_store_planning; sim/store.py): each
    # simulated unit has its own tiers (a remote tier shared by the whole cluster is modelled per unit).
    kv_store: dict = field(default_factory=dict)
    kv_store_planning: dict = field(default_factory=dict)


class Planner:
    def __init__(self, model: str, hardware: list[str], items: list[WorkItem], options: PlanOptions) -> None:
        o = self.options = options
        self.model = get_model(model)
        self.model_name = model
        self.catalogue = load_catalogue(o.hardware_file)
        unknown = [h for h in hardware if h not in self.catalogue]
        if unknown:
            raise ValueError(f"unknown hardware {unknown}; known: {', '.join(sorted(self.catalogue))}")
        if not items:
            raise ValueError("the workload has no requests")
        if not o.moe_imbalance >= 1.0:
            raise ValueError(f"--moe-imbalance must be >= 1, got {o.moe_imbalance}")
        self.hardware, self.slo, self.attainment = hardware, o.slo, o.attainment
        self.modes, self.tp_options = o.modes, o.tp_options
        self.precisions = _precisions(o.precision, o.perf_model)
        self.parallelisms = _parallelisms(o.parallelism, self.model.is_moe)
        self.perf_model, self.hardware_file, self.routing, self.progress = (o.perf_model, o.hardware_file, o.routing,
                                                                            o.progress)
        rng = np.random.default_rng([o.seed, 0x9E77])
        pool = max(o.max_probe_requests * 12, o.probe_requests)
        picks = rng.integers(0, len(items), size=pool) if len(items) < pool else np.arange(pool)
        self.base = [items[int(i)] for i in picks]
        self.unit_times = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0, size=len(self.base) - 1))])
        self.probe_requests = o.probe_requests
        self.max_probe_requests = o.max_probe_requests
        self.num_capped = 0
        self.avg_in = float(np.mean([it.input_len for it in self.base]))
        self.avg_out = float(np.mean([it.output_len for it in self.base]))
        # A probe's arrivals span at least this long (several request lifetimes), so an overloaded unit
        # shows growing queues instead of draining a short burst.
        self.min_probe_s = 2.0 * ((o.slo[0] or 1.0) + self.avg_out * (o.slo[1] or 0.05))
        self.num_sims = 0

    # -- search ----------------------------------------------------------------------------------------
    def search(self) -> list[Candidate]:
        units = []
        for precision in self.precisions:
            if "colocated" in self.modes:
                units += self._colocated_units(precision)
            if "disaggregated" in self.modes:
                units += self._disaggregated_units(precision)
        if not units:
            raise ValueError(f"{self.model.name} ({', '.join(self.precisions)}) fits none of {self.hardware}")
        bar = _bar(len(units), self.progress, "planning")
        for cand in units:
            cand.goodput, cand.miss_rate, cand.probe = self.rate_bracket(cand.spec, self._rate_guess(cand.spec))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return units

    def max_rate(self, spec: ClusterSpec, guess: float, slo=None, output_len: int | None = None,
                 iters: int = 3) -> tuple[float, dict | None]:
        """Highest Poisson rate (req/s) with attainment >= target, and the simulation at that rate."""
        lo, _, best = self.rate_bracket(spec, guess, slo, output_len, iters)
        return lo, best

    def rate_bracket(self, spec: ClusterSpec, guess: float, slo=None, output_len: int | None = None,
                     iters: int = 3) -> tuple[float, float | None, dict | None]:
        """The highest Poisson rate (req/s) with attainment >= target and the lowest probed rate that
        missed it (bracketed from ``guess`` by factors of 1.5, then ``iters`` bisections), and the
        simulation at the first. A rate counted as a miss for want of probe requests (a lower bound) is
        no measured miss: the second is then the lowest simulated miss, or None."""
        cap = self.max_probe_requests * sum(p.instances for p in spec.pools.values())

        def ok(rate: float) -> tuple[bool, dict | None]:
            if math.ceil(rate * self.min_probe_s) > cap:
                # Too few requests to show sustained load at this rate: count it as a miss (the
                # result then is a lower bound; --max-probe-requests raises it).
                self.num_capped += 1
                return False, None
            r = self.simulate(spec, rate, slo, output_len)
            return r["slo_attainment"] >= self.attainment and self._tail_meets(r, slo or self.slo), r
        rate = max(guess, 1e-3)
        good, r = ok(rate)
        lo, hi, best = (rate, None, r) if good else (0.0, rate, None)
        missed = [] if good or r is None else [rate]  # rates whose simulation missed the target
        for _ in range(16):
            if good:
                if hi is not None:
                    break
                rate *= 1.5
            else:
                if lo > 0:
                    break
                rate /= 1.5
            good, r = ok(rate)
            if good:
                lo, best = rate, r
            else:
                hi = rate
                missed += [rate] if r is not None else []
            if lo > 0 and hi is not None:
                break
        if lo > 0.0 and hi is not None:
            for _ in range(iters):
                mid = (lo + hi) / 2
                good, r = ok(mid)
                if good:
                    lo, best = mid, r
                else:
                    hi = mid
                    missed += [mid] if r is not None else []
        return lo, min(missed, default=None), best

    def simulate(self, spec: ClusterSpec, rate: float, slo=None, output_len: int | None = None) -> dict:
        n = min(len(self.base), max(self.probe_requests, math.ceil(rate * self.min_probe_s)))
        # Fresh indices: a request drawn twice is two requests (its unique tokens differ; shared
        # prefixes come only from the trace's hash ids).
        items = [WorkItem(i, float(t / rate), it.input_len, output_len or it.output_len, it.hash_ids, it.block_size)
                 for i, (it, t) in enumerate(zip(self.base[:n], self.unit_times[:n], strict=True))]
        options = SimOptions(perf_model=self.perf_model, hardware_file=self.hardware_file)
        self.num_sims += 1
        return Simulator(spec, items, options, slo=slo or self.slo).run()

    def _tail_meets(self, result: dict, slo) -> bool:
        """Whether the last quarter of the probe's requests (by arrival) also reaches the target: an
        overloaded unit's queue grows through the probe, so its latest arrivals miss even when the
        average over a short probe still passes."""
        reqs = result.get("requests")
        if not reqs:
            return True
        tail = reqs[len(reqs) * 3 // 4:]
        ttft, tpot = slo
        met = sum(1 for q in tail if q["error"] is None and q["ttft_s"] is not None
                  and (ttft is None or q["ttft_s"] <= ttft) and (tpot is None or q["tpot_s"] is None or q["tpot_s"] <= tpot))
        return met >= self.attainment * len(tail)

    # -- candidates ------------------------------------------------------------------------------------
    def _layouts(self, hw: str, precision: str) -> list[tuple[int, str, int]]:
        """(cards per instance, parallelism, attention TP) to try on ``hw`` at ``precision``: tp: the
        smallest card count that fits, or the --tp-options that fit; ep (MoE): every TP x EP x DP layout
        (``moe.layouts``) at the smallest card count that has one (at least 2), or at the --tp-options."""
        card = self.catalogue[hw]
        if precision != "bf16" and precision not in card.tflops:
            return []  # no native rate for this precision on this card
        out = []
        for par in self.parallelisms:
            if par == "ep":
                found = moe.layouts(self.model, card, precision, max(self.tp_options or [64]))
                counts = sorted({lay.cards for lay in found})
                keep = [c for c in counts if c in self.tp_options] if self.tp_options else counts[:1]
                out += [(lay.cards, par, lay.attn_tp) for lay in found if lay.cards in keep]
                continue
            t0 = min_tp(self.model, card, precision, parallelism=par)
            if t0 is None:
                continue
            out += [(t, par, 1) for t in self.tp_options if t >= t0] if self.tp_options else [(t0, par, 1)]
        return out

    def _pool(self, hw: str, instances: int, layout: tuple[int, str, int], budget: int, seqs: int) -> PoolSpec:
        tp, par, attn_tp = layout
        ep = par == "ep"
        return PoolSpec(hw, instances, tp, budget, seqs, parallelism=par, attn_tp=attn_tp,
                        moe_imbalance=self.options.moe_imbalance if ep else 1.0,
                        ep_overlap=self.options.ep_overlap and ep)

    def _colocated_units(self, precision: str) -> list[Candidate]:
        out = []
        for hw in self.hardware:
            layouts = self._layouts(hw, precision)
            guess = {lay: self._rate_guess(self._colocated(hw, precision, lay, 2048, 256)) for lay in layouts}
            for lay in _best_attn_tp(layouts, guess):
                for budget, seqs in ((2048, 256), (8192, 256), (2048, 64)):
                    out.append(Candidate(self._colocated(hw, precision, lay, budget, seqs)))
        return out

    def _colocated(self, hw: str, precision: str, layout: tuple[int, str, int], budget: int, seqs: int) -> ClusterSpec:
        return self._spec("colocated", precision, colocated=self._pool(hw, 1, layout, budget, seqs))

    def _disaggregated_units(self, precision: str) -> list[Candidate]:
        ttft_slo = (self.slo[0], None)
        prefill_rates: dict[tuple[str, tuple[int, str, int]], float] = {}
        decode_layouts: dict[str, list[tuple[int, str, int]]] = {}
        for hw in self.hardware:
            layouts = self._layouts(hw, precision)
            rates = {}
            for lay in layouts:
                spec = self._colocated(hw, precision, lay, 8192, 64)
                rates[lay], _ = self.max_rate(spec, self._rate_guess(spec), slo=ttft_slo, output_len=1)
            prefill_rates.update({(hw, lay): rates[lay] for lay in _best_attn_tp(layouts, rates)})
            decode = {lay: self._decode_rate(self._pool(hw, 1, lay, 2048, 512), precision) for lay in layouts}
            decode_layouts[hw] = _best_attn_tp(layouts, decode)
        out = []
        for (hp, layp), rp in prefill_rates.items():
            if rp <= 0:
                continue
            for hd in self.hardware:
                for layd in decode_layouts[hd]:
                    for seqs in (512,):
                        rd = self._decode_rate(self._pool(hd, 1, layd, 2048, seqs), precision)
                        if rd <= 0:
                            continue
                        for x, y in _ratios(rd / rp):
                            out.append(Candidate(self._spec(
                                "disaggregated", precision, prefill=self._pool(hp, x, layp, 8192, 64),
                                decode=self._pool(hd, y, layd, 2048, seqs))))
        return out

    def _decode_rate(self, pool: PoolSpec, precision: str) -> float:
        """Steady-state decode rate of one instance of ``pool``: the largest batch whose step meets TPOT
        (with 10% margin) and whose KV fits, served for avg_out steps."""
        hw = self.catalogue[pool.hardware]
        pm = AnalyticPerfModel(self.model, hw, pool.tp, precision, parallelism=pool.parallelism, **moe_settings(pool))
        kv_tokens = instance_kv_blocks(self.model, hw, pool.tp, precision, 16, parallelism=pool.parallelism,
                                       attn_tp=pool.attn_tp) * 16
        ctx = self.avg_in + self.avg_out / 2
        tpot = self.slo[1] * 0.9 if self.slo[1] else math.inf
        best = 0.0
        b = 1
        while b <= pool.max_num_seqs and b * (self.avg_in + self.avg_out) <= kv_tokens:
            t = pm.decode_step_time_s(b, int(b * ctx))
            if t > tpot:
                break
            best = max(best, b / (self.avg_out * t))
            b = b + 1 if b < 8 else int(b * 1.25)
        return best

    def _rate_guess(self, spec: ClusterSpec) -> float:
        """Analytic capacity of a unit: prefill rate (prompts/s at full-prompt steps) combined with the
        steady-state decode rate; the rate search starts here."""
        def prefill_rate(pool: PoolSpec) -> float:
            pm = AnalyticPerfModel(self.model, self.catalogue[pool.hardware], pool.tp, spec.precision,
                                   parallelism=pool.parallelism, **moe_settings(pool))
            n = max(1, int(self.avg_in))
            return pool.instances / max(pm.step_time_s(_prefill_shape(n)), 1e-9)

        def decode_rate(pool: PoolSpec) -> float:
            return self._decode_rate(pool, spec.precision)
        if spec.mode == "colocated":
            p = spec.colocated
            rd = decode_rate(p)
            rp = prefill_rate(p)
            return max(0.05, 1.0 / (1.0 / rp + 1.0 / rd) if rd > 0 else rp)
        rd = spec.decode.instances * decode_rate(spec.decode)
        return max(0.05, min(prefill_rate(spec.prefill), rd) if rd > 0 else prefill_rate(spec.prefill))

    def _spec(self, mode: str, precision: str, **pools) -> ClusterSpec:
        o = self.options
        return ClusterSpec(self.model_name, mode, precision=precision, routing=self.routing,
                           kv_store=o.kv_store, kv_store_planning=o.kv_store_planning, **pools)


def rank(cands: list[Candidate], catalogue, cards: int | None, budget: float | None) -> list[dict]:
    """Scale every unit to the card count or budget; sort by cluster goodput, then cost per token."""
    rows = []
    for c in cands:
        if c.goodput <= 0 or c.probe is None:
            continue
        price = sum(p.num_cards * catalogue[p.hardware].price_per_hour for p in c.spec.pools.values())
        power = sum(p.num_cards * catalogue[p.hardware].power_w for p in c.spec.pools.values())
        n_units = cards // c.unit_cards if cards else int(budget // price) if price else 0
        if n_units < 1:
            continue
        cost = c.probe["sim"]["cost"]
        rows.append({
            "mode": c.spec.mode, "precision": c.spec.precision, "unit": c.spec.to_dict(), "units": n_units,
            "cards": n_units * c.unit_cards, "cards_by_kind": _cards_by_kind(c.spec, n_units),
            "unit_goodput_rps": c.goodput, "goodput_rps": n_units * c.goodput,
            "goodput_per_card": c.goodput / c.unit_cards, "price_per_hour": n_units * price,
            "power_kw_tdp": n_units * power / 1e3,
            "cost_per_mtok": {k: cost[k] for k in ("cached_input_per_mtok", "uncached_input_per_mtok",
                                                   "output_per_mtok", "blended_per_mtok")},
            "ttft_p90_s": c.probe["ttft_s"]["p90"], "tpot_p90_s": c.probe["tpot_s"]["p90"],
            "attainment": c.probe["slo_attainment"], "output_tokens_per_s": n_units * c.probe["output_throughput"],
            # Headroom: attainment falls under the target between the goodput and this rate (the lowest
            # probed rate that missed; None: none did)
            "misses_at_rps": n_units * c.miss_rate if c.miss_rate is not None else None,
        })
    rows.sort(key=lambda r: (-r["goodput_rps"], r["cost_per_mtok"]["blended_per_mtok"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def best_cluster(row: dict) -> ClusterSpec:
    unit = ClusterSpec.from_dict(row["unit"])
    pools = {name: replace(p, instances=p.instances * row["units"]) for name, p in unit.pools.items()}
    extra = {"predicted_goodput_rps": row["goodput_rps"], "price_per_hour": row["price_per_hour"],
             "cost_per_mtok": row["cost_per_mtok"], "planned_by": "pdserve plan"}
    return replace(unit, extra=extra, **pools)


def _cards_by_kind(unit: ClusterSpec, n_units: int) -> dict[str, int]:
    """The cluster's cards per catalogue entry (a mixed fleet's bill of materials)."""
    out: dict[str, int] = {}
    for p in unit.pools.values():
        out[p.hardware] = out.get(p.hardware, 0) + n_units * p.num_cards
    return out


def _best_attn_tp(layouts: list[tuple[int, str, int]], score: dict) -> list[tuple[int, str, int]]:
    """Of the layouts that differ only in attention TP, the one with the highest score (the first on a
    tie); the others as they are, in order."""
    best: dict[tuple[int, str], tuple[int, str, int]] = {}
    for lay in layouts:
        key = lay[:2]
        if key not in best or score[lay] > score[best[key]]:
            best[key] = lay
    return [lay for lay in layouts if best[lay[:2]] == lay]


def _ratios(target: float, max_group: int = 8) -> list[tuple[int, int]]:
    """The two (prefill, decode) instance counts with x + y <= max_group nearest to y/x = target."""
    scored = []
    for x in range(1, max_group):
        y = max(1, round(x * target))
        if x + y <= max_group:
            scored.append((abs(math.log(y / x / target)), x + y, x, y))
    scored.sort()
    seen, out = set(), []
    for _, _, x, y in scored:
        g = math.gcd(x, y)
        if (x // g, y // g) not in seen:
            seen.add((x // g, y // g))
            out.append((x // g, y // g))
        if len(out) == 2:
            break
    return out or [(1, max(1, min(max_group - 1, round(target))))]


def _prefill_shape(n: int):
    from pdserve.sim.perf_model import BatchShape
    return BatchShape(n, n * (n + 1) / 2, n, 0, 0, 1)


def _precisions(text: str, perf_model: str) -> list[str]:
    from pdserve.sim.hardware import PRECISIONS
    names = list(AUTO_PRECISIONS) if text == "auto" else [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if not names or bad:
        raise ValueError(f"--precision takes auto or names from {PRECISIONS}, got {text!r}")
    if perf_model != "analytic" and len(names) > 1:
        # A calibrated model measured one engine at one precision: searching others would rank copies.
        logger.info("calibrated perf model: planning at %s only", names[0])
        return names[:1]
    return names


def _parallelisms(text: str, is_moe: bool) -> list[str]:
    names = (["tp", "ep"] if is_moe else ["tp"]) if text == "auto" else [p.strip() for p in text.split(",") if p.strip()]
    if not names or set(names) - {"tp", "ep"}:
        raise ValueError(f"--parallelism takes auto, tp, ep or tp,ep, got {text!r}")
    if "ep" in names and not is_moe:
        raise ValueError("--parallelism ep needs an MoE model")
    return names


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="unit")
