"""The frontend's monitor (server/monitor.py) and request totals (server/metrics.py): windows over
snapshots, histogram percentiles, SLO attainment, and what /metrics and /v1/cluster carry."""
from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve import protocol as p
from pdserve.control.attainment import Objectives
from pdserve.server.api_responses import ClusterStatus
from pdserve.server.client import FrontendClient, FrontendOptions, WorkerConn
from pdserve.server.cluster_status import cluster_status
from pdserve.server.metrics import Metrics
from pdserve.server.monitor import ClusterMonitor, MonitorOptions, _histogram_quantile


def _client(uptime_s=0.0, busy_s=0.0, prefill_busy_s=0.0, **options) -> FrontendClient:
    """A frontend client that has heard from one colocated worker on two cores (no sockets: the messages go
    through the client's own dispatch, as they come off the wire)."""
    client = FrontendClient(FrontendOptions(("tcp://x",), **options))
    conn = WorkerConn("tcp://x", None)
    client._dispatch(conn, p.WorkerInfo("both-0", "both", "m", 1, "h", 16, 100, 2048, device="cpu",
                                        device_name="AMD EPYC", num_cores=2, hardware="cpu-this-machine"))
    _stats(client, uptime_s, busy_s, prefill_busy_s)
    return client


def _stats(client: FrontendClient, uptime_s: float, busy_s: float, prefill_busy_s: float, **fields) -> None:
    fields.setdefault("core_s", 2 * uptime_s)
    client._dispatch(client.conns["both-0"], p.Stats(
        "both-0", "both", 0.0, num_running=3, num_waiting=1, kv_usage=0.25, num_blocks=100, num_free_blocks=75,
        uptime_s=uptime_s, busy_s=busy_s, prefill_busy_s=prefill_busy_s, prefix_query_tokens=10,
        prefix_hit_tokens=4, **fields))


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (math.inf, 20.0)]
    assert _histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert _histogram_quantile(0.75, buckets) == pytest.approx(0.75)
    assert _histogram_quantile(0.9, [(0.1, 0.0), (math.inf, 5.0)]) == pytest.approx(0.1)  # past the last bound
    assert _histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None


def test_metrics_count_tokens_by_kind_and_judge_objectives():
    m = Metrics("m")
    m.observe_request(0.2, 1.0, 5, "length", num_prompt_tokens=10, num_cached_tokens=4)
    text = m.render().decode()
    assert "pdserve:slo_requests_total" not in text  # no objectives, no attainment
    m.set_objectives(0.5, 0.1)
    m.observe_request(0.2, 1.0, 5, "length", num_prompt_tokens=8)  # TPOT 0.2 > 0.1
    m.observe_request(0.9, 1.0, 1, "stop", num_prompt_tokens=3)  # TTFT missed; one token: TPOT not judged
    m.observe_request(None, 1.0, 0, "abort", num_prompt_tokens=7)  # no token: neither counted nor judged
    t = m.totals
    assert (t.input, t.cached_input, t.output) == (6 + 8 + 3, 4, 11)
    assert (t.slo_judged, t.slo_met_ttft, t.slo_met_tpot, t.slo_met_both) == (2, 1, 1, 0)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert samples[("pdserve:tokens_total", (("kind", "cached_input"),))] == 4
    assert samples[("pdserve:slo_met_requests_total", (("objective", "ttft"),))] == 1
    assert samples[("pdserve:slo_requests_total", ())] == 2


def test_windows_rates_and_attainment_over_snapshots():
    client = _client()
    monitor = ClusterMonitor(client, MonitorOptions(slo_ttft_s=1.0, slo_tpot_s=0.1, sample_interval_s=10.0))
    m = Metrics("m", lambda: [c.stats for c in client.conns.values()])
    monitor.attach(m)
    monitor.sample(time_s=100.0)
    for ttft in (0.3, 0.4, 2.0):
        m.observe_request(ttft, ttft + 0.45, 10, "length", num_prompt_tokens=20, num_cached_tokens=5)
    _stats(client, 3600.0, 100.0, 25.0)
    monitor.sample(time_s=110.0)
    w = monitor.window(60.0)
    assert w["seconds"] == 10.0
    assert w["rates"]["requests_per_s"] == pytest.approx(0.3)
    assert w["rates"]["tokens_per_s"] == pytest.approx({"input": 4.5, "cached_input": 1.5, "output": 3.0})
    assert w["slo_attainment"] == pytest.approx({"both": 2 / 3, "ttft": 2 / 3, "tpot": 1.0, "num_requests": 3})
    assert 0.25 <= w["latency"]["ttft_s"]["p50"] <= 0.5
    assert w["cost"]["input_time_share"] == pytest.approx(0.25)
    # the cost gauges on /metrics: every window, NaN where a kind has no tokens
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    gauge = {(s.labels["kind"], s.labels["window"]): s.value
             for s in families["pdserve:cost_per_million_tokens"].samples}
    assert set(gauge) == {(k, w) for k in ("input", "cached_input", "output") for w in ("1m", "5m", "total")}
    cpu_price = 0.08  # hardware.yaml, cpu-this-machine, two cores
    assert [s.value for s in families["pdserve:cost_usd"].samples] == [pytest.approx(cpu_price)]
    assert gauge[("output", "total")] == pytest.approx(cpu_price * 0.75 / 30 * 1e6)


