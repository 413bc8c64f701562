"""KV across a rate-limited link: a lone long prompt's TTFT, disaggregated vs colocated, layer-wise vs
whole-request transfers, and the share of the transfer time hidden behind the prefill's compute.

Two "hosts" on this machine: a network namespace (the prefill workers) joined to the root namespace (the
decode workers and the frontends) by a veth pair, both ends shaped with tc's token bucket (``tbf``) to
--rates (default 1 and 10 Gbit/s). Every worker and frontend is a real ``pdserve worker`` / ``pdserve
frontend`` process; the internal sockets bind the veth's addresses, so they speak CURVE with one set of
cluster keys. Three clusters run side by side, so that one run measures all three on the same machine state:

* colocated: one worker (role both) on loopback: the baseline, no transfer;
* whole: a prefill worker across the link, ``--no-kv-layerwise`` (the KV leaves after the last layer);
* layer-wise: the same with layer-by-layer streaming (the default).

For each rate, --repeats rounds of one request to each cluster in turn (a fresh random prompt of --tokens
tokens each: no prefix hits), TTFT as the time to the first streamed token (the decode side emits it once
the KV landed). A whole-request transfer starts after the compute and hides none of itself, so what it adds
to the colocated TTFT is the transfer's whole cost (the wire time of its bytes, printed beside it, plus
the gather, encryption and scatter), and

    hidden = 1 - (TTFT layer-wise - TTFT colocated) / (TTFT whole - TTFT colocated)

(the prefill worker's own pdserve:kv_transfer_seconds stops when the frames are in the kernel's socket
buffers, so it understates a slow link). Needs root (ip netns,
tc); removes its namespace and processes on exit.

    sudo .venv/bin/python benchmarks/kv_link.py [--tokens 2048] [--rates 1gbit,10gbit] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pdserve.cluster.local import free_port, wait_healthy
from pdserve.security import ENV as KEYS_ENV, ClusterKeys

NS = "pdserve-kvlink"
PREFILL_IP, DECODE_IP = "10.77.0.1", "10.77.0.2"  # the namespace's end, the root namespace's end
SYSTEMS = ("colocated", "whole", "layer-wise")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length of each lone request")
    ap.add_argument("--rates", default="1gbit,10gbit", help="tc rates of the link, in turn")
    ap.add_argument("--repeats", type=int, default=5, help="rounds per rate (median)")
    ap.add_argument("--kv-cache-memory", default="256MiB")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        sys.exit("kv_link.py needs root and iproute2 (ip, tc): it makes a network namespace and shapes a veth pair")
    logs = Path(tempfile.mkdtemp(prefix="pdserve-kvlink-"))
    env = dict(os.environ, **{KEYS_ENV: ClusterKeys.generate().to_env()})
    procs: list[subprocess.Popen] = []
    try:
        make_link()
        urls = start_clusters(args, env, logs, procs)
        print(f"model {args.model}, lone {args.tokens}-token prompts, {args.repeats} rounds per rate; logs in {logs}")
        print(f"{'link':>8} {'system':>11} {'TTFT p50 s':>11} {'added s':>8} {'hidden':>7}")
        for rate in args.rates.split(","):
            bits = shape_link(rate)
            for url in urls.values():  # warm: the first request of a size pays one-off costs
                ttft(url, args.model, prompt(args.tokens))
            times = {s: [] for s in SYSTEMS}
            for _ in range(args.repeats):
                for system in SYSTEMS:
                    times[system].append(ttft(urls[system], args.model, prompt(args.tokens)))
            p50 = {s: statistics.median(times[s]) for s in SYSTEMS}
            whole = p50["whole"] - p50["colocated"]  # what a transfer after the compute adds: all of it
            for system in SYSTEMS:
                added = p50[system] - p50["colocated"]
                hidden = f"{1 - added / whole:>6.0%}" if system == "layer-wise" and whole > 0 else ""
                print(f"{rate:>8} {system:>11} {p50[system]:>11.3f} {added:>8.3f} {hidden:>7}", flush=True)
            kv_bytes = transfer_bytes(urls["whole"]) / transfer_count(urls["whole"])
            print(f"{rate:>8} KV per request {kv_bytes / 1e6:.1f} MB: {kv_bytes * 8 / bits:.3f} s on the wire at "
                  f"{rate}; TTFTs of each round (s): " +
                  "; ".join(f"{s} " + ",".join(f"{t:.2f}" for t in times[s]) for s in SYSTEMS), flush=True)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)


def make_link() -> None:
    subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)  # a previous run's, if left
    for cmd in (f"ip netns add {NS}", "ip link add pdkvb type veth peer name pdkva",
                f"ip link set pdkva netns {NS}", f"ip -n {NS} addr add {PREFILL_IP}/24 dev pdkva",
                f"ip addr add {DECODE_IP}/24 dev pdkvb", f"ip -n {NS} link set pdkva up",
                f"ip -n {NS} link set lo up", "ip link set pdkvb up"):
        subprocess.run(cmd.split(), check=True)


def shape_link(rate: str) -> float:
    """A token bucket at ``rate`` on both ends' egress (burst: 1 ms at that rate, at least 64 KiB)."""
    m = re.fullmatch(r"([\d.]+)([kmg]?)bit", rate)
    if m is None:
        raise SystemExit(f"--rates: {rate!r} is not a tc rate such as 1gbit or 500mbit")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    burst = max(64 * 1024, int(bits / 8 / 1000))
    for prefix, dev in ((["ip", "netns", "exec", NS], "pdkva"), ([], "pdkvb")):
        subprocess.run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", str(burst), "latency", "100ms"], check=True)
    return bits


