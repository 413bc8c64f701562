"""What ``pdserve up`` shows while it starts a cluster, and the one screen it prints once ready.

``StartupProgress`` follows each worker through its start-up stages (CPU kernels built, weights loaded,
ready; the worker writes the first two with ``pdserve.progress.report_stage``, the third is its ready
file) and the frontend: a bar on a terminal, one log line per stage otherwise. ``summary`` renders
``GET /v1/cluster`` of the running cluster: URL, mode and layout, workers (device, cores, KV blocks, price),
the objectives, where to look, and a curl line to paste.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.progress import bar, on_terminal, read_stages

logger = logging.getLogger(__name__)

STAGES = ("kernels", "weights", "ready")


@dataclass
class _Worker:
    name: str
    progress_file: Path
    ready_file: Path
    done: set[str] = field(default_factory=set)


class StartupProgress:
    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self._bar = None

    def add_worker(self, name: str, progress_file: Path, ready_file: Path) -> None:
        self.workers.append(_Worker(name, progress_file, ready_file))

    def poll(self) -> None:
        """Read what the workers recorded since the last poll; show the stages newly done."""
        if self._bar is None:
            self._bar = bar(len(self.workers) * len(STAGES) + 1, "starting", unit="step", leave=False,
                            bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {elapsed}")
        for w in self.workers:
            events = {e.get("stage"): e for e in read_stages(w.progress_file)}
            if w.ready_file.exists():
                events["ready"] = {}
            for stage in STAGES:
                if stage in events and stage not in w.done:
                    w.done.add(stage)
                    self._show(f"{w.name}: {_describe(stage, events[stage])}")
            if "ready" in w.done:
                w.done.update(STAGES)  # a stage this worker has not (no CPU kernels on a GPU)
        pending = [w for w in self.workers if len(w.done) < len(STAGES)]
        if pending:
            nxt = next(s for s in STAGES if s not in pending[0].done)
            self._bar.set_description_str(f"{pending[0].name}: {_WAITING[nxt]}", refresh=False)
        else:
            self._bar.set_description_str("frontend: loading the tokenizer, connecting", refresh=False)
        self._bar.n = sum(len(w.done) for w in self.workers)
        self._bar.refresh()

    def frontend_ready(self) -> None:
        self.poll()
        self._show("frontend: serving")
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _show(self, line: str) -> None:
        if on_terminal() and self._bar is not None and not self._bar.disable:
            self._bar.write(f"  {line}")
        else:
            logger.info("%s", line)


def summary(url: str, status: dict | None, served_model: str, api_key: str | None = None) -> str:
    """The screen ``pdserve up`` prints once ready; ``status`` is /v1/cluster's body (None: unknown)."""
    auth = " -H 'Authorization: Bearer $PDSERVE_API_KEY'" if api_key else ""
    lines = [f"pdserve is ready at {url} (Ctrl-C stops it)", ""]
    if status is not None:
        order = {"prefill": 0, "decode": 1, "both": 2}
        workers = sorted(status.get("workers", []), key=lambda w: (order.get(w["role"], 3), w["worker_id"]))
        roles = [w["role"] for w in workers]
        layout = ", ".join(f"{roles.count(r)} {r}" for r in ("prefill", "decode", "both") if r in roles)
        lines.append(f"  model      {served_model}")
        lines.append(f"  mode       {status.get('mode')}: {layout}")
        price = status.get("cost", {}).get("price_per_hour")
        for i, w in enumerate(workers):
            lines.append(f"  {'workers' if i == 0 else '':<10} {w['worker_id']:<12} {w['role']:<8} {_device(w):<22} "
                         f"KV {w['num_blocks']} blocks  ${w.get('price_per_hour', 0):.3f}/h")
        if price is not None:
            lines.append(f"  cost       ${price:.3f}/h in all (prices: --price-per-hour, docs/monitoring.md)")
        plan = status.get("cost", {}).get("planned")
        if plan:
            per_m = plan["cost_per_million_tokens"]
            figures = ", ".join(f"{kind.replace('_', ' ')} ${per_m[kind]:.4f}" for kind in ("input", "output")
                                if per_m.get(kind) is not None)
            lines.append(f"  planned    {figures} per million tokens at {plan.get('goodput_rps') or 0:.2f} req/s "
                         f"({plan.get('planned_by') or 'the cluster file'}); live beside it on the dashboard")
        objectives = (status.get("elastic") or {}).get("objectives") or status.get("slo")
        if objectives and (objectives.get("ttft_s") or objectives.get("tpot_s")):
            steer = ": the elastic controller moves cores and roles to meet them" if status.get("elastic") else ""
            lines.append(f"  objectives TTFT {objectives.get('ttft_s')} s, TPOT {objectives.get('tpot_s')} s{steer}")
    lines += [f"  dashboard  {url}/dashboard", f"  status     {url}/v1/cluster   metrics {url}/metrics", "",
              "Try:",
              f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{served_model}\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'"]
    return "\n".join(lines)


def _device(w: dict) -> str:
    """``cpu, cores 0-1``, ``cpu, parked``, ``cpu, 4 cores`` (not pinned), ``cuda``."""
    device = w.get("device") or "?"
    cores = w.get("cores")
    if w.get("is_parked"):
        return f"{device}, parked"
    if cores:
        return f"{device}, core{'s' if len(cores) != 1 else ''} {_ranges(cores)}"
    if w.get("num_cores"):
        return f"{device}, {w['num_cores']} core{'s' if w['num_cores'] != 1 else ''}"
    return device


def _ranges(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> ``0-2,5``."""
    out, start = [], None
    for i, c in enumerate(sorted(cores)):
        if start is None:
            start = c
        if i + 1 == len(cores) or sorted(cores)[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


_WAITING = {"kernels": "building CPU kernels (once per machine)", "weights": "loading weights",
            "ready": "allocating the KV cache"}


def _describe(stage: str, event: dict) -> str:
    if stage == "kernels":
        what = "CPU kernels ready" if event.get("ok") else "CPU kernels off (PyTorch fallback)"
        return f"{what} ({event.get('seconds', 0):.1f} s)"
    if stage == "weights":
        return f"weights loaded ({event.get('seconds', 0):.1f} s)"
    return "ready"
