import argparse
import json

import pytest

from pdserve.sim import cli


def test_register_adds_subcommands():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    for name in ("sim", "plan", "profile"):
        args = parser.parse_args([name] + (["--model", "llama-3.1-8b", "--cards", "8"] if name == "plan" else []))
        assert callable(args.func)


def test_sim_writes_bench_shaped_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["sim", "--model", "llama-3.1-8b", "--mode", "disaggregated", "--hardware", "h100-sxm,h200",
                   "--prefill", "1", "--decode", "2", "--num-requests", "40", "--rate", "8",
                   "--slo-ttft", "1", "--slo-tpot", "0.05", "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("completed", "failed", "duration_s", "request_throughput", "output_throughput", "ttft_s", "tpot_s",
                "itl_s", "e2e_s", "slo_attainment", "goodput"):
        assert key in r
    for key in ("mean", "p50", "p90", "p99"):
        assert r["ttft_s"][key] is not None
    assert r["completed"] == 40
    assert "goodput" in capsys.readouterr().out


def test_sim_rate_sweep(tmp_path):
    out = tmp_path / "sweep.json"
    rc = cli.main(["sim", "--model", "llama-3.1-8b", "--num-requests", "30", "--rates", "2,50", "--slo-ttft", "0.5",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "sweep" and [run["rate"] for run in r["runs"]] == [2, 50]


@pytest.mark.parametrize("argv", [
    ["sim", "--num-requests", "3"],  # no model
    ["sim", "--model", "nope", "--num-requests", "3"],
    ["sim", "--model", "llama-3.1-70b", "--hardware", "l40s", "--num-requests", "3"],
    ["sim", "--model", "llama-3.1-8b", "--dataset", "mooncake", "--num-requests", "3"],
    ["sim", "--model", "llama-3.1-8b", "--rate", "1", "--concurrency", "2"],
    ["sim", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--cluster", "/nonexistent.yaml"],
])
def test_bad_arguments_exit_nonzero(argv, capsys):
    try:
        rc = cli.main(argv + ["--no-progress"])
    except SystemExit as e:  # argparse's own errors (bad flag values, excluded combinations)
        rc = e.code
    assert rc != 0
    assert "error" in capsys.readouterr().err
