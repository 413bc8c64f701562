"""What a fault costs the clients (issue 15): requests sent, completed, failed with a clear error, lost (the
stream ended without [DONE] or an error), hung (no end within --deadline), and the time from the fault to
the last affected request's end, per fault kind, on `pdserve up --prefill 2 --decode 2`.

Faults: SIGKILL of a prefill worker, SIGKILL of a decode worker, SIGSTOP of a decode worker past the
liveness timeout (then SIGCONT), and KV transfers dropped or corrupted (PDSERVE_FAULTS on a cluster of
their own). Each fault hits a load of --requests concurrent streaming requests when they are about a
third through; between faults the cluster gets its killed workers back (pdserve up restarts them).
Target: lost 0, hung 0, errored 0 for a single worker's death while another of its role survives.

    python benchmarks/faults.py [--requests 24] [--max-tokens 64] [--out bench-results/faults.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from pdserve.cluster.local import free_port, wait_healthy

MODEL = "smollm2-135m"
PROMPT = "Here is a long story about a lighthouse keeper who collects the sounds of storms. " * 6


def main() -> int:
    a = _args()
    rows = []
    with _Cluster(["--prefill", "2", "--decode", "2", "--worker-timeout", "3"]) as url:
        for kind in ("kill-prefill", "kill-decode", "stop-decode"):
            rows.append(_run_fault(url, kind, a))
            _wait_all_alive(url)
    for kind, plan in (("kv-drop", "kv_drop=0.5"), ("kv-corrupt", "kv_corrupt=0.5")):
        with _Cluster(["--prefill", "1", "--decode", "1", "--worker-timeout", "3"], {"PDSERVE_FAULTS": plan}) as url:
            rows.append(_run_fault(url, kind, a))
    print(f"{'fault':<14}{'sent':>6}{'done':>6}{'failed':>8}{'lost':>6}{'hung':>6}{'fault->last end (s)':>22}")
    for r in rows:
        print(f"{r['fault']:<14}{r['sent']:>6}{r['completed']:>6}{r['failed']:>8}{r['lost']:>6}{r['hung']:>6}"
              f"{r['recovery_s']:>22.2f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


def _run_fault(url: str, kind: str, a) -> dict:
    outcomes: dict[int, tuple[str, float]] = {}
    tokens = [0] * a.requests

    def stream(i: int) -> None:
        body = {"model": MODEL, "prompt": PROMPT + str(i), "max_tokens": a.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        end = "lost"
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=a.deadline) as resp:
                if resp.status_code != 200:
                    end = "failed"
                else:
                    for line in resp.iter_lines():
                        if line == "data: [DONE]":
                            end = "completed" if end == "lost" else end
                            break
                        if line.startswith("data: ") and '"error"' in line[:40]:
                            end = "failed"
                        elif line.startswith("data: "):
                            tokens[i] += 1
        except httpx.TimeoutException:
            end = "hung"
        except httpx.HTTPError:
            end = "lost"
        outcomes[i] = (end, time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(a.requests)]
    for t in threads:
        t.start()
    while sum(tokens) < a.requests * a.max_tokens // 3 and any(t.is_alive() for t in threads):
        time.sleep(0.02)
    fault_s = time.monotonic()
    workers = httpx.get(f"{url}/health", timeout=10).json()["workers"]
    if kind in ("kill-prefill", "kill-decode", "stop-decode"):
        role = "prefill" if kind == "kill-prefill" else "decode"
        victim = max((w for w in workers if w["role"] == role and w["alive"]), key=lambda w: w["num_inflight"])
        if kind == "stop-decode":
            os.kill(victim["pid"], signal.SIGSTOP)
            threading.Timer(8.0, os.kill, (victim["pid"], signal.SIGCONT)).start()
        else:
            os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(a.deadline + 30)
    ends = [e for e, _ in outcomes.values()]
    return {"fault": kind, "sent": a.requests, "completed": ends.count("completed"), "failed": ends.count("failed"),
            "lost": ends.count("lost"), "hung": ends.count("hung") + a.requests - len(outcomes),
            "recovery_s": max((t for _, t in outcomes.values()), default=fault_s) - fault_s}


def _wait_all_alive(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(w["alive"] for w in httpx.get(f"{url}/health", timeout=10).json()["workers"]):
            return
        time.sleep(0.5)
    raise RuntimeError("the cluster did not get its workers back")


class _Cluster:
    def __init__(self, flags: list[str], env: dict | None = None) -> None:
        self.flags, self.env = flags, env

    def __enter__(self) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--port", str(port),
                                      "--kv-cache-memory", "256MiB", *self.flags],
                                     env={**os.environ, **(self.env or {})}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_healthy(self.url, self.proc, 600)
        return self.url

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=180.0, help="a request not ended by then is hung")
    ap.add_argument("--out", default=None)
    return ap.parse_args()


if __name__ == "__main__":
    sys.exit(main())
