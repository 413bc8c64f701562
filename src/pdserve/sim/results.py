"""What a simulation measured, in the JSON shape of ``pdserve bench`` (``bench.metrics`` definitions).

The recorder keeps per-request times (send, first token, last token, end) and inter-token latencies as
weighted samples: a decode step of b requests that all got their previous token at the step's start
adds one gap with weight b. Percentiles of weighted samples are computed exactly as ``np.percentile``
(linear) would on the expanded list, so the figures equal those of ``bench.metrics.compute_metrics``.
"""
from __future__ import annotations

import math
from array import array
from collections import Counter

import numpy as np

from pdserve.bench.metrics import DEFAULT_ATTAINMENT, PERCENTILES, summarize
from pdserve.bench.report import RESULT_VERSION

MAX_REQUEST_ENTRIES = 20000  # per-request entries in the result up to this many requests


class Recorder:
    def __init__(self, num_requests: int, slo: tuple[float | None, float | None]) -> None:
        n = num_requests
        self.slo_ttft_s, self.slo_tpot_s = slo
        self.send_s = [math.nan] * n
        self.first_s = [math.nan] * n
        self.last_s = [math.nan] * n
        self.end_s = [math.nan] * n
        self.num_tokens = [0] * n
        self.input_len = [0] * n
        self.output_len = [0] * n
        self.cached_tokens = [0] * n
        self.errors: dict[int, str] = {}
        self.num_done = 0
        self.kv_bytes = 0.0
        self.return_s = 0.0  # a token reaches the client this long after its worker emits it
        self._itl = array("d")
        self._itl_weight = array("q")

    # -- recording -------------------------------------------------------------------------------------
    def send(self, slot: int, now: float, input_len: int, output_len: int) -> None:
        self.send_s[slot] = now
        self.input_len[slot] = input_len
        self.output_len[slot] = output_len

    def first_token(self, slot: int, now: float, num_cached_tokens: int) -> None:
        self.first_s[slot] = self.last_s[slot] = now
        self.num_tokens[slot] = 1
        self.cached_tokens[slot] = max(0, num_cached_tokens)

    def token(self, slot: int, now: float) -> None:
        self._itl.append(now - self.last_s[slot])
        self._itl_weight.append(1)
        self.last_s[slot] = now
        self.num_tokens[slot] += 1

    def add_itl(self, gap_s: float, weight: int) -> None:
        self._itl.append(gap_s)
        self._itl_weight.append(weight)

    def finish(self, slot: int, now: float) -> None:
        self.end_s[slot] = now
        self.num_done += 1

    def fail(self, slot: int, now: float, error: str) -> None:
        self.errors[slot] = error
        self.end_s[slot] = now
        self.num_done += 1

    # -- the result ------------------------------------------------------------------------------------
    def result(self, scale: float = 1.0) -> dict:
        """Bench-shaped metrics; throughputs and goodput multiplied by ``scale`` (sampled clusters)."""
        n = len(self.send_s)
        ok = [i for i in range(n) if i not in self.errors and self.num_tokens[i] > 0 and not math.isnan(self.end_s[i])]
        send = np.array([self.send_s[i] for i in ok])
        first = np.array([self.first_s[i] for i in ok]) + self.return_s
        end = np.array([self.end_s[i] for i in ok]) + self.return_s
        ntok = np.array([self.num_tokens[i] for i in ok], dtype=float)
        ttft = first - send
        e2e = end - send
        multi = ntok > 1
        tpot = np.where(multi, (e2e - ttft) / np.maximum(ntok - 1, 1), np.nan)
        met = np.ones(len(ok), dtype=bool)
        if self.slo_ttft_s is not None:
            met &= ttft <= self.slo_ttft_s
        if self.slo_tpot_s is not None:
            met &= ~multi | (tpot <= self.slo_tpot_s)
        ends = [e + self.return_s for e in self.end_s if not math.isnan(e)]
        duration = max(ends) if ends else 0.0
        per_s = (lambda x: x * scale / duration) if duration > 0 else (lambda x: 0.0)
        out_tokens = int(ntok.sum())
        in_tokens = int(sum(self.input_len[i] for i in ok))
        num_met = int(met.sum())
        result = {
            "kind": "run", "version": RESULT_VERSION, "label": "sim", "created_at": None,
            "num_sent": n, "completed": len(ok), "failed": n - len(ok), "duration_s": duration,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "request_throughput": per_s(len(ok)), "output_throughput": per_s(out_tokens),
            "total_token_throughput": per_s(in_tokens + out_tokens),
            "ttft_s": summarize(ttft.tolist()), "tpot_s": summarize(tpot[multi].tolist()),
            "itl_s": weighted_summary(np.frombuffer(self._itl, dtype=float), np.frombuffer(self._itl_weight, dtype=np.int64)),
            "e2e_s": summarize(e2e.tolist()),
            "num_slo_met": num_met, "slo_attainment": num_met / n if n else 0.0, "goodput": per_s(num_met),
            "errors": dict(sorted(Counter(self.errors.values()).items())),
            "slo": {"ttft_s": self.slo_ttft_s, "tpot_s": self.slo_tpot_s},
            "attainment_target": DEFAULT_ATTAINMENT,
            "total_cached_input_tokens": int(sum(self.cached_tokens[i] for i in ok)),
        }
        if n <= MAX_REQUEST_ENTRIES:
            result["requests"] = self._request_entries(ok, ttft, tpot, e2e)
        return result

    def _request_entries(self, ok, ttft, tpot, e2e) -> list[dict]:
        pos = {i: j for j, i in enumerate(ok)}
        entries = []
        for i in range(len(self.send_s)):
            j = pos.get(i)
            entries.append({
                "index": i, "input_len": self.input_len[i], "output_len": self.output_len[i],
                "output_tokens": self.num_tokens[i], "send_s": round(self.send_s[i], 6),
                "ttft_s": None if j is None else float(ttft[j]),
                "tpot_s": None if j is None or math.isnan(tpot[j]) else float(tpot[j]),
                "e2e_s": None if j is None else float(e2e[j]),
                "cached_tokens": self.cached_tokens[i], "error": self.errors.get(i),
            })
        return entries


