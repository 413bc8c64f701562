"""Disaggregated vs colocated goodput on the same machine, measured in the same run.

1. Start `pdserve up --colocated 1` (the baseline) and measure unloaded latency (one request at a time)
   of the longest prompt (--long-len in, --long-out out) and the shortest (--short-len in, --short-out
   out). Objectives, unless given: TTFT <= 5x the unloaded TTFT of the longest prompt, TPOT <= 2x the
   unloaded TPOT (the larger of the two measurements). Both systems are judged against these.
2. Sweep request rates (Poisson) on two workloads:
   (a) "mix": prefill-heavy mix, half long prompts with short outputs, half short prompts with long
       outputs (`pdserve bench --dataset mix --mix LONG:LONG_OUT:1,SHORT:SHORT_OUT:1`);
   (b) "mooncake": Mooncake trace replay (its lengths and shared prefixes) with a length scale.
3. Stop it, start `pdserve up --prefill 1 --decode 1` on the same cores, repeat 1 (for the record) and 2.
4. With --vllm-url, run the same sweeps against an externally started vLLM as a third system.
5. Print, per workload, the max rate with >= 90% SLO attainment and the best goodput of each system,
   and the ratio disaggregated / colocated; write result JSONs and comparison plots to --out-dir.

Everything goes through the `pdserve` CLI as subprocesses. `--dry-run` prints the commands only.

    python benchmarks/pd_vs_colocated.py --rates 0.25,0.5,1,2 --out-dir bench-results/pd_vs_colocated
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from pdserve.cluster.local import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "data" / "traces" / "mooncake_synthetic.jsonl"
SYSTEMS = {"colocated": ["--colocated", "1"], "disaggregated": ["--prefill", "1", "--decode", "1"]}


def main() -> int:
    args = _parse_args()
    out_dir = Path(args.out_dir)
    if not args.dry_run:
        out_dir.mkdir(parents=True, exist_ok=True)
    runner = _Runner(args, out_dir)
    slo: tuple[float, float] | None = (
        (args.slo_ttft, args.slo_tpot) if args.slo_ttft is not None and args.slo_tpot is not None else None
    )
    results: dict[str, dict[str, dict[str, Any]]] = {}
    unloaded: dict[str, dict[str, float]] = {}
    for system, up_args in SYSTEMS.items():
        with _Cluster(system, up_args, args, out_dir) as url:
            unloaded[system] = runner.unloaded(system, url)
            if slo is None:
                slo = _objectives(unloaded[system]) if not args.dry_run else (1.0, 0.1)
                print(f"objectives from {system} unloaded: TTFT <= {slo[0]:.3f} s, TPOT <= {slo[1]:.4f} s")
            results[system] = runner.sweeps(system, url, slo)
    if args.vllm_url:
        assert slo is not None
        unloaded["vllm"] = runner.unloaded("vllm", args.vllm_url)
        results["vllm"] = runner.sweeps("vllm", args.vllm_url, slo)
    if args.dry_run:
        return 0
    runner.compare(list(results))
    print(_report(results, unloaded, slo, args))
    return 0


class _Runner:
    """Builds and runs `pdserve bench` commands; returns the parsed result files."""

    def __init__(self, args: argparse.Namespace, out_dir: Path) -> None:
        self.args = args
        self.out_dir = out_dir

    def unloaded(self, system: str, url: str) -> dict[str, float]:
        a = self.args
        out: dict[str, float] = {}
        for name, in_len, out_len in (("long", a.long_len, a.long_out), ("short", a.short_len, a.short_out)):
            # one request at a time; the median shrugs off the first (warm-up) request
            result = self._bench(
                url,
                f"{system}_unloaded_{name}.json",
                [
                    "--dataset",
                    "random",
                    "--input-len",
                    str(in_len),
                    "--output-len",
                    str(out_len),
                    "--concurrency",
                    "1",
                    "--num-requests",
                    str(a.unloaded_requests),
                ],
            )
            if result is not None:
                out[f"{name}_ttft_s"] = result["ttft_s"]["p50"]
                out[f"{name}_tpot_s"] = result["tpot_s"]["p50"]
        return out

    def sweeps(self, system: str, url: str, slo: tuple[float, float]) -> dict[str, dict[str, Any]]:
        a = self.args
        slo_args = ["--slo-ttft", f"{slo[0]:.6g}", "--slo-tpot", f"{slo[1]:.6g}", "--rates", a.rates]
        workloads = {
            "mix": [
                "--dataset",
                "mix",
                "--mix",
                f"{a.long_len}:{a.long_out}:1,{a.short_len}:{a.short_out}:1",
                "--num-requests",
                str(a.num_requests),
            ],
            "mooncake": [
                "--dataset",
                f"mooncake:{a.trace}",
                "--length-scale",
                str(a.length_scale),
                "--output-len-scale",
                str(a.output_len_scale),
                "--num-requests",
                str(a.trace_requests),
            ],
        }
        out = {}
        for workload, wl_args in workloads.items():
            result = self._bench(url, f"{system}_{workload}.json", [*wl_args, *slo_args, "--label", system])
            if result is not None:
                out[workload] = result
        return out

    def compare(self, systems: list[str]) -> None:
        for workload in ("mix", "mooncake"):
            files = [self.out_dir / f"{s}_{workload}.json" for s in systems]
            files = [f for f in files if f.exists()]
            if len(files) >= 2:
                cmd = [*_bench_cmd(), "compare", *map(str, files), "--out-dir", str(self.out_dir / workload)]
                subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)

    def _bench(self, url: str, filename: str, extra: list[str]) -> dict[str, Any] | None:
        a = self.args
        out = self.out_dir / filename
        cmd = [
            *_bench_cmd(),
            "--base-url",
            url,
            "--seed",
            str(a.seed),
            "--request-timeout",
            str(a.request_timeout),
            "--max-duration",
            str(a.max_duration),
            "--out",
            str(out),
            *extra,
        ]
        if a.model:
            cmd += ["--model", a.model]
        print("$ " + shlex.join(cmd), flush=True)
        if a.dry_run:
            return None
        proc = subprocess.run(cmd, check=False)
        if not out.exists():
            raise RuntimeError(f"bench wrote no result (exit {proc.returncode}): {shlex.join(cmd)}")
        return json.loads(out.read_text())


class _Cluster:
    """`pdserve up` as a subprocess in its own process group; yields its base URL once healthy."""

    def __init__(self, system: str, up_args: list[str], args: argparse.Namespace, out_dir: Path) -> None:
        self.cmd = [
            *_pdserve(),
            "up",
            "--port",
            str(args.port or free_port()),
            *up_args,
            *shlex.split(args.up_args),
        ]
        self.url = f"http://127.0.0.1:{self.cmd[self.cmd.index('--port') + 1]}"
        self.log = out_dir / f"{system}_up.log"
        self.args = args
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        print("$ " + shlex.join(self.cmd), flush=True)
        if self.args.dry_run:
            return self.url
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_healthy()
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        try:
            wait_healthy(self.url, self.proc, self.args.startup_timeout, poll_s=1.0)
        except RuntimeError as e:
            self.__exit__()
            raise RuntimeError(f"{shlex.join(self.cmd)}: {e}; see {self.log}") from None


def _objectives(unloaded: dict[str, float]) -> tuple[float, float]:
    ttft = 5.0 * unloaded["long_ttft_s"]
    tpot = 2.0 * max(unloaded["long_tpot_s"] or 0.0, unloaded["short_tpot_s"] or 0.0)
    return ttft, tpot


def _report(
    results: dict[str, dict[str, dict[str, Any]]],
    unloaded: dict[str, dict[str, float]],
    slo: tuple[float, float] | None,
    args: argparse.Namespace,
) -> str:
    lines = ["", "==== disaggregated vs colocated (same machine, same run) ===="]
    if slo:
        lines.append(f"objectives: TTFT <= {slo[0]:.3f} s, TPOT <= {slo[1]:.4f} s, attainment >= 90%")
    lines.append(
        f"mooncake length scale: {args.length_scale} (outputs {args.output_len_scale}); "
        f"rates: {args.rates} req/s (Poisson)"
    )
    for system, u in unloaded.items():
        cells = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in u.items() if v is not None)
        lines.append(f"unloaded {system}: {cells}")
    systems = list(results)
    lines.append(
        f"{'workload':<10}{'figure':<32}" + "".join(f"{s:>16}" for s in systems) + f"{'disagg/coloc':>14}"
    )
    for workload in ("mix", "mooncake"):
        for name, pick in (
            ("max rate >= 90% SLO (req/s)", _max_rate),
            ("best goodput (req/s)", _best_goodput),
        ):
            values = [pick(results[s].get(workload)) for s in systems]
            by_system = dict(zip(systems, values, strict=True))
            coloc, disagg = by_system.get("colocated"), by_system.get("disaggregated")
            ratio = f"{disagg / coloc:.2f}x" if coloc and disagg is not None else "-"
            cells = "".join(f"{'-' if v is None else f'{v:.3g}':>16}" for v in values)
            lines.append(f"{workload:<10}{name:<32}{cells}{ratio:>14}")
    lines.append(f"results and plots: {args.out_dir}")
    return "\n".join(lines)


def _max_rate(result: dict[str, Any] | None) -> float | None:
    return None if result is None else result.get("max_rate_meeting_attainment")


def _best_goodput(result: dict[str, Any] | None) -> float | None:
    if result is None or not result.get("runs"):
        return None
    return max(run["goodput"] for run in result["runs"])


def _bench_cmd() -> list[str]:
    return [sys.executable, "-m", "pdserve.bench.cli"]  # same as `pdserve bench`, without the lead's CLI


def _pdserve() -> list[str]:
    exe = Path(sys.executable).with_name("pdserve")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from pdserve.cli import main; sys.exit(main())"]


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="see the module docstring for the method"
    )
    p.add_argument("--rates", default="0.25,0.5,1,2", help="Poisson rates to sweep, req/s")
    p.add_argument("--num-requests", type=int, default=40, help="requests per rate, mix workload")
    p.add_argument("--long-len", type=int, default=1024, help="longest prompt (tokens)")
    p.add_argument("--long-out", type=int, default=16, help="output tokens of long prompts")
    p.add_argument("--short-len", type=int, default=64, help="shortest prompt (tokens)")
    p.add_argument("--short-out", type=int, default=128, help="output tokens of short prompts")
    p.add_argument("--unloaded-requests", type=int, default=4, help="sequential requests per unloaded probe")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake JSONL trace")
    p.add_argument("--trace-requests", type=int, default=60, help="leading trace requests per rate")
    p.add_argument("--length-scale", type=float, default=1 / 32, help="Mooncake length scale")
    p.add_argument("--output-len-scale", type=float, default=0.25, help="Mooncake output length scale")
    p.add_argument("--slo-ttft", type=float, default=None, help="override the measured TTFT objective (s)")
    p.add_argument("--slo-tpot", type=float, default=None, help="override the measured TPOT objective (s)")
    p.add_argument("--model", default=None, help="model name for requests (default: what the server lists)")
    p.add_argument("--up-args", default="", help="extra arguments for `pdserve up`, e.g. '--model PATH'")
    p.add_argument("--port", type=int, default=None, help="port for `pdserve up` (default: a free one)")
    p.add_argument("--vllm-url", default=None, help="also benchmark an externally started vLLM at this URL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-duration", type=float, default=600.0, help="per rate and workload (s)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="wait for /health (s)")
    p.add_argument("--out-dir", default=str(REPO / "bench-results" / "pd_vs_colocated"))
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args()
    if not args.dry_run and not Path(args.trace).is_file():
        p.error(f"trace file not found: {args.trace}")
    if (args.slo_ttft is None) != (args.slo_tpot is None):
        p.error("give both --slo-ttft and --slo-tpot, or neither")
    return args


if __name__ == "__main__":
    sys.exit(main())
