from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench.arrivals import ArrivalConfig, arrival_times, gamma_arrivals, poisson_arrivals
from pdserve.bench.workloads import (
    TOKEN_ID_MARGIN,
    PromptBuilder,
    WorkloadConfig,
    build_shapes,
    build_workload,
    load_azure,
    load_mooncake,
    multi_turn_conversations,
)

TRACES = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"

MOONCAKE_ROWS = [
    {"timestamp": 0, "input_length": 1400, "output_length": 10, "hash_ids": [1, 2, 3]},
    {"timestamp": 40, "input_length": 1536, "output_length": 20, "hash_ids": [1, 2, 4]},
    {"timestamp": 1000, "input_length": 600, "output_length": 5, "hash_ids": [1, 5]},
    {"timestamp": 2500, "input_length": 100, "output_length": 1, "hash_ids": [6]},
    {"timestamp": 3000, "input_length": 1024, "output_length": 8, "hash_ids": [1, 2]},
]


@pytest.fixture
def mooncake_file(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MOONCAKE_ROWS))
    return path


def _replay(path: Path, **kwargs) -> WorkloadConfig:
    arrival = kwargs.pop("arrival", ArrivalConfig(kind="trace"))
    return WorkloadConfig(dataset="mooncake", trace_path=str(path), arrival=arrival, **kwargs)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if diff.size else n


@pytest.mark.parametrize("scale", [1.0, 1 / 8, 0.3])
def test_mooncake_prompts_share_exactly_the_trace_prefixes(mooncake_file: Path, scale: float):
    config = _replay(mooncake_file, length_scale=scale)
    block = max(1, round(512 * scale))
    specs = build_workload(config)
    assert [s.input_len for s in specs] == [max(1, round(r["input_length"] * scale)) for r in MOONCAKE_ROWS]
    assert [s.output_len for s in specs] == [max(1, round(r["output_length"] * scale)) for r in MOONCAKE_ROWS]
    for a in specs:
        for b in specs:
            if a.index >= b.index:
                continue
            shared_blocks = 0
            for x, y in zip(a.hash_ids, b.hash_ids):
                if x != y:
                    break
                shared_blocks += 1
            expected = min(shared_blocks * block, a.input_len, b.input_len)
            # common prefix is exactly the shared blocks (a random next block may agree on a token or
            # two by chance, never on a whole block)
            common = _common_prefix(a.prompt_token_ids, b.prompt_token_ids)
            assert expected <= common < expected + 3 or common == min(a.input_len, b.input_len)
            if expected < min(a.input_len, b.input_len):
                end = min(expected + block, a.input_len, b.input_len)
                assert a.prompt_token_ids[expected:end] != b.prompt_token_ids[expected:end]


def test_mooncake_prompts_deterministic_and_seeded(mooncake_file: Path):
    first = build_workload(_replay(mooncake_file, seed=7))
    again = build_workload(_replay(mooncake_file, seed=7))
    other = build_workload(_replay(mooncake_file, seed=8))
    assert [s.prompt_token_ids for s in first] == [s.prompt_token_ids for s in again]
    assert first[0].prompt_token_ids != other[0].prompt_token_ids
    # building one prompt on its own gives the same tokens (order independence)
    shape = build_shapes(_replay(mooncake_file, seed=7))[3]
    assert PromptBuilder(_replay(mooncake_file, seed=7)).prompt_token_ids(shape) == first[3].prompt_token_ids


def test_a_salt_draws_other_prompts_with_the_same_sharing(mooncake_file: Path):
    """A rate sweep's later rates (salt > 0): other tokens, so nothing an earlier rate left in the server's
    prefix cache is a hit; requests that share hash ids still share those tokens."""
    config = _replay(mooncake_file, seed=7)
    shapes = build_shapes(config)
    plain, salted = PromptBuilder(config), PromptBuilder(config, salt=1)
    assert plain.prompt_token_ids(shapes[0]) == PromptBuilder(config, salt=0).prompt_token_ids(shapes[0])
    for shape in shapes:
        a, b = plain.prompt_token_ids(shape), salted.prompt_token_ids(shape)
        assert len(a) == len(b) and _common_prefix(a, b) < 3  # (two random tokens may agree by chance)
    sharing = [(x, y) for x, y in itertools.combinations(shapes, 2) if x.hash_ids[:1] == y.hash_ids[:1]]
    assert sharing
    x, y = sharing[0]
    n = min(x.input_len, y.input_len, x.block_size)
    assert salted.prompt_token_ids(x)[:n] == salted.prompt_token_ids(y)[:n]


def test_token_ids_avoid_special_range(mooncake_file: Path):
    specs = build_workload(_replay(mooncake_file, vocab_size=5000))
    ids = np.concatenate([s.prompt_token_ids for s in specs])
    assert ids.min() >= 1000 and ids.max() < 4000


