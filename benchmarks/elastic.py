"""Elastic prefill/decode against fixed layouts on the same cores, measured in the same run (issue 21).

Layouts: `pdserve up --colocated 1` (one worker on every core), `--prefill 1 --decode 1` (a core each) and
`--mode auto` (the default: the elastic controller moves cores, roles and step time, path choice per
request), the last started once per objective set since the objectives steer it.

1. Calibration on the colocated layout: each workload's lone request (one at a time, median of 3) gives the
   objectives: TTFT <= 5x the lone TTFT; loose: TPOT <= 5x the lone TPOT; tight: TPOT <= 1.5x and every
   request's p99 inter-token latency <= 2x the lone TPOT.
2. Per layout, per workload, a sweep of Poisson rates with `pdserve bench` (fresh prompts at each rate: a
   seed per workload, repeat, rate and phase, the same for every layout):
   prefill-heavy (long prompts, short outputs), decode-heavy (short prompts, long outputs), phase-shifting
   (the two alternating on one cluster, --phase-s seconds each), and the Azure code trace's lengths.
   Admission is off in every cluster (`--admission-ttft-slack 0`): a refused request counts as a miss,
   and with the default objectives a fixed layout would refuse requests that meet this run's objectives.
3. Scoring, per request: TTFT and TPOT (and, tight, the ITL p99) within objective; attainment at each rate;
   goodput capacity = the highest rate whose attainment is >= 90%. With --repeats N the sweeps run N
   times and the report gives medians (and every run's figure).

4. With --sim (or --sim-only OUT_DIR: the runs of an earlier out-dir), the simulator's prediction beside
   them: every measured run again in `pdserve sim`'s simulator (the same workload flags, seed and number of
   requests, the same layout and KV budget), its step times from `pdserve profile` of the served weights,
   pinned as `pdserve up` pins each layout's workers (colocated: both cores; split and auto: one core a
   worker; or --perf-model colocated=F,split=F). What it leaves out: auto in the simulator changes roles and step targets but
   moves no cores (its instances are cards: the same controller, another lever), so it starts and stays at
   1P+1D unless a role changes; the tight objectives' ITL p99 is not scored (the simulator keeps no
   per-request gaps); the phase-shifting workload is not simulated.

    python benchmarks/elastic.py --out-dir bench-results/elastic [--repeats 3] [--workloads prefill,decode,shift,azure]
                                 [--sim] [--sim-only OUT_DIR] [--perf-model colocated=F,split=F]

Everything goes through the `pdserve` CLI as subprocesses; results (every bench JSON, the report) land in
--out-dir. Expect ~10-15 minutes per layout and repeat on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pdserve.cluster.local import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]
AZURE = REPO.parent / "shared" / "data" / "traces" / "azure2023_code.csv"
LAYOUTS = {"colocated": ["--colocated", "1"], "split": ["--prefill", "1", "--decode", "1"],
           "auto-loose": ["--mode", "auto"], "auto-tight": ["--mode", "auto"]}
# name: (bench flags, lone-request shape (input, output), default rates)
WORKLOADS = {
    "prefill": (["--dataset", "random", "--input-len", "1024", "--output-len", "16"], (1024, 16), "0.5,1,1.5,2,3"),
    "decode": (["--dataset", "random", "--input-len", "64", "--output-len", "256"], (64, 256), "1,2,4,6,8"),
    "azure": (["--dataset", f"dist:azure:{AZURE}", "--length-scale", "0.25"], (512, 64), "0.5,1,2,3"),
}
TARGET = 0.9


def main() -> int:
    args = _args()
    if args.sim_only:
        return _sim_report(Path(args.sim_only), args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workloads = [w for w in args.workloads.split(",") if w]
    # the phase-shifting workload's objectives are its two phases' (the slower lone request of each)
    calibrate = {w for w in workloads if w != "shift"} | ({"prefill", "decode"} if "shift" in workloads else set())
    with _Cluster(LAYOUTS["colocated"], out / "calibration.log") as url:
        lone = {w: _lone(url, w, out) for w in sorted(calibrate)}
    if "shift" in workloads:
        lone["shift"] = {k: max(lone["prefill"][k], lone["decode"][k]) for k in ("ttft_s", "tpot_s")}
    objectives = {w: _objectives(lone[w]) for w in workloads}
    (out / "objectives.json").write_text(json.dumps({"lone": lone, "objectives": objectives}, indent=1))
    runs: dict = {}
    for rep in range(args.repeats):
        for layout, flags in LAYOUTS.items():
            if layout not in args.layouts.split(","):
                continue
            # auto is steered by the objectives, so each objective set has its own auto cluster; auto runs
            # one workload's objectives per cluster start
            for w in workloads:
                if not layout.startswith("auto") and w != workloads[0]:
                    continue  # fixed layouts: one cluster for every workload
                extra = []
                if layout.startswith("auto"):
                    o = objectives[w][layout.removeprefix("auto-")]
                    extra = ["--slo-ttft", f"{o['ttft_s']:.4f}", "--slo-tpot", f"{o['tpot_s']:.4f}"]
                    if o.get("itl_p99_s"):
                        extra += ["--slo-itl-p99", f"{o['itl_p99_s']:.4f}"]
                todo = [w] if layout.startswith("auto") else workloads
                with _Cluster(flags + extra, out / f"{layout}-{w}-r{rep}.log") as url:
                    for wl in todo:
                        runs.setdefault(layout, {}).setdefault(wl, []).append(
                            _sweep(url, wl, args, out / f"{layout}-{wl}-r{rep}", rep))
    report = _report(runs, objectives, args)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(_format(report))
    return _sim_report(out, args) if args.sim else 0


def _objectives(lone: dict) -> dict:
    ttft, tpot = 5 * lone["ttft_s"], lone["tpot_s"]
    return {"loose": {"ttft_s": ttft, "tpot_s": 5 * tpot},
            "tight": {"ttft_s": ttft, "tpot_s": 1.5 * tpot, "itl_p99_s": 2 * tpot}}


def _lone(url: str, workload: str, out: Path) -> dict:
    """Median TTFT and TPOT of lone requests of the workload's shape (one at a time)."""
    inp, outp = WORKLOADS[workload][1]
    path = out / f"lone-{workload}.json"
    _bench(url, ["--dataset", "random", "--input-len", str(inp), "--output-len", str(outp), "--num-requests", "4",
                 "--concurrency", "1", "--warmup", "1", "--out", str(path)])
    reqs = [r for r in json.loads(path.read_text())["requests"] if r["ttft_s"] is not None][1:]
    return {"ttft_s": statistics.median(r["ttft_s"] for r in reqs),
            "tpot_s": statistics.median(r["tpot_s"] for r in reqs if r["tpot_s"] is not None)}


