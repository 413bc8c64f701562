"""Soak (issue 15): --minutes of steady load with a worker killed every --kill-every-s, then idle; every
process's RSS (and the anonymous part of it: RSS also counts shared KV cache pages a process touched, at
most the caches' size) and open file descriptors, and the KV blocks in use at idle, at the start and at the
end; the attainment of the objectives (`pdserve up`'s defaults: TTFT 2 s, TPOT 0.1 s) during the soak.
Target: flat within 5%, 0 blocks leaked. `tests/e2e/test_soak.py` runs a minutes-long version.

The load is --load (0.7) x the goodput capacity of the same cluster for the same requests (the highest
Poisson rate of --sweep with >= 90% of its requests within both objectives), measured on it before the
soak; --rate R skips the sweep.

    python benchmarks/soak.py [--minutes 60] [--load 0.7 | --rate R] [--sweep 1,2,3,4,6,8] [--kill-every-s 300]
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

from pdserve.bench.metrics import summarize
from pdserve.cluster.local import free_port, wait_healthy
from pdserve.server.main import DEFAULT_OBJECTIVES

MODEL = "smollm2-135m"
OBJECTIVES = DEFAULT_OBJECTIVES  # `pdserve up`'s, which its admission and controller aim at


def soak(minutes: float, rate: float | None, kill_every_s: float, seed: int = 0, flags: tuple[str, ...] = (),
         load: float = 0.7, sweep: tuple[float, ...] = (1, 2, 3, 4, 6, 8)) -> dict:
    """Run the soak at ``rate`` req/s, or (None) at ``load`` x the capacity a ``sweep`` of rates finds; return
    {"start": snapshot, "end": snapshot, "requests": counts, "kills": n, "rate": r, "sweep": [...]}."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--prefill", "1",
                             "--decode", "2", "--worker-timeout", "3", "--kv-cache-memory", "128MiB", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rng = random.Random(seed)
    swept = []
    try:
        wait_healthy(url, proc, 600)
        _load(url, 10, rng, _counts())  # warm: every buffer in place before the first snapshot
        _idle(url)
        if rate is None:
            rate = load * _capacity(url, sweep, rng, swept)
        start = snapshot(url, proc.pid)
        counts = _counts()
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
    return {"start": start, "end": end, "requests": counts, "kills": kills, "rate": rate, "sweep": swept}


def _capacity(url: str, rates: tuple[float, ...], rng: random.Random, swept: list) -> float:
    """The highest of ``rates`` (ascending, up to the first that misses) at which >= 90% of a Poisson run's
    requests (~30 s of them) meet both objectives; each rate's figures are appended to ``swept``."""
    capacity = 0.0
    for rate in sorted(rates):
        counts = _counts()
        threads = []
        for _ in range(max(20, int(30 * rate))):
            t = threading.Thread(target=_one, args=(url, rng.randrange(10**9), counts))
            t.start()
            threads.append(t)
            time.sleep(rng.expovariate(rate))
        for t in threads:
            t.join(300)
        _idle(url)
        swept.append({"rate": rate, "attainment": counts["within"] / counts["sent"], **_latency_summary(counts)})
        if counts["within"] < 0.9 * counts["sent"]:
            break
        capacity = rate
    if capacity == 0.0:
        raise RuntimeError(f"no rate of {rates} met the objectives: {swept}")
    return capacity


def _counts() -> dict:
    # refused: 429 (admission); within: served within both objectives; empty: served, the first token ended
    # it (sampled EOS: text ""); ttft/tpot: the served requests'
    return {"sent": 0, "ok": 0, "refused": 0, "error": 0, "within": 0, "empty": 0, "details": [], "ttft_s": [],
            "tpot_s": []}


def _latency_summary(counts: dict) -> dict:
    """p50 and p90 of the served requests' TTFT and TPOT, as `pdserve bench` computes them (nan: none)."""
    out = {}
    for key in ("ttft", "tpot"):
        stats = summarize(counts[f"{key}_s"])
        out |= {f"{key}_{p}_s": float("nan") if stats[p] is None else stats[p] for p in ("p50", "p90")}
    return out


