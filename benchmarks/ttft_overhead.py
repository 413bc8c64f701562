"""TTFT of a lone request, disaggregated (1 prefill + 1 decode, KV over shm or tcp) vs colocated (1 worker).

Starts each cluster with ``pdserve up`` on this machine, in turn, and sends lone streaming completions
(prompt of --input-len random token ids, a fresh prompt each time so no prefix cache helps, 1 output token
counted at its first byte). Reports the median TTFT of --requests runs per cluster and the ratios
disaggregated / colocated: the cost of the extra hop (reservation round trip, transfer, notice). Same
machine, same run; with each worker pinned to its own core (the default of ``pdserve up``), the colocated
worker has one core and the disaggregated cluster two.

    .venv/bin/python benchmarks/ttft_overhead.py [--input-len 512] [--requests 7] [--backends shm,tcp]
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import time

import httpx

from pdserve.cluster.local import free_port, wait_healthy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--requests", type=int, default=7)
    ap.add_argument("--backends", default="shm,tcp")
    ap.add_argument("--kv-cache-memory", default="256MiB")
    args = ap.parse_args()

    rng = random.Random(0)
    clusters = [("colocated", ["--colocated", "1"])]
    clusters += [(f"disagg-{b}", ["--prefill", "1", "--decode", "1", "--kv-transfer", b])
                 for b in args.backends.split(",")]
    results: dict[str, list[float]] = {}
    for name, flags in clusters:
        with _cluster(args, flags) as url:
            _ttft(url, args.model, [rng.randint(1000, 40000) for _ in range(args.input_len)])  # warm up
            results[name] = [_ttft(url, args.model, [rng.randint(1000, 40000) for _ in range(args.input_len)])
                             for _ in range(args.requests)]
        print(f"{name}: TTFT median {statistics.median(results[name]) * 1e3:.1f} ms "
              f"(min {min(results[name]) * 1e3:.1f}, max {max(results[name]) * 1e3:.1f})", flush=True)
    base = statistics.median(results["colocated"])
    print(f"\nlone request, {args.input_len}-token prompt, median of {args.requests}:")
    for name, samples in results.items():
        med = statistics.median(samples)
        print(f"  {name:<14} {med * 1e3:8.1f} ms   ratio to colocated {med / base:5.2f}")
    print(json.dumps({k: statistics.median(v) for k, v in results.items()}))


def _ttft(url: str, model: str, prompt: list[int]) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token came back")


class _cluster:
    def __init__(self, args, flags):
        self.port = free_port()
        self.argv = [sys.executable, "-m", "pdserve.cli", "up", "--model", args.model, "--port", str(self.port),
                     "--kv-cache-memory", args.kv_cache_memory, *flags]

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{self.port}"
        wait_healthy(url, self.proc, 600)
        return url

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


if __name__ == "__main__":
    main()
