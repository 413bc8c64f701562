"""Soak (issue 15): --minutes of steady load with a worker killed every --kill-every-s, then idle; every
process's RSS (and the anonymous part of it: RSS also counts shared KV cache pages a process touched, at
most the caches' size) and open file descriptors, and the KV blocks in use at idle, at the start and at the
end.
Target: flat within 5%, 0 blocks leaked. `tests/e2e/test_soak.py` runs a minutes-long version.

    python benchmarks/soak.py [--minutes 60] [--rate 1.0] [--kill-every-s 300]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil

from pdserve.cluster.local import free_port, wait_healthy

MODEL = "smollm2-135m"


def soak(minutes: float, rate: float, kill_every_s: float, seed: int = 0, flags: tuple[str, ...] = ()) -> dict:
    """Run the soak; return {"start": snapshot, "end": snapshot, "requests": counts, "kills": n}."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--prefill", "1",
                             "--decode", "2", "--worker-timeout", "3", "--kv-cache-memory", "128MiB", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rng = random.Random(seed)
    counts = {"sent": 0, "ok": 0, "refused": 0, "error": 0, "details": []}  # refused: 429 (admission)
    try:
        wait_healthy(url, proc, 600)
        _load(url, 10, rng, counts)  # warm: every buffer in place before the first snapshot
        _idle(url)
        start = snapshot(url, proc.pid)
        kills, end_s, next_kill = 0, time.monotonic() + 60 * minutes, time.monotonic() + kill_every_s
        threads = []
        while time.monotonic() < end_s:
            t = threading.Thread(target=_one, args=(url, rng.randrange(10**9), counts))
            t.start()
            threads.append(t)
            threads = [t for t in threads if t.is_alive()]
            if time.monotonic() >= next_kill:
                victim = rng.choice([w for w in httpx.get(f"{url}/health", timeout=10).json()["workers"]
                                     if w["alive"] and w["role"] != "prefill"])
                os.kill(victim["pid"], signal.SIGKILL)
                kills += 1
                next_kill += kill_every_s
            time.sleep(rng.expovariate(rate))
        for t in threads:
            t.join(300)
        _all_alive(url)
        _idle(url)
        end = snapshot(url, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {"start": start, "end": end, "requests": counts, "kills": kills}


_COUNTS = threading.Lock()


def _one(url: str, seed: int, counts: dict) -> None:
    with _COUNTS:
        counts["sent"] += 1
    body = {"model": MODEL, "prompt": f"Request {seed}: tell me about the number {seed}.", "max_tokens": 24,
            "temperature": 0.8, "seed": seed}
    detail = None
    try:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        outcome = "ok" if r.status_code == 200 else "refused" if r.status_code == 429 else "error"
        if outcome != "ok":
            detail = f"{r.status_code}: {r.text[:200]}"
    except httpx.HTTPError as e:
        outcome, detail = "error", repr(e)
    with _COUNTS:
        counts[outcome] += 1
        if detail is not None and len(counts["details"]) < 20:
            counts["details"].append(detail)


def _load(url: str, n: int, rng: random.Random, counts: dict) -> None:
    threads = [threading.Thread(target=_one, args=(url, rng.randrange(10**9), counts)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)


def _idle(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = [w for w in httpx.get(f"{url}/health", timeout=10).json()["workers"] if w["alive"]]
        if workers and all(w["num_running"] == w["num_waiting"] == w["num_held_kv"] == 0 for w in workers):
            time.sleep(1.5)  # a stats interval or three: the counts are fresh
            return
        time.sleep(0.5)
    raise RuntimeError("the cluster did not go idle")


def _all_alive(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(w["alive"] for w in httpx.get(f"{url}/health", timeout=10).json()["workers"]):
        if time.monotonic() > deadline:
            raise RuntimeError("the killed workers did not come back")
        time.sleep(0.5)


def snapshot(url: str, launcher_pid: int) -> dict:
    workers = httpx.get(f"{url}/health", timeout=10).json()["workers"]
    procs = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            role = next((w["worker_id"] for w in workers if w.get("pid") == child.pid), "frontend")
            mem = child.memory_info()
            # RSS counts the shared-memory pages a process has touched: a prefill worker's, the decode workers'
            # KV cache files it writes into (shm connector), bounded by their size. Anonymous memory is what
            # a leak grows.
            procs[role] = {"rss_mib": mem.rss / 2**20, "anon_mib": (mem.rss - mem.shared) / 2**20,
                           "fds": child.num_fds()}
        except psutil.Error:
            continue
    return {"processes": procs, "blocks_in_use": sum(w["num_blocks"] - w["num_free_blocks"] for w in workers),
            "num_processes": len(procs), "shm_files": len([f for f in os.listdir("/dev/shm")
                                                           if f.startswith("pdserve-kv-")])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s (Poisson); ~70%% of capacity here")
    ap.add_argument("--kill-every-s", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    report = soak(a.minutes, a.rate, a.kill_every_s)
    s, e = report["start"], report["end"]
    print(f"requests {report['requests']}, kills {report['kills']}")
    print(f"blocks in use at idle: {s['blocks_in_use']} -> {e['blocks_in_use']}; processes {s['num_processes']} -> "
          f"{e['num_processes']}; KV files {s['shm_files']} -> {e['shm_files']}")
    for name, before in s["processes"].items():
        after = e["processes"].get(name)
        if after:
            print(f"{name:<12} RSS {before['rss_mib']:.0f} -> {after['rss_mib']:.0f} MiB "
                  f"({after['rss_mib'] / before['rss_mib'] - 1:+.1%}), of it anonymous {before['anon_mib']:.0f} -> "
                  f"{after['anon_mib']:.0f} MiB ({after['anon_mib'] / before['anon_mib'] - 1:+.1%}), "
                  f"fds {before['fds']} -> {after['fds']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