_COUNTS = threading.Lock()


def _one(url: str, seed: int, counts: dict) -> None:
    """One streamed completion (a fresh prompt: no prefix cache hit beyond its first words); its outcome and,
    when served, its TTFT and TPOT into ``counts``."""
    with _COUNTS:
        counts["sent"] += 1
    body = {"model": MODEL, "prompt": f"Request {seed}: tell me about the number {seed}.", "max_tokens": 24,
            "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    detail, ttft, tpot, empty = None, None, None, False
    try:
        sent = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                outcome = "refused" if r.status_code == 429 else "error"
                detail = f"{r.status_code}: {r.read()[:200]!r}"
            else:
                outcome, first, tokens, done, finish, empty = "ok", None, 0, False, None, False
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        outcome, detail = "error", f"error chunk: {chunk['error']}"
                    elif chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif first is None and chunk["choices"]:
                        first = time.monotonic()  # the first token's chunk (text "" when it ended the output)
                        finish = chunk["choices"][0]["finish_reason"]
                if outcome == "ok" and (not done or first is None):
                    outcome, detail = "error", f"stream ended without {'[DONE]' if not done else 'a token'}"
                if outcome == "ok":
                    empty = tokens <= 1 and finish is not None  # its first token ended it (EOS sampled)
                    ttft = first - sent
                    tpot = (time.monotonic() - first) / (tokens - 1) if tokens > 1 else None
    except httpx.HTTPError as e:
        outcome, detail = "error", repr(e)
    with _COUNTS:
        counts[outcome] += 1
        counts["empty"] += empty
        if ttft is not None:
            counts["ttft_s"].append(ttft)
            if tpot is not None:
                counts["tpot_s"].append(tpot)
            counts["within"] += ttft <= OBJECTIVES.ttft_s and (tpot is None or tpot <= OBJECTIVES.tpot_s)
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
    ap.add_argument("--rate", type=float, default=None, help="requests/s (Poisson) instead of --load x capacity")
    ap.add_argument("--load", type=float, default=0.7, help="the soak's rate, a share of the swept capacity")
    ap.add_argument("--sweep", default="1,2,3,4,6,8", help="rates (req/s) the capacity is the highest of")
    ap.add_argument("--kill-every-s", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    report = soak(a.minutes, a.rate, a.kill_every_s, load=a.load,
                  sweep=tuple(float(r) for r in a.sweep.split(",")))
    for row in report["sweep"]:
        print(f"sweep {row['rate']:g} req/s: attainment {row['attainment']:.1%}, TTFT p50/p90 "
              f"{row['ttft_p50_s']:.2f}/{row['ttft_p90_s']:.2f} s, TPOT p50/p90 {row['tpot_p50_s'] * 1e3:.0f}/"
              f"{row['tpot_p90_s'] * 1e3:.0f} ms")
    s, e, r = report["start"], report["end"], report["requests"]
    lat = _latency_summary(r)
    print(f"soak at {report['rate']:.2f} req/s (objectives TTFT {OBJECTIVES.ttft_s:g} s, TPOT "
          f"{OBJECTIVES.tpot_s:g} s): sent {r['sent']}, ok {r['ok']} ({r['empty']} ended by their first token), "
          f"refused {r['refused']}, error {r['error']}, "
          f"within both {r['within'] / max(1, r['sent']):.1%}; TTFT p50/p90 {lat['ttft_p50_s']:.2f}/"
          f"{lat['ttft_p90_s']:.2f} s, TPOT p50/p90 {lat['tpot_p50_s'] * 1e3:.0f}/{lat['tpot_p90_s'] * 1e3:.0f} ms; "
          f"kills {report['kills']}")
    for d in r["details"]:
        print(f"  {d}")
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
