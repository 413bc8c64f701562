"""Overload (issue 15): at 2x, 5x and 10x the goodput capacity, what share is refused up front (429) and
whether the admitted requests keep their objectives; the processes' memory before and after.

1. `pdserve up` (auto, with --slo-ttft/--slo-tpot), a rate sweep with `pdserve bench` gives the goodput
   capacity (the highest rate with >= 90% attainment), measured once, on the first cluster;
2. then --seconds of Poisson arrivals at each multiple of it: the 429 share, and the attainment of the
   requests that were admitted; RSS of every pdserve process at the start and the end; the elastic
   controller's decisions during each load (from `/v1/cluster`).

Step 2 runs once per `--admission-ttft-slack` of --slacks, each on a cluster of its own; the goodput of each
is given against the first's (the baseline): 0 is admission by requests in flight only, 1 `pdserve up`'s
default.

    python benchmarks/overload.py [--rates 0.5,1,2,3] [--multiples 2,5,10] [--seconds 60] [--slacks 2,1]
                                  [--capacity R: no sweep, multiples of R req/s]
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil

from pdserve.cluster.local import free_port, wait_healthy

WORKLOAD = ["--dataset", "random", "--input-len", "512", "--output-len", "32"]


def main() -> int:
    a = _args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    capacity = a.capacity
    report = {"slo_ttft_s": a.slo_ttft, "slo_tpot_s": a.slo_tpot, "runs": []}
    for slack in [float(x) for x in a.slacks.split(",")]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--slo-ttft",
                                 str(a.slo_ttft), "--slo-tpot", str(a.slo_tpot), "--admission-ttft-slack",
                                 str(slack)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_healthy(url, proc, 600)
            if capacity == 0.0:
                for i, rate in enumerate(float(r) for r in a.rates.split(",")):
                    res = _bench(url, rate, max(16, int(rate * 30)), out / f"sweep-{rate:g}.json", seed=1 + i)
                    if _attainment(res, a, admitted_only=False) >= 0.9:
                        capacity = rate
                if capacity == 0.0:
                    print("no rate of the sweep met the objectives: no capacity to multiply")
                    return 1
            rss0 = _rss(proc.pid)
            rows, seen = [], {}
            for j, m in enumerate(float(x) for x in a.multiples.split(",")):
                rate = capacity * m
                res = _bench(url, rate, int(rate * a.seconds), out / f"overload-s{slack:g}-{m:g}x.json",
                             seed=100 + j)
                rows.append(_row(res, m, rate, a) | {"decisions": _decisions(url, seen)})
            rss1 = _rss(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        report["runs"].append({"slack": slack, "rows": rows, "rss_start_mib": rss0, "rss_end_mib": rss1})
    report["capacity"] = capacity
    print(f"capacity {capacity:g} req/s at TTFT <= {a.slo_ttft} s, TPOT <= {a.slo_tpot} s")
    print(f"{'slack':>6}{'load':>6}{'rate':>8}{'sent':>6}{'429 share':>11}{'admitted attainment':>21}"
          f"{'admitted TTFT p50/p90':>23}{'TPOT p50':>10}{'goodput':>9}{'vs first':>11}")
    base = {r["multiple"]: r["goodput_rps"] for r in report["runs"][0]["rows"]}
    for run in report["runs"]:
        for r in run["rows"]:
            ratio = f"{r['goodput_rps'] / base[r['multiple']]:.2f}x" if base.get(r["multiple"]) else "-"
            ttft = f"{r['admitted_ttft_p50_s']:.2f} / {r['admitted_ttft_p90_s']:.2f} s"
            print(f"{run['slack']:>6g}{r['multiple']:>5g}x{r['rate']:>8.2f}{r['sent']:>6}"
                  f"{r['refused_share']:>11.1%}{r['admitted_attainment']:>21.1%}{ttft:>23}"
                  f"{r['admitted_tpot_p50_s'] * 1e3:>8.0f}ms"
                  f"{r['goodput_rps']:>9.2f}{ratio:>11}")
        for r in run["rows"]:
            for d in r["decisions"]:
                print(f"  slack {run['slack']:g}, {r['multiple']:g}x: the controller: {d}")
        print(f"  slack {run['slack']:g}: RSS (MiB) per process, start -> end: " + ", ".join(
            f"{n} {run['rss_start_mib'].get(n, 0):.0f} -> {v:.0f}" for n, v in run["rss_end_mib"].items()))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


def _row(res: dict, multiple: float, rate: float, a) -> dict:
    """One load's figures: refusals, and how the admitted requests fared (goodput: requests within both
    objectives per second of arrivals)."""
    reqs = res["requests"]
    refused = sum(1 for r in reqs if r["error"] and "429" in str(r["error"]) + str(r["error_detail"]))
    ttfts = sorted(r["ttft_s"] for r in reqs if not r["error"] and r["ttft_s"] is not None)
    tpots = sorted(r["tpot_s"] for r in reqs if not r["error"] and r["tpot_s"] is not None)
    within = _attainment(res, a, admitted_only=False) * len(reqs)
    return {"multiple": multiple, "rate": rate, "sent": len(reqs), "refused_429": refused,
            "refused_share": refused / len(reqs) if reqs else 0.0,
            "admitted_attainment": _attainment(res, a, admitted_only=True),
            "admitted_ttft_p50_s": _quantile(ttfts, 0.5), "admitted_ttft_p90_s": _quantile(ttfts, 0.9),
            "admitted_tpot_p50_s": _quantile(tpots, 0.5),
            "goodput_rps": within / (len(reqs) / rate) if reqs else 0.0}


def _decisions(url: str, seen: dict) -> list[str]:
    """The elastic controller's decisions (with their reasons) since the last call: what moved during a load."""
    with urllib.request.urlopen(f"{url}/v1/cluster", timeout=30) as resp:
        elastic = json.loads(resp.read()).get("elastic") or {}
    # a decision's Unix time is recomputed at each call (from the monotonic clock): equal within a second
    new = [d for d in elastic.get("decisions", []) if d["unix_s"] > seen.get("last", float("-inf")) + 1.0]
    if new:
        seen["last"] = max(d["unix_s"] for d in new)
    return [d["reason"] for d in new]