def weighted_summary(values: np.ndarray, weights: np.ndarray) -> dict[str, float | None]:
    """``bench.metrics.summarize`` of the list where each value appears ``weight`` times."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    total = int(weights.sum()) if len(weights) else 0
    if total == 0:
        return summarize([])
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cum = np.cumsum(w)  # value v[i] occupies expanded positions [cum[i]-w[i], cum[i])

    def at(pos: int) -> float:
        return float(v[np.searchsorted(cum, pos, side="right")])

    out: dict[str, float | None] = {"mean": float(np.dot(v, w) / total)}
    for p in PERCENTILES:
        x = (total - 1) * p / 100.0
        lo = math.floor(x)
        a, b = at(lo), at(min(lo + 1, total - 1))
        out[f"p{p}"] = a + (b - a) * (x - lo)
    mean = out["mean"]
    out.update({"min": float(v[0]), "max": float(v[-1]),
                "std": float(math.sqrt(max(0.0, float(np.dot(w, (v - mean) ** 2)) / total)))})
    return out


def cluster_section(sim) -> dict:
    """Per-pool figures of a finished simulation: utilisation, steps, prefix hits, KV, cost, power, and the
    pool's performance model (``PerfModel.describe``: the analytic model names the operator tables it read
    and the rule that timed each operation group)."""
    from pdserve.sim.cost import run_cost
    duration = max((e for e in sim.recorder.end_s if not math.isnan(e)), default=0.0)
    pools = {}
    for name, insts in sim.pools.items():
        stats = [i.kv.stats for i in insts]
        q = sum(s.num_query_tokens for s in stats)
        pools[name] = {
            "instances_simulated": len(insts),
            "num_blocks_per_instance": insts[0].kv.num_blocks,
            "kv_tokens_per_instance": insts[0].kv.num_blocks * insts[0].kv.block_size,
            "steps": sum(i.num_steps for i in insts),
            "busy_fraction": sum(i.busy_s for i in insts) / (len(insts) * duration) if duration else 0.0,
            "preemptions": sum(i.scheduler.num_preemptions for i in insts),
            "prefix_hit_rate": sum(s.num_hit_tokens for s in stats) / q if q else 0.0,
            "prompt_tokens_computed": sum(i.prompt_tokens_computed for i in insts),
            "perf_model": insts[0].perf.describe(),
        }
    out = {"scale": sim.scale, "perf_model": sim.options.perf_model, "fast_forward": sim.options.fast_forward,
           "pools": pools, "kv_transfer_bytes": sim.recorder.kv_bytes * sim.scale,
           "cost": run_cost(sim, duration)}
    if sim.store is not None:  # per tier: blocks looked up at admission and found, loaded, saved, evicted
        out["kv_store"] = sim.store.summary()
    return out
