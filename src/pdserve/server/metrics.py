"""Prometheus metrics, with vLLM's names where one exists.

Request latencies are observed at the frontend (histograms). Worker state (running, waiting, KV use) and
worker totals (tokens, prefix-cache queries and hits) are read from each worker's latest Stats message at
scrape time, labelled by worker and role. KV transfers are observed from PrefillDone reports.

The KV store (kv/store/), per worker and tier, from the workers' Stats: ``pdserve:kv_store_hits_total`` and
``_misses_total`` (blocks found / not found by loads), ``_load_bytes_total``, ``_save_bytes_total``,
``_load_seconds`` and ``_save_seconds`` (summaries: count and sum), ``_evictions_total``, ``_errors_total``,
``_used_bytes`` and ``_capacity_bytes``; per worker ``pdserve:kv_store_save_drops_total`` (saves dropped by a
full queue) and ``pdserve:kv_store_loaded_tokens_total`` (prompt tokens loaded instead of computed).

pdserve's own request totals: ``pdserve:tokens_total{kind}`` (``input``: prompt tokens computed,
``cached_input``: prompt tokens found in the prefix cache, ``output``: tokens generated; the kinds of
``sim/cost.py``), and, once objectives are set (``set_objectives``), ``pdserve:slo_requests_total``
(finished requests judged) and ``pdserve:slo_met_requests_total{objective="ttft|tpot|both"}``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TRANSFER_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


TOKEN_KINDS = ("input", "cached_input", "output")
OBJECTIVES = ("ttft", "tpot", "both")


@dataclass
class RequestTotals:
    """Finished requests' tokens by kind and, with objectives, how many met them (totals since start)."""

    input: int = 0
    cached_input: int = 0
    output: int = 0
    slo_judged: int = 0
    slo_met_ttft: int = 0
    slo_met_tpot: int = 0
    slo_met_both: int = 0