def _quantile(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _bench(url: str, rate: float, n: int, path: Path, seed: int) -> dict:
    """Fresh prompts (``seed``) for each load: a prompt sent before would be a prefix cache hit; each slack's
    cluster gets the same ones."""
    subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--no-progress", *WORKLOAD,
                    "--rate", f"{rate:g}", "--num-requests", str(n), "--seed", str(seed), "--out", str(path)],
                   check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def _attainment(res: dict, a, admitted_only: bool) -> float:
    reqs = [r for r in res["requests"] if not (admitted_only and r["error"])]
    ok = [r for r in reqs if r["ttft_s"] is not None and r["ttft_s"] <= a.slo_ttft and (r["tpot_s"] or 0) <= a.slo_tpot]
    return len(ok) / len(reqs) if reqs else 0.0


def _rss(pid: int) -> dict[str, float]:
    out = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            name = " ".join(child.cmdline()[2:4]) or child.name()
            out[f"{child.pid}:{name}"] = child.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5,1,2,3")
    ap.add_argument("--multiples", default="2,5,10")
    ap.add_argument("--capacity", type=float, default=0.0,
                    help="req/s the multiples are of, instead of the sweep's (to compare runs at the same rates)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--slo-ttft", type=float, default=3.0)
    ap.add_argument("--slo-tpot", type=float, default=0.15)
    ap.add_argument("--slacks", default="2,1", help="--admission-ttft-slack of each run, the first the baseline "
                    "(0: in-flight bounds only; its queue takes many minutes to drain at 10x)")
    ap.add_argument("--out-dir", default="bench-results/overload")
    return ap.parse_args()


if __name__ == "__main__":
    sys.exit(main())
