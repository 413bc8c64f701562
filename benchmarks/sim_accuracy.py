"""Simulator accuracy on this machine: the calibrated simulator against real runs of the same workload.

1. ``pdserve profile`` fits a step-time model of the real engine on this machine (skipped with
   ``--perf-model FILE``);
2. ``pdserve up`` starts a real cluster (default model, dummy weights) as a subprocess;
3. ``pdserve bench`` sends the workload at each rate and writes its result JSON;
4. ``pdserve sim`` runs the same workload (same flags, same seed: the same requests) on the same cluster
   layout with the calibrated model;
5. prints, per rate, mean and p90 TTFT and TPOT of both and the simulator's relative errors.

Usage: python benchmarks/sim_accuracy.py [--mode colocated|disaggregated] [--rates 0.5,1,2]
       [--num-requests 40] [--input-len 256] [--output-len 32] [--perf-model FILE] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


from pdserve.cluster.local import wait_healthy
from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.models import get_model
from pdserve.sim.simulator import SimOptions, Simulator
from pdserve.sim.workload import work_items, workload_config

KV_CACHE_BYTES = 2**30  # pdserve up's default --kv-cache-memory (1GiB)


def pdserve_cmd() -> list[str]:
    exe = shutil.which("pdserve") or str(Path(sys.executable).with_name("pdserve"))
    return [exe]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="disaggregated", choices=("colocated", "disaggregated"))
    ap.add_argument("--rates", default="0.5,1,2")
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--perf-model", default=None, help="a `pdserve profile` file (default: profile now)")
    ap.add_argument("--out-dir", default="bench-results/sim-accuracy")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]

    perf_model = args.perf_model
    if perf_model is None:
        perf_model = str(out / "perf-model.json")
        # One core, one thread: as `pdserve up` runs each worker.
        subprocess.run([*pdserve_cmd(), "profile", "--out", perf_model, "--cpus", "0", "--threads", "1"], check=True)

    url = f"http://127.0.0.1:{args.port}"
    up = [*pdserve_cmd(), "up", "--load-format", "dummy", "--port", str(args.port)]
    up += ["--colocated", "1"] if args.mode == "colocated" else ["--prefill", "1", "--decode", "1"]
    proc = subprocess.Popen(up, start_new_session=True)
    real: dict[float, dict] = {}
    try:
        wait_healthy(url, proc, 300)
        # Warm-up (first-call costs in torch), then one run per rate, each with its own seed so that no
        # run hits the prefix cache left by an earlier one (the simulator starts every run cold).
        for i, rate in [(-1, 1.0), *enumerate(rates)]:
            path = out / (f"bench-{args.mode}-{rate:g}.json" if i >= 0 else "warmup.json")
            subprocess.run([*pdserve_cmd(), "bench", "--base-url", url, "--dataset", "random",
                            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                            "--num-requests", str(args.num_requests if i >= 0 else 4), "--rate", str(rate),
                            "--seed", str(args.seed + 1 + i), "--out", str(path), "--no-progress"], check=True)
            if i >= 0:
                real[rate] = json.loads(path.read_text())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    # The same layout in the simulator: one engine per worker on this machine's CPU, same KV budget.
    model = get_model("smollm2-135m")
    num_blocks = int(KV_CACHE_BYTES // (16 * model.kv_bytes_per_token(4.0)))  # float32 KV on CPU
    pool = PoolSpec("cpu-this-machine", 1, 1, 2048, 128)
    spec = (ClusterSpec("smollm2-135m", "colocated", colocated=pool) if args.mode == "colocated" else
            ClusterSpec("smollm2-135m", "disaggregated", prefill=pool, decode=pool, kv_link="intra"))
    print(f"{'rate':>6} {'metric':<10}{'real':>10}{'sim':>10}{'error':>9}")
    for i, rate in enumerate(rates):
        items = work_items(workload_config(num_requests=args.num_requests, input_len=args.input_len,
                                           output_len=args.output_len, rate=rate, seed=args.seed + 1 + i))
        sim = Simulator(spec, items, SimOptions(perf_model=perf_model, num_blocks=num_blocks)).run()
        for key in ("ttft_s", "tpot_s"):
            for stat in ("mean", "p90"):
                a, b = real[rate][key][stat], sim[key][stat]
                e = f"{(b - a) / a:+.1%}" if a else "n/a"
                print(f"{rate:>6g} {key[:4] + ' ' + stat:<10}{a * 1e3:>10.1f}{b * 1e3:>10.1f}{e:>9}")
    print("(milliseconds; error = (sim - real) / real)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