class Metrics:
    def __init__(self, model_name: str, worker_stats: Callable[[], list] | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("vllm:request_success", "Finished requests by finish reason",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.kv_transfer_seconds = Histogram("pdserve:kv_transfer_seconds", "KV transfer time per request",
                                             ["role"], buckets=_TRANSFER_BUCKETS, registry=self.registry)
        self.kv_transfer_bytes = Counter("pdserve:kv_transfer_bytes", "KV bytes transferred", ["role"],
                                         registry=self.registry)
        self.errors = Counter("pdserve:request_errors", "Requests that ended with an error", ["type"],
                              registry=self.registry)
        self.totals = RequestTotals()
        self.objectives: tuple[float | None, float | None] | None = None  # (TTFT s, TPOT s)
        self.registry.register(_TotalsCollector(self))
        self.paths = Counter("pdserve:prefill_path", "Requests by where their prompt was computed",
                             ["path"], registry=self.registry)
        self.ttft_error = Histogram("pdserve:ttft_prediction_ratio", "Actual TTFT / the router's prediction (uncorrected)",
                                    ["path"], buckets=(0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0),
                                    registry=self.registry)
        self.decisions = Counter("pdserve:elastic_decisions", "Decisions of the elastic controller", ["kind"],
                                 registry=self.registry)
        self.migrations = Counter("pdserve:request_migrations", "Requests moved to another decode worker after "
                                  "theirs died mid-stream", registry=self.registry)
        if worker_stats is not None:
            self.registry.register(_WorkerCollector(model_name, worker_stats))
        self.attainment = None  # control.attainment.Attainment, set by the frontend: exported at scrape time

    def observe_path(self, path: str, ttft_s: float, predicted_ttft_s: float | None) -> None:
        self.paths.labels(path).inc()
        if predicted_ttft_s:
            self.ttft_error.labels(path).observe(ttft_s / predicted_ttft_s)

    def observe_decision(self, kind: str) -> None:
        self.decisions.labels(kind).inc()

    def set_objectives(self, ttft_s: float | None, tpot_s: float | None) -> None:
        """Judge every finished request against these objectives from now on (None: not judged on it)."""
        self.objectives = (ttft_s, tpot_s)

    def observe_request(self, ttft_s: float | None, e2e_s: float, num_output_tokens: int,
                        finish_reason: str | None, num_prompt_tokens: int = 0, num_cached_tokens: int = 0) -> None:
        tpot_s = None
        if ttft_s is not None:
            self.ttft.labels(self.model_name).observe(ttft_s)
            if num_output_tokens > 1:
                tpot_s = (e2e_s - ttft_s) / (num_output_tokens - 1)
                self.tpot.labels(self.model_name).observe(tpot_s)
        self.e2e.labels(self.model_name).observe(e2e_s)
        self.requests.labels(self.model_name, finish_reason or "abort").inc()
        t = self.totals
        if num_output_tokens:  # as the planner counts: the prompts of requests that produced a token
            cached = min(num_cached_tokens, num_prompt_tokens)
            t.cached_input += cached
            t.input += num_prompt_tokens - cached
        t.output += num_output_tokens
        if self.objectives is not None and ttft_s is not None:
            ttft_ok = self.objectives[0] is None or ttft_s <= self.objectives[0]
            tpot_ok = self.objectives[1] is None or tpot_s is None or tpot_s <= self.objectives[1]
            t.slo_judged += 1
            t.slo_met_ttft += ttft_ok
            t.slo_met_tpot += tpot_ok
            t.slo_met_both += ttft_ok and tpot_ok

    def observe_transfer(self, role: str, kv_bytes: int, seconds: float) -> None:
        self.kv_transfer_seconds.labels(role).observe(seconds)
        self.kv_transfer_bytes.labels(role).inc(kv_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def bind_attainment(self, attainment) -> None:
        """Export the rolling SLO attainment (``pdserve:slo_attainment{phase}``, ``pdserve:itl_p99_seconds``)."""
        self.registry.register(_AttainmentCollector(attainment))


class _AttainmentCollector:
    """The last window's attainment per phase, at scrape time."""

    def __init__(self, attainment) -> None:
        self.attainment = attainment

    def collect(self) -> Iterator:
        import time

        a = self.attainment.window(time.monotonic())
        family = GaugeMetricFamily("pdserve:slo_attainment", "Share of the window's requests meeting the objective",
                                   labels=["phase"])
        for phase, value in (("ttft", a.ttft), ("tpot", a.tpot), ("both", a.both)):
            if value is not None:
                family.add_metric([phase], value)
        yield family
        itl = GaugeMetricFamily("pdserve:itl_p99_seconds", "99th percentile of inter-token latency over the window")
        if a.itl_p99_s is not None:
            itl.add_metric([], a.itl_p99_s)
        yield itl


class _TotalsCollector:
    """``RequestTotals`` as counters, at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator:
        t = self.metrics.totals
        tokens = CounterMetricFamily("pdserve:tokens", "Tokens of finished requests by kind (input: computed "
                                     "prompt tokens, cached_input: prefix-cache hits, output: generated)",
                                     labels=["kind"])
        for kind in TOKEN_KINDS:
            tokens.add_metric([kind], getattr(t, kind))
        yield tokens
        if self.metrics.objectives is None:
            return
        yield CounterMetricFamily("pdserve:slo_requests", "Finished requests judged against the objectives",
                                  value=t.slo_judged)
        met = CounterMetricFamily("pdserve:slo_met_requests", "Judged requests that met the objective",
                                  labels=["objective"])
        for objective in OBJECTIVES:
            met.add_metric([objective], getattr(t, f"slo_met_{objective}"))
        yield met


class _WorkerCollector:
    """Gauges and totals from the workers' latest Stats, at scrape time."""

    def __init__(self, model_name: str, worker_stats: Callable[[], list]) -> None:
        self.model_name = model_name
        self.worker_stats = worker_stats

    def collect(self) -> Iterator:
        labels = ["model_name", "worker", "role"]
        gauges = {
            "vllm:num_requests_running": ("Requests in the running batch", lambda s: s.num_running),
            "vllm:num_requests_waiting": ("Requests waiting", lambda s: s.num_waiting + s.num_awaiting_kv),
            "vllm:kv_cache_usage_perc": ("KV-cache usage (1 = full)", lambda s: s.kv_usage),
            "pdserve:worker_cores": ("Cores the worker runs on (0: parked)",
                                     lambda s: len(s.cpus) if s.cpus is not None else float("nan")),
            "pdserve:worker_step_target_seconds": ("Stall-free chunking's step target (NaN: none)",
                                                   lambda s: s.step_target_s if s.step_target_s else float("nan")),
            "pdserve:worker_queued_prefill_tokens": ("Prompt tokens waiting for prefill",
                                                     lambda s: s.queued_prefill_tokens),
        }
        counters = {
            "vllm:prefix_cache_queries": ("Prompt tokens looked up in the prefix cache",
                                          lambda s: s.prefix_query_tokens),
            "vllm:prefix_cache_hits": ("Prompt tokens found in the prefix cache", lambda s: s.prefix_hit_tokens),
            "vllm:prompt_tokens": ("Prompt tokens computed", lambda s: s.num_prompt_tokens),
            "vllm:generation_tokens": ("Tokens generated", lambda s: s.num_generation_tokens),
            "vllm:num_preemptions": ("Preemptions", lambda s: s.num_preemptions),
        }
        stats = [s for s in self.worker_stats() if s is not None]
        yield from _store_families(self.model_name, stats)
        for name, (doc, get) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=labels)
            for s in stats:
                family.add_metric([self.model_name, s.worker_id, s.role], get(s))
            yield family
        for name, (doc, get) in counters.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            for s in stats:
                family.add_metric([self.model_name, s.worker_id, s.role], get(s))
            yield family


_STORE_COUNTERS = {
    "pdserve:kv_store_hits": ("KV store blocks loaded, by tier", "hits"),
    "pdserve:kv_store_misses": ("KV store blocks looked for by a load and not found (or corrupt), by tier", "misses"),
    "pdserve:kv_store_load_bytes": ("KV store bytes loaded, by tier", "load_bytes"),
    "pdserve:kv_store_save_bytes": ("KV store bytes saved, by tier", "save_bytes"),
    "pdserve:kv_store_evictions": ("KV store blocks evicted, by tier", "evictions"),
    "pdserve:kv_store_errors": ("KV store calls that failed (the tier was skipped a while)", "errors"),
}
_STORE_GAUGES = {
    "pdserve:kv_store_used_bytes": ("KV store bytes held now, by tier", "used_bytes"),
    "pdserve:kv_store_capacity_bytes": ("KV store budget, by tier", "capacity_bytes"),
}


def _store_families(model_name: str, stats: list) -> Iterator:
    """The KV store's counters from the workers' Stats (only workers that use a store report any)."""
    labels = ["model_name", "worker", "tier"]
    with_store = [s for s in stats if s.kv_store]
    for name, (doc, field) in _STORE_COUNTERS.items():
        family = CounterMetricFamily(name, doc, labels=labels)
        for s in with_store:
            for t in s.kv_store:
                family.add_metric([model_name, s.worker_id, t.tier], getattr(t, field))
        yield family
    for name, (doc, field) in _STORE_GAUGES.items():
        family = GaugeMetricFamily(name, doc, labels=labels)
        for s in with_store:
            for t in s.kv_store:
                family.add_metric([model_name, s.worker_id, t.tier], getattr(t, field))
        yield family
    for kind, count, total in (("load", "num_loads", "load_s"), ("save", "num_saves", "save_s")):
        family = SummaryMetricFamily(f"pdserve:kv_store_{kind}_seconds",
                                     f"KV store {kind} time by tier (count: {'loads' if kind == 'load' else 'blocks saved'})",
                                     labels=labels)
        for s in with_store:
            for t in s.kv_store:
                family.add_metric([model_name, s.worker_id, t.tier], getattr(t, count), getattr(t, total))
        yield family
    for name, doc, get in (("pdserve:kv_store_save_drops", "KV store saves dropped (the save queue was full)",
                            lambda s: s.kv_store_save_drops),
                           ("pdserve:kv_store_loaded_tokens", "Prompt tokens loaded from the KV store, not computed",
                            lambda s: s.kv_store_loaded_tokens)):
        family = CounterMetricFamily(name, doc, labels=["model_name", "worker"])
        for s in with_store:
            family.add_metric([model_name, s.worker_id], get(s))
        yield family
