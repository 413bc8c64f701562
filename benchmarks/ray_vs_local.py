"""`pdserve up --ray` against `pdserve up` on the same layout: start-up time and steady-state throughput.

Both clusters run 1 prefill + 1 decode worker on this machine: `pdserve up` pins each worker to a core of
its own; `pdserve up --ray` starts a local Ray cluster and places each worker as an actor with one CPU (one
torch thread, unpinned), KV by the ``auto`` connector (one node: shared memory, as `pdserve up`'s shm).
Start-up is the time from the command to its /health answering, one cluster at a time. Then both stay up
(the idle one costs a heartbeat) and `pdserve bench` runs the same closed-loop workload against each in
turn, --rounds times (alternating, so drift on a shared machine hits both alike); the figure is the median
output throughput, and the ratio Ray / local.

    .venv/bin/python benchmarks/ray_vs_local.py [--rounds 3] [--num-requests 24] [--concurrency 4]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdserve.cluster.local import free_port, wait_healthy

SYSTEMS = {"local": [], "ray": ["--ray"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="pdserve-ray-vs-local-"))
    procs: dict[str, subprocess.Popen] = {}
    urls, startup = {}, {}
    try:
        for system, flags in SYSTEMS.items():
            port = free_port()
            argv = [sys.executable, "-m", "pdserve.cli", "up", "--model", args.model, "--prefill", "1", "--decode",
                    "1", "--port", str(port), *flags]
            t0 = time.monotonic()
            with open(logs / f"{system}.log", "w") as log:
                procs[system] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            urls[system] = f"http://127.0.0.1:{port}"
            wait_healthy(urls[system], procs[system], 600, poll_s=0.2)
            startup[system] = time.monotonic() - t0
        print(f"model {args.model}, 1 prefill + 1 decode; closed loop: {args.num_requests} requests of "
              f"{args.input_len} in / {args.output_len} out at concurrency {args.concurrency}; logs in {logs}")
        throughput = {s: [] for s in SYSTEMS}
        for r in range(args.rounds):
            for system in SYSTEMS:
                throughput[system].append(bench(urls[system], args, logs / f"{system}-{r}.json"))
        print(f"{'system':>6} {'start-up s':>11} {'output tok/s (p50)':>19}  rounds")
        for system in SYSTEMS:
            print(f"{system:>6} {startup[system]:>11.1f} {statistics.median(throughput[system]):>19.1f}  "
                  + ", ".join(f"{t:.1f}" for t in throughput[system]))
        ratio = statistics.median(throughput["ray"]) / statistics.median(throughput["local"])
        print(f"ray / local: throughput {ratio:.3f}, start-up {startup['ray'] / startup['local']:.2f}x")
        return 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def bench(url: str, args, out: Path) -> float:
    """Output tokens/s of one closed-loop `pdserve bench` run."""
    subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--num-requests",
                    str(args.num_requests), "--concurrency", str(args.concurrency), "--input-len",
                    str(args.input_len), "--output-len", str(args.output_len), "--no-progress", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    if result["failed"]:
        raise RuntimeError(f"{url}: {result['failed']} requests failed ({result.get('errors')})")
    return result["output_throughput"]


if __name__ == "__main__":
    sys.exit(main())