@pytest.mark.parametrize("time_scale", [1.0, 0.5, 2.0])
def test_trace_arrivals_follow_timestamps_times_time_scale(mooncake_file: Path, time_scale: float):
    shapes = build_shapes(_replay(mooncake_file, arrival=ArrivalConfig(kind="trace", time_scale=time_scale)))
    expected = [r["timestamp"] / 1000 * time_scale for r in MOONCAKE_ROWS]
    assert [s.arrival_s for s in shapes] == pytest.approx(expected)


def test_trace_num_requests_takes_leading_rows(mooncake_file: Path):
    shapes = build_shapes(_replay(mooncake_file, num_requests=2))
    assert [s.hash_ids for s in shapes] == [(1, 2, 3), (1, 2, 4)]


def test_trace_with_poisson_arrivals_keeps_lengths(mooncake_file: Path):
    shapes = build_shapes(_replay(mooncake_file, arrival=ArrivalConfig(kind="poisson", rate=2.0)))
    assert sorted(s.input_len for s in shapes) == sorted(r["input_length"] for r in MOONCAKE_ROWS)
    assert shapes[0].arrival_s == 0.0


def test_mooncake_sample_trace_prefix_sharing():
    path = TRACES / "mooncake_synthetic.jsonl"
    if not path.exists():
        pytest.skip("sample traces not present")
    rows = load_mooncake(path, limit=400)
    assert len(rows) == 400
    config = _replay(path, num_requests=400, length_scale=1 / 32)
    shapes = build_shapes(config)
    builder = PromptBuilder(config)
    by_first: dict[int, list] = {}
    for shape in shapes:
        by_first.setdefault(shape.hash_ids[0], []).append(shape)
    groups = [g for g in by_first.values() if len(g) > 1]
    assert groups, "the sample trace shares prefixes among its first 400 requests"
    for group in groups[:20]:
        a, b = group[0], group[1]
        shared = next((i for i, (x, y) in enumerate(zip(a.hash_ids, b.hash_ids)) if x != y), None)
        shared = min(len(a.hash_ids), len(b.hash_ids)) if shared is None else shared
        pa, pb = builder.prompt_token_ids(a), builder.prompt_token_ids(b)
        expected = min(shared * a.block_size, len(pa), len(pb))
        assert pa[:expected] == pb[:expected]


def test_multi_turn_conversations_lengths_range_and_seed():
    convs = multi_turn_conversations(3, 4, first_len=50, turn_len=7, seed=1, vocab_size=5000)
    assert [[len(m) for m in c] for c in convs] == [[50, 7, 7, 7]] * 3
    ids = [t for c in convs for m in c for t in m]
    assert min(ids) >= TOKEN_ID_MARGIN and max(ids) < 5000 - TOKEN_ID_MARGIN
    assert convs[0][0] != convs[1][0], "conversations share no first message"
    assert multi_turn_conversations(3, 4, 50, 7, seed=1, vocab_size=5000) == convs
    assert multi_turn_conversations(3, 4, 50, 7, seed=2, vocab_size=5000) != convs


def test_azure_csv_parsing(tmp_path: Path):
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
        "2023-11-16 18:17:04.0319600,3180,8\n"
        "2023-11-16 18:17:06.4799600,12,300\n"
    )
    rows = load_azure(path)
    assert [(r.input_len, r.output_len) for r in rows] == [(4808, 10), (3180, 8), (12, 300)]
    assert [r.timestamp_s for r in rows] == pytest.approx([0.0, 0.052, 2.5])
    config = WorkloadConfig(
        dataset="azure",
        trace_path=str(path),
        length_scale=0.5,
        arrival=ArrivalConfig(kind="trace", time_scale=2),
    )
    shapes = build_shapes(config)
    assert [s.arrival_s for s in shapes] == pytest.approx([0.0, 0.104, 5.0])
    assert [(s.input_len, s.output_len) for s in shapes] == [(2404, 5), (1590, 4), (6, 150)]
    assert all(s.hash_ids == () for s in shapes)