def _seed(workload: str, rep: int, rate_index: int, phase: int = 0) -> int:
    """The prompts' seed: fresh prompts for every rate, phase and repeat (a prompt sent at an earlier rate
    would be a prefix cache hit), the same prompts for every layout."""
    return 1 + ("prefill", "decode", "azure", "shift").index(workload) * 10**6 + rep * 10**4 + rate_index * 10 + phase


def _sweep(url: str, workload: str, args, prefix: Path, rep: int = 0) -> dict:
    """{rate: [per-request (ttft, tpot, itl p99)]} for the workload's rate sweep."""
    result = {}
    rates = [float(r) for r in (args.rates or (WORKLOADS["prefill"][2] if workload == "shift"
                                               else WORKLOADS[workload][2])).split(",")]
    for i, rate in enumerate(rates):
        path = Path(f"{prefix}-{rate:g}.json")
        if workload == "shift":
            reqs = []
            for phase in range(args.phases):  # prefill-heavy, decode-heavy, prefill-heavy, ...
                name = "prefill" if phase % 2 == 0 else "decode"
                # the decode phase at the rate that loads the decode side as the prefill phase loads prefill
                r = rate if name == "prefill" else rate * args.decode_rate_factor
                n = max(4, int(r * args.phase_s))
                phase_path = Path(f"{prefix}-{rate:g}-phase{phase}.json")
                _bench(url, WORKLOADS[name][0] + ["--rate", f"{r:g}", "--num-requests", str(n), "--seed",
                                                  str(_seed("shift", rep, i, phase)), "--warmup", "0",
                                                  "--out", str(phase_path)])
                reqs += json.loads(phase_path.read_text())["requests"]
            path.write_text(json.dumps({"requests": reqs}))
        else:
            n = max(args.min_requests, int(rate * args.run_s))
            _bench(url, WORKLOADS[workload][0] + ["--rate", f"{rate:g}", "--num-requests", str(n),
                                                  "--seed", str(_seed(workload, rep, i)), "--out", str(path)])
        result[rate] = [_latency(r) for r in json.loads(path.read_text())["requests"]]
    return result


def _latency(r: dict) -> tuple | None:
    """(TTFT, TPOT, ITL p99) of a served request (a simulated one has no gaps: ITL p99 0, not scored)."""
    if r["ttft_s"] is None or r.get("error"):
        return None
    itl = sorted(r.get("itl_s") or ())
    p99 = itl[min(len(itl) - 1, int(0.99 * len(itl)))] if itl else 0.0
    return r["ttft_s"], r["tpot_s"] or 0.0, p99


def _attainment(lat: list, o: dict) -> float:
    ok = [x is not None and x[0] <= o["ttft_s"] and x[1] <= o["tpot_s"] and
          (not o.get("itl_p99_s") or x[2] <= o["itl_p99_s"]) for x in lat]
    return sum(ok) / len(ok) if ok else 0.0