def start_clusters(args, env: dict, logs: Path, procs: list) -> dict[str, str]:
    py = [sys.executable, "-m", "pdserve.cli"]
    common = ["--model", args.model, "--kv-cache-memory", args.kv_cache_memory]
    netns = ["ip", "netns", "exec", NS]

    def worker(name: str, argv: list[str], prefix: list[str] = ()) -> dict:
        ready = logs / f"{name}.json"
        with open(logs / f"{name}.log", "w") as log:
            procs.append(subprocess.Popen([*prefix, *py, "worker", *common, "--worker-id", name,
                                           "--ready-file", str(ready), *argv], stdout=log, stderr=subprocess.STDOUT,
                                          env=env))
        return {"ready": ready, "proc": procs[-1]}

    workers = {"colocated": [worker("both", ["--role", "both"])]}
    for system, flags in (("whole", ["--no-kv-layerwise"]), ("layer-wise", [])):
        workers[system] = [worker(f"prefill-{system}", ["--role", "prefill", "--host", PREFILL_IP, *flags], netns),
                           worker(f"decode-{system}", ["--role", "decode", "--host", DECODE_IP,
                                                       "--kv-connector", "tcp"])]
    deadline = time.monotonic() + 600
    urls = {}
    for system, ws in workers.items():
        addresses = []
        for w in ws:
            while not w["ready"].exists():
                if w["proc"].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"a worker of {system} did not start; see {logs}")
                time.sleep(0.5)
            addresses.append(json.loads(w["ready"].read_text())["address"])
        port = free_port()
        internal = ["--internal-host", DECODE_IP] if system != "colocated" else []
        with open(logs / f"frontend-{system}.log", "w") as log:
            procs.append(subprocess.Popen([*py, "frontend", "--model", args.model, "--workers", ",".join(addresses),
                                           "--port", str(port), *internal], stdout=log, stderr=subprocess.STDOUT,
                                          env=env))
        urls[system] = f"http://127.0.0.1:{port}"
        wait_healthy(urls[system], procs[-1], deadline - time.monotonic())
    return urls


_rng = random.Random(0)


def prompt(n: int) -> list[int]:
    return [_rng.randrange(100, 40000) for _ in range(n)]


def ttft(url: str, model: str, ids: list[int]) -> float:
    """Seconds from the request to its first streamed token."""
    body = {"model": model, "prompt": ids, "max_tokens": 2, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError(f"{url}: no token streamed")


def _prefill_metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(rf'^{name}\{{role="prefill"\}} (\S+)$', text, re.M))


def transfer_bytes(url: str) -> float:
    """KV bytes the prefill worker sent so far."""
    return _prefill_metric(url, "pdserve:kv_transfer_bytes_total")


def transfer_count(url: str) -> float:
    return _prefill_metric(url, "pdserve:kv_transfer_seconds_count")


if __name__ == "__main__":
    sys.exit(main())