def test_azure_bad_file(tmp_path: Path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_azure(path)


def test_azure_sample_trace():
    path = TRACES / "azure2023_code.csv"
    if not path.exists():
        pytest.skip("sample traces not present")
    rows = load_azure(path, limit=100)
    assert len(rows) == 100 and rows[0].timestamp_s == 0.0
    assert all(b.timestamp_s >= a.timestamp_s for a, b in itertools.pairwise(rows))


def test_dist_draws_lengths_from_trace(tmp_path: Path, mooncake_file: Path):
    config = WorkloadConfig(
        dataset="dist",
        trace_format="mooncake",
        trace_path=str(mooncake_file),
        num_requests=200,
        arrival=ArrivalConfig(kind="poisson", rate=10.0),
    )
    shapes = build_shapes(config)
    pairs = {(r["input_length"], r["output_length"]) for r in MOONCAKE_ROWS}
    assert len(shapes) == 200
    assert {(s.input_len, s.output_len) for s in shapes} == pairs  # all 5 drawn in 200 tries
    assert all(s.hash_ids == () for s in shapes)


def test_random_workload_fixed_and_ranged_lengths():
    fixed = build_workload(WorkloadConfig(num_requests=5, input_len=30, output_len=7, seed=3))
    assert [(s.input_len, s.output_len) for s in fixed] == [(30, 7)] * 5
    assert len({tuple(s.prompt_token_ids) for s in fixed}) == 5
    ranged = build_shapes(
        WorkloadConfig(num_requests=300, input_len_range=(10, 20), output_len_range=(1, 4), seed=3)
    )
    assert {s.input_len for s in ranged} == set(range(10, 21))
    assert {s.output_len for s in ranged} == set(range(1, 5))
    scaled = build_shapes(WorkloadConfig(num_requests=2, input_len=100, output_len=3, length_scale=0.1))
    assert [(s.input_len, s.output_len) for s in scaled] == [(10, 1), (10, 1)]


def test_mix_workload_weights():
    config = WorkloadConfig(dataset="mix", mix=((2048, 16, 3.0), (64, 256, 1.0)), num_requests=2000)
    shapes = build_shapes(config)
    long = sum(s.input_len == 2048 and s.output_len == 16 for s in shapes)
    short = sum(s.input_len == 64 and s.output_len == 256 for s in shapes)
    assert long + short == 2000
    assert long / 2000 == pytest.approx(0.75, abs=0.04)


def test_closed_loop_has_no_arrivals():
    shapes = build_shapes(WorkloadConfig(num_requests=3, arrival=ArrivalConfig(kind="closed", concurrency=2)))
    assert [s.arrival_s for s in shapes] == [None, None, None]
    assert [s.index for s in shapes] == [0, 1, 2]


def test_poisson_mean_rate():
    times = poisson_arrivals(20001, 4.0, np.random.default_rng(0))
    assert times[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(times))
    assert 20000 / times[-1] == pytest.approx(4.0, rel=0.03)
    assert poisson_arrivals(3, math.inf, np.random.default_rng(0)) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_mean_rate_and_burstiness(burstiness: float):
    times = np.asarray(gamma_arrivals(20001, 2.0, burstiness, np.random.default_rng(1)))
    gaps = np.diff(times)
    assert 1 / gaps.mean() == pytest.approx(2.0, rel=0.04)
    # coefficient of variation of gamma gaps is 1/sqrt(shape)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_arrivals_seeded():
    config = ArrivalConfig(kind="gamma", rate=3.0, burstiness=0.5)
    assert arrival_times(config, 50, seed=1) == arrival_times(config, 50, seed=1)
    assert arrival_times(config, 50, seed=1) != arrival_times(config, 50, seed=2)


def test_config_validation(mooncake_file: Path):
    with pytest.raises(ValueError):
        WorkloadConfig(dataset="nope")
    with pytest.raises(ValueError):
        WorkloadConfig(dataset="mooncake")  # no trace path
    with pytest.raises(ValueError):
        WorkloadConfig(arrival=ArrivalConfig(kind="trace"))  # trace timestamps need a trace
    with pytest.raises(ValueError):
        WorkloadConfig(length_scale=0)
    with pytest.raises(ValueError):
        ArrivalConfig(kind="gamma")  # infinite rate
    with pytest.raises(ValueError):
        WorkloadConfig(dataset="mix")


def test_output_length_scale_overrides_for_outputs(mooncake_file: Path):
    shapes = build_shapes(_replay(mooncake_file, length_scale=0.1, output_length_scale=0.5))
    assert [s.input_len for s in shapes] == [max(1, round(r["input_length"] * 0.1)) for r in MOONCAKE_ROWS]
    assert [s.output_len for s in shapes] == [max(1, round(r["output_length"] * 0.5)) for r in MOONCAKE_ROWS]
    assert shapes[0].block_size == 51


def test_workload_flags_are_reusable(mooncake_file: Path):
    import argparse

    from pdserve.bench.cli import add_workload_arguments, workload_from_args

    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    args = parser.parse_args(
        [f"--dataset=mooncake:{mooncake_file}", "--length-scale", "0.5", "--time-scale", "2"]
    )
    workload, rates = workload_from_args(args)
    assert rates is None
    assert workload.arrival.kind == "trace" and workload.arrival.time_scale == 2
    assert [s.arrival_s for s in build_shapes(workload)] == pytest.approx([0, 0.08, 2.0, 5.0, 6.0])
    workload, rates = workload_from_args(parser.parse_args(["--rates", "2,0.5", "--burstiness", "0.5"]))
    assert rates == [0.5, 2.0] and workload.arrival.kind == "gamma"
    with pytest.raises(ValueError, match="time-scale"):
        workload_from_args(parser.parse_args(["--time-scale", "2"]))