def _capacity(sweep: dict, o: dict) -> float:
    """The highest rate meeting the target (0 when none does)."""
    return max((rate for rate, lat in sweep.items() if _attainment(lat, o) >= TARGET), default=0.0)


def _report(runs: dict, objectives: dict, args) -> dict:
    rows = []
    for w in objectives:
        for kind in ("loose", "tight"):
            o = objectives[w][kind]
            row = {"workload": w, "objectives": kind, **{k: round(v, 4) for k, v in o.items()}}
            for layout in ("colocated", "split", f"auto-{kind}"):
                sweeps = runs.get(layout, {}).get(w, [])
                if not sweeps:
                    continue
                caps = [_capacity(s, o) for s in sweeps]
                att = {rate: [round(_attainment(s[rate], o), 3) for s in sweeps if rate in s] for rate in sweeps[0]}
                key = "auto" if layout.startswith("auto") else layout
                row[key] = {"capacity_median": statistics.median(caps), "capacities": caps, "attainment": att}
            fixed = [row[k]["capacity_median"] for k in ("colocated", "split") if k in row]
            if "auto" in row and fixed:
                best = max(fixed)
                row["auto_vs_best_fixed"] = round(row["auto"]["capacity_median"] / best, 3) if best else None
                col = row.get("colocated", {}).get("capacity_median")
                row["auto_vs_colocated"] = round(row["auto"]["capacity_median"] / col, 3) if col else None
            rows.append(row)
    return {"target": TARGET, "repeats": args.repeats, "rows": rows}


def _format(report: dict) -> str:
    lines = [f"{'workload':<9}{'SLO':<7}{'colocated':>11}{'split':>9}{'auto':>9}{'auto/best':>11}{'auto/coloc':>12}"
             "   (goodput capacity, req/s: highest rate with >= 90% attainment; medians)"]
    for r in report["rows"]:
        def cap(k):
            return f"{r[k]['capacity_median']:g}" if k in r else "-"
        lines.append(f"{r['workload']:<9}{r['objectives']:<7}{cap('colocated'):>11}{cap('split'):>9}{cap('auto'):>9}"
                     f"{r.get('auto_vs_best_fixed') or '-'!s:>11}{r.get('auto_vs_colocated') or '-'!s:>12}")
    return "\n".join(lines)


def _sim_report(out: Path, args) -> int:
    """Simulate every measured run in ``out`` (``_measured_runs``) and print, per workload, objectives and
    layout, the measured attainment at each rate beside the simulated one, and both capacities (medians)."""
    saved = json.loads((out / "objectives.json").read_text())["objectives"]
    perf_models = _perf_models(out, args.perf_model)
    measured = _measured_runs(out, saved)
    real = {layout: {w: [{rate: lat for rate, (_, lat) in rep.items()} for rep in reps]
                     for w, reps in by_workload.items()} for layout, by_workload in measured.items()}
    simulated = {layout: {w: [{rate: _simulate(layout, w, rate, len(lat), seed, saved, perf_models)
                               for rate, (seed, lat) in rep.items()} for rep in reps]
                          for w, reps in by_workload.items()} for layout, by_workload in measured.items()}
    rows = []
    print(f"simulator beside measured (perf models: {perf_models}); attainment by rate, measured / simulated")
    for w in saved:
        for kind in ("loose", "tight"):
            o = saved[w][kind]
            for layout in ("colocated", "split", f"auto-{kind}"):
                if w not in simulated.get(layout, {}):
                    continue
                runs, sims = real[layout][w], simulated[layout][w]
                att = {r: (statistics.median(_attainment(x[r], o) for x in runs),
                           statistics.median(_attainment(x[r], o) for x in sims)) for r in sorted(runs[0])}
                caps = tuple(statistics.median(_capacity(x, o) for x in sweeps) for sweeps in (runs, sims))
                rows.append({"workload": w, "objectives": kind, "layout": layout, "attainment": att, "capacity": caps})
                print(f"{w:<9}{kind:<7}{layout:<11}"
                      + "  ".join(f"{r:g}: {a:.2f} / {b:.2f}" for r, (a, b) in att.items())
                      + f"   capacity {caps[0]:g} / {caps[1]:g}")
    (out / "simulated.json").write_text(json.dumps({"perf_models": perf_models, "rows": [
        {**r, "attainment": {f"{k:g}": v for k, v in r["attainment"].items()}} for r in rows]}, indent=1))
    return 0


