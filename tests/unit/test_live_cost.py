"""Live cost (server/cost.py) against hand computations, the apportioning shared with the planner
(sim/cost.py), the worker's busy meter (worker/busy.py) and the hardware catalogue's device matching."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pdserve.server import cost as live
from pdserve.server.metrics import RequestTotals
from pdserve.sim.cost import DEFAULT_CACHED_WEIGHT, cost_per_million, input_time_share, prefill_time, \
    step_prefill_share, token_costs
from pdserve.sim.hardware import detect_hardware, load_catalogue
from pdserve.sim.perf_model import BatchShape
from pdserve import protocol as p
from pdserve.worker.busy import BusyMeter


@dataclass
class Conn:  # the fields of server.client.WorkerConn that the cost reads
    info: p.WorkerInfo
    stats: p.Stats | None
    is_alive: bool = True
    request_ids: set = field(default_factory=set)


@dataclass
class Chunk:  # the fields of a scheduler chunk that BatchShape reads
    start: int
    num_tokens: int
    samples: bool = True


def _info(role, hardware="cpu-this-machine", num_cores=1):
    return p.WorkerInfo(f"{role}-0", role, "m", 1, "h", 16, 100, 2048, device="cpu", device_name="AMD EPYC",
                        num_cores=num_cores, hardware=hardware)


def _stats(role, uptime_s, busy_s, prefill_busy_s, core_s=None, cpus=None):
    """``core_s`` default: one core the whole uptime."""
    return p.Stats(f"{role}-0", role, 0.0, uptime_s=uptime_s, busy_s=busy_s, prefill_busy_s=prefill_busy_s,
                   core_s=uptime_s if core_s is None else core_s, cpus=cpus)


def test_parse_prices():
    assert live.parse_prices(["2.5"]) == {"*": 2.5}
    assert live.parse_prices(["prefill=3", "decode=1.25", "colocated=0"]) == {"prefill": 3.0, "decode": 1.25,
                                                                             "colocated": 0.0}
    for bad in (["gpu=2"], ["decode=cheap"], ["-1"], ["nan"], ["both=1"]):
        with pytest.raises(ValueError, match="--price-per-hour"):
            live.parse_prices(bad)


def test_worker_price_from_catalogue_cores_and_overrides():
    cpu = load_catalogue()["cpu-this-machine"]
    assert cpu.num_cores == 2
    one_core = live.worker_price(_info("decode", num_cores=1), {})
    assert one_core.price_per_hour == pytest.approx(cpu.price_per_hour / 2)
    assert one_core.num_devices == 0.5 and one_core.source == "catalogue:cpu-this-machine"
    h100 = live.worker_price(_info("prefill", hardware="h100-sxm", num_cores=0), {})
    assert h100.price_per_hour == load_catalogue()["h100-sxm"].price_per_hour and h100.num_devices == 1
    assert live.worker_price(_info("both"), {"colocated": 7.0}).price_per_hour == 7.0
    assert live.worker_price(_info("decode"), {"prefill": 7.0, "*": 1.5}).price_per_hour == 1.5
    unknown = live.worker_price(_info("decode", hardware=""), {})
    assert unknown.price_per_hour == 0.0 and unknown.source == "unknown"


def test_usage_and_window_match_a_hand_computation():
    # a prefill worker: all its busy time is prefill (its busy meter applies prefill_time)
    conns = [Conn(_info("prefill"), _stats("prefill", 3600.0, 900.0, 900.0)),
             Conn(_info("decode", num_cores=2), _stats("decode", 1800.0, 1200.0, 200.0, core_s=3600.0)),
             Conn(_info("both"), None)]  # connected, no stats yet: costs nothing so far
    totals = RequestTotals(input=300_000, cached_input=100_000, output=50_000)
    prices = {"decode": 1.0}
    u = live.usage(conns, totals, prices, time_s=10.0)
    price_prefill = load_catalogue()["cpu-this-machine"].price_per_hour / 2
    cost = price_prefill * 1.0 + 1.0 * 0.5
    assert u.cost_usd == pytest.approx(cost)
    assert u.device_hours == pytest.approx({"prefill": 0.5, "decode": 0.5, "both": 0.0})
    assert u.price_per_hour == pytest.approx(price_prefill + 1.0 + price_prefill)
    w = live.window(u, None)
    share = (900.0 + 200.0) / (900.0 + 1200.0)
    assert w["input_time_share"] == pytest.approx(share)
    in_cost, out_cost = cost * share, cost * (1 - share)
    per_uncached = in_cost / (300_000 + DEFAULT_CACHED_WEIGHT * 100_000)
    assert w["cost_per_million_tokens"]["input"] == pytest.approx(per_uncached * 1e6)
    assert w["cost_per_million_tokens"]["cached_input"] == pytest.approx(per_uncached * DEFAULT_CACHED_WEIGHT * 1e6)
    assert w["cost_per_million_tokens"]["output"] == pytest.approx(out_cost / 50_000 * 1e6)
    # a window: only what happened between two usages
    later = live.usage([Conn(_info("prefill"), _stats("prefill", 7200.0, 1000.0, 1000.0)),
                        Conn(_info("decode", num_cores=2), _stats("decode", 5400.0, 1200.0, 200.0, core_s=10800.0))],
                       RequestTotals(input=400_000, cached_input=100_000, output=50_000), prices, time_s=3610.0)
    w = live.window(later, u)
    assert w["seconds"] == 3600.0 and w["tokens"] == {"input": 100_000, "cached_input": 0, "output": 0}
    assert w["input_time_share"] == pytest.approx(1.0)
    assert w["cost_per_million_tokens"]["output"] is None and w["cost_per_million_tokens"]["cached_input"] is None
    assert w["cost_per_million_tokens"]["input"] == pytest.approx((price_prefill + 1.0) / 100_000 * 1e6)


def test_a_cpu_worker_pays_for_its_cores_over_time():
    """The elastic controller moves cores: a CPU worker's cost follows its core-seconds, its price now its
    cores now; a parked worker (no cores) costs nothing from then on. A given price is per worker-hour."""
    cpu = load_catalogue()["cpu-this-machine"]
    per_core_hour = cpu.price_per_hour / cpu.num_cores
    # pinned to core 0 at start (WorkerInfo), parked since (Stats): one core for the first half hour
    parked = Conn(p.WorkerInfo("prefill-0", "prefill", "m", 1, "h", 16, 100, 2048, cpus=[0], device="cpu",
                               num_cores=2, hardware="cpu-this-machine"),
                  _stats("prefill", 3600.0, 10.0, 10.0, core_s=1800.0, cpus=[]))
    # one core for the first half hour, both since
    grown = Conn(p.WorkerInfo("decode-0", "decode", "m", 1, "h", 16, 100, 2048, cpus=[1], device="cpu",
                              num_cores=2, hardware="cpu-this-machine"),
                 _stats("decode", 3600.0, 30.0, 0.0, core_s=1800.0 + 2 * 1800.0, cpus=[0, 1]))
    assert live.current_cores(parked.info, parked.stats) == 0 and live.current_cores(grown.info) == 1
    u = live.usage([parked, grown], RequestTotals(), {}, 0.0)
    assert u.cost_usd == pytest.approx(per_core_hour * (0.5 + 1.5))
    assert u.device_hours == pytest.approx({"prefill": 0.5 / 2, "decode": 1.5 / 2, "both": 0.0})
    assert u.price_per_hour == pytest.approx(cpu.price_per_hour)  # both cores, on the decode worker
    given = live.usage([parked, grown], RequestTotals(), {"*": 1.0}, 0.0)
    assert given.cost_usd == pytest.approx(2.0) and given.price_per_hour == pytest.approx(2.0)


def test_a_worker_that_changes_role_moves_its_totals_not_the_busy_time():
    before = live.usage([Conn(_info("prefill"), _stats("prefill", 100.0, 40.0, 40.0))], RequestTotals(), {}, 0.0)
    after = live.usage([Conn(_info("prefill"), _stats("decode", 200.0, 50.0, 40.0))], RequestTotals(), {}, 100.0)
    w = live.window(after, before)
    assert w["busy_s"] == pytest.approx(10.0) and w["prefill_busy_s"] == pytest.approx(0.0)


def test_a_dead_worker_keeps_its_cost_but_not_its_price():
    conns = [Conn(_info("decode"), _stats("decode", 3600.0, 10.0, 0.0), is_alive=False)]
    u = live.usage(conns, RequestTotals(), {"*": 2.0}, 0.0)
    assert u.cost_usd == pytest.approx(2.0) and u.price_per_hour == 0.0


def test_the_apportioning_functions():
    assert input_time_share(0.0, 0.0) == 0.0 and input_time_share(1.0, 4.0) == 0.25
    assert prefill_time("prefill", 10.0, 3.0) == 10.0 and prefill_time("both", 10.0, 3.0) == 3.0
    assert token_costs(100.0, 1.0, 4.0, 0, 1e6, 1e6) == cost_per_million(100.0, 0, 1e6, 1e6, 0.25)


def test_busy_meter_splits_mixed_steps_as_the_planner_does():
    meter = BusyMeter.for_engine(_arch(), _dtype(4), "cpu-this-machine")
    meter.record([Chunk(0, 100)], 1.0)  # prefill only
    assert (meter.busy_s, meter.prefill_busy_s) == (1.0, 1.0)
    meter.record([Chunk(50, 1), Chunk(70, 1)], 0.5)  # decodes only
    assert (meter.busy_s, meter.prefill_busy_s) == (1.5, 1.0)
    mixed = [Chunk(0, 64), Chunk(50, 1), Chunk(70, 1)]
    share = step_prefill_share(meter.perf, BatchShape.from_chunks(mixed))
    assert 0.0 < share < 1.0
    meter.record(mixed, 2.0)
    assert meter.busy_s == 3.5 and meter.prefill_busy_s == pytest.approx(1.0 + 2.0 * share)
    meter.record([], 1.0)  # an empty step is no step
    assert meter.busy_s == 3.5
    meter.record(mixed, 2.0, role="prefill")  # a prefill-role worker's step is all prefill (prefill_time)
    assert meter.prefill_busy_s == pytest.approx(1.0 + 2.0 * share + 2.0)
    # uptime and core-seconds: two cores for 10 s, parked for 5 s, one core for 2 s
    clock = BusyMeter(num_cores=2, now_s=100.0)
    clock.set_cores(0, now_s=110.0)
    clock.set_cores(1, now_s=115.0)
    assert clock.uptime_s(117.0) == 17.0 and clock.core_s(117.0) == pytest.approx(22.0)
    plain = BusyMeter()  # no catalogue entry: split by tokens
    plain.record([Chunk(0, 6), Chunk(9, 1), Chunk(9, 1)], 1.0)
    assert plain.prefill_busy_s == pytest.approx(0.75)


def test_detect_hardware():
    catalogue = load_catalogue()
    assert detect_hardware("cuda", "NVIDIA H100 80GB HBM3", catalogue).name == "h100-sxm"
    assert detect_hardware("cuda", "NVIDIA A100-SXM4-80GB", catalogue).name == "a100-80gb"
    assert detect_hardware("cpu", "Intel(R) Xeon(R) Platinum", catalogue).name == "cpu-this-machine"
    assert detect_hardware("cuda", "Tesla T4", catalogue) is None


def _arch():
    from pdserve.model.arch import ModelArch

    return ModelArch("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 10000.0, 8192, True)


def _dtype(itemsize):
    import torch

    return torch.float32 if itemsize == 4 else torch.bfloat16