def test_cluster_status_carries_workers_cost_and_history():
    client = _client(uptime_s=7200.0, busy_s=10.0, prefill_busy_s=4.0)
    monitor = ClusterMonitor(client, MonitorOptions(prices=(("colocated", 1.5),)))
    monitor.attach(Metrics("m"))
    monitor.sample(time_s=1.0)
    body = cluster_status(client, monitor)
    worker = body["workers"][0]
    assert worker["role"] == "both" and worker["num_cores"] == 2 and worker["num_running"] == 3
    assert worker["prefix_cache_hit_rate"] == pytest.approx(0.4)
    assert worker["price_per_hour"] == 1.5 and worker["price_source"] == "--price-per-hour"
    assert body["cost"]["cost_usd"] == pytest.approx(3.0)
    assert body["cost"]["windows"]["total"]["device_hours"]["both"] == pytest.approx(2.0)
    assert body["slo"] is None and len(body["history"]) == 1
    assert body["history"][0]["load"] == {"num_running": 3, "num_waiting": 1}
    assert cluster_status(client, monitor, history_since=body["history"][0]["unix_s"])["history"] == []
    assert body["mode"] == "colocated" and body["elastic"] is None and body["path_choice"] is False
    assert body["attainment"]["num_requests"] == 0
    ClusterStatus.model_validate(body)  # the body the OpenAPI document describes


def test_cluster_status_carries_the_routing_view_and_the_elastic_controller():
    """What the elastic controller and path choice read and decide, beside the dashboard's figures."""
    from pdserve.control.controller import SetStepTarget
    from pdserve.server.elastic import carry_out

    client = _client(objectives=Objectives(ttft_s=2.0, tpot_s=0.1), elastic=True, path_choice=True)
    client.conns["both-0"].socket = _Sent()
    _stats(client, 60.0, 1.0, 0.5, cpus=[0, 1], step_target_s=0.09, queued_prefill_tokens=512,
           prefill_token_s=1e-3, decode_step_s=0.03, core_s=100.0)
    decision = SetStepTarget("both-0", 0.08, reason="TPOT attainment 0.80 < 0.9")
    carry_out(client, [decision])
    client.elastic.controller.record(123.0, [decision])
    monitor = ClusterMonitor(client)
    body = cluster_status(client, monitor)
    w = body["workers"][0]
    assert (w["role"], w["cores"], w["is_parked"], w["num_cores"]) == ("both", [0, 1], False, 2)
    assert (w["step_target_s"], w["queued_prefill_tokens"], w["prefill_token_s"], w["decode_step_s"]) == \
        (0.08, 512, 1e-3, 0.03)
    assert w["core_s"] == 100.0 and w["pid"] == 1 and w["num_free_blocks"] == 75
    assert body["mode"] == "auto" and body["path_choice"] is True
    assert body["elastic"]["objectives"]["tpot_s"] == 0.1
    assert [(d["kind"], d["reason"]) for d in body["elastic"]["decisions"]] == \
        [("SetStepTarget", "TPOT attainment 0.80 < 0.9")]
    assert body["elastic"]["held"] == []
    assert client.conns["both-0"].socket.sent  # the decision went to the worker
    ClusterStatus.model_validate(body)


class _Sent:
    """A socket that keeps what is sent on it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


PLAN = {"predicted_goodput_rps": 4.4, "price_per_hour": 0.08, "planned_by": "pdserve plan",
        "cost_per_mtok": {"cached_input_per_mtok": 0.0036, "uncached_input_per_mtok": 0.036,
                          "output_per_mtok": 0.057, "blended_per_mtok": 0.039}}


def test_the_planners_figures_sit_beside_the_live_cost():
    import argparse
    import json

    from pdserve.server.monitor_args import monitor_args_to_argv, monitor_options_from_args

    options = monitor_options_from_args(argparse.Namespace(planned=json.dumps(PLAN), price_per_hour=[]))
    client = _client(uptime_s=3600.0, busy_s=10.0, prefill_busy_s=4.0)
    monitor = ClusterMonitor(client, options)
    metrics = Metrics("m")
    monitor.attach(metrics)
    monitor.sample(time_s=1.0)
    planned = cluster_status(client, monitor)["cost"]["planned"]
    assert planned["cost_per_million_tokens"] == {"input": 0.036, "cached_input": 0.0036, "output": 0.057,
                                                  "blended": 0.039}
    assert planned["price_per_hour"] == 0.08 and planned["goodput_rps"] == 4.4
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert {s.labels["kind"]: s.value for s in families["pdserve:planned_cost_per_million_tokens"].samples} == \
        planned["cost_per_million_tokens"]
    assert families["pdserve:planned_price_per_hour"].samples[0].value == 0.08
    # ``pdserve up`` hands the cluster file's figures to its frontend as they are
    assert monitor_args_to_argv(argparse.Namespace(planned=json.dumps(PLAN), price_per_hour=[])) == \
        ["--planned", json.dumps(PLAN)]


def test_without_a_plan_there_is_nothing_planned_and_bad_figures_are_named():
    import argparse

    from pdserve.server.monitor_args import monitor_options_from_args

    client = _client()
    monitor = ClusterMonitor(client, MonitorOptions())
    metrics = Metrics("m")
    monitor.attach(metrics)
    assert cluster_status(client, monitor)["cost"]["planned"] is None
    assert "pdserve:planned_cost_per_million_tokens" not in metrics.render().decode()
    for bad, message in (("{", "not JSON"), ('{"cost_per_mtok": {"output_per_mtok": -1}}', "output_per_mtok"),
                         ('{"planned_by": "me"}', "neither"), ("[1]", "mapping")):
        with pytest.raises(ValueError, match=message):
            monitor_options_from_args(argparse.Namespace(planned=bad, price_per_hour=[]))