def _measured_runs(out: Path, objectives: dict) -> dict:
    """{layout: {workload: [{rate: (seed, per-request latencies) per repeat]}} of the runs in ``out``, read
    once from their bench files (``_sweep``'s names; the seed as ``_seed`` gave it, rate index by ascending
    rate)."""
    runs: dict = {}
    for layout in LAYOUTS:
        for w in objectives:
            if w == "shift":
                continue  # not simulated (see the module's doc)
            for rep in range(1000):
                files = [f for f in out.glob(f"{layout}-{w}-r{rep}-*.json") if "phase" not in f.name]
                if not files:
                    break
                rates = sorted(float(f.stem.rsplit("-", 1)[1]) for f in files)
                runs.setdefault(layout, {}).setdefault(w, []).append({rate: (_seed(w, rep, i), [
                    _latency(r) for r in json.loads((out / f"{layout}-{w}-r{rep}-{rate:g}.json").read_text())[
                        "requests"]]) for i, rate in enumerate(rates)})
    return runs


def _simulate(layout: str, w: str, rate: float, n: int, seed: int, objectives: dict, perf_models: dict) -> list:
    """One measured run in the simulator: per-request (TTFT, TPOT, 0) as ``_latency`` gives them."""
    from pdserve.bench.cli import add_workload_arguments, workload_from_args
    from pdserve.sim.simulator import SimOptions, Simulator
    from pdserve.sim.workload import work_items
    from sim_accuracy import host_cluster

    ap = argparse.ArgumentParser()
    add_workload_arguments(ap)
    config, _ = workload_from_args(ap.parse_args(
        WORKLOADS[w][0] + ["--rate", f"{rate:g}", "--num-requests", str(n), "--seed", str(seed)]))
    mode = {"colocated": "colocated", "split": "disaggregated"}.get(layout, "auto")
    spec, num_blocks = host_cluster(mode)
    slo = (None, None)
    if mode == "auto":  # the controller aims at the auto cluster's objectives, as `--slo-*` told the live one
        o = objectives[w][layout.removeprefix("auto-")]
        slo = (o["ttft_s"], o["tpot_s"])
    model = perf_models["colocated" if mode == "colocated" else "split"]
    result = Simulator(spec, work_items(config), SimOptions(perf_model=model, num_blocks=num_blocks), slo=slo).run()
    return [_latency(r) for r in result["requests"]]


def _perf_models(out: Path, given: str | None) -> dict[str, str]:
    """colocated and split step-time models: ``given`` (colocated=F,split=F), else `pdserve profile` now
    (into ``out``, reused when there) on the served weights, pinned as `pdserve up` pins each layout's
    workers."""
    models = dict(kv.split("=", 1) for kv in given.split(",")) if given else {}
    cores = sorted(os.sched_getaffinity(0))
    for mode, pin in (("colocated", [",".join(map(str, cores)), str(len(cores))]), ("split", [str(cores[0]), "1"])):
        if mode in models:
            continue
        models[mode] = str(out / f"perf-model-{mode}.json")
        if not Path(models[mode]).exists():
            print(f"profiling for {mode} (cpus {pin[0]}, {pin[1]} threads)", flush=True)
            # the served weights (the default model's GGUF, kept quantized as `pdserve up` keeps them): its
            # steps, not dummy bfloat16 ones (a lone decode step 1.8x slower here)
            subprocess.run([sys.executable, "-m", "pdserve.cli", "profile", "--load-format", "auto", "--out",
                            models[mode], "--cpus", pin[0], "--threads", pin[1]], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return models


def _bench(url: str, flags: list[str]) -> None:
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--no-progress", *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


class _Cluster:
    def __init__(self, flags: list[str], log: Path) -> None:
        self.flags, self.log = flags, log

    def __enter__(self) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--port", str(port),
                                          "--admission-ttft-slack", "0", *self.flags],
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.url, self.proc, 600)
        time.sleep(3.0)  # the controller's first moves (auto) and the workers' first stats
        return self.url

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="bench-results/elastic")
    ap.add_argument("--workloads", default="prefill,decode,shift,azure")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--rates", default=None, help="one rate list for every workload (default: each its own)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--run-s", type=float, default=30.0, help="seconds of arrivals per rate (non-shift)")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--phases", type=int, default=4, help="phase-shifting: phases per rate, alternating")
    ap.add_argument("--phase-s", type=float, default=40.0, help="phase-shifting: seconds of arrivals per phase")
    ap.add_argument("--decode-rate-factor", type=float, default=3.0,
                    help="phase-shifting: the decode phase's rate as a multiple of the prefill phase's")
    ap.add_argument("--sim", action="store_true", help="then the simulator's prediction of every run beside it")
    ap.add_argument("--sim-only", default=None, metavar="OUT_DIR",
                    help="no runs: the simulator's prediction beside the runs of an earlier --out-dir")
    ap.add_argument("--perf-model", default=None, metavar="colocated=F,split=F",
                    help="step-time models (`pdserve profile` files) instead of profiling now")
    return ap.parse_args()


if __name__ == "__main__":
    sys.exit(main())
