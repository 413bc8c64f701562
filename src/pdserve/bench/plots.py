"""PNG plots of bench results (matplotlib, Agg backend: no display needed).

- ``latency_cdf.png``: CDFs of TTFT, TPOT, ITL and end-to-end latency, one line per run (per rate in
  a sweep, per system in a comparison);
- ``attainment_vs_rate.png`` and ``goodput_vs_rate.png``: SLO attainment and goodput against request
  rate, one line per system (sweeps only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pdserve.bench.report import representative_run, runs_of

logger = logging.getLogger(__name__)

_METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "end-to-end latency"))


def write_plots(result: dict[str, Any], plot_dir: str | Path) -> list[Path]:
    """Plots of one result file's content; returns the files written."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    if result.get("kind") == "sweep":
        curves = [(f"{run['rate']:g} req/s", run) for run in runs_of(result)]
        paths = [plot_latency_cdfs(curves, plot_dir / "latency_cdf.png", title=str(result.get("label")))]
        paths += plot_rate_curves([result], plot_dir)
        return paths
    return [plot_latency_cdfs([(str(result.get("label")), result)], plot_dir / "latency_cdf.png")]


def write_compare_plots(results: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One line per system: latency CDFs (a sweep's run at its max rate meeting attainment), and
    attainment/goodput against rate for the results that are sweeps."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = [(str(r.get("label")), representative_run(r)) for r in results]
    paths = [plot_latency_cdfs(curves, out_dir / "latency_cdf.png", title="comparison")]
    sweeps = [r for r in results if r.get("kind") == "sweep"]
    if sweeps:
        paths += plot_rate_curves(sweeps, out_dir)
    return paths


def plot_latency_cdfs(curves: Sequence[tuple[str, dict[str, Any]]], path: Path, title: str = "") -> Path:
    """A 2x2 figure of latency CDFs; ``curves`` are (legend label, run result) pairs."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, name) in zip(axes.flat, _METRICS, strict=True):
        for label, run in curves:
            values = _per_request_values(run, key)
            if values.size:
                ys = np.arange(1, values.size + 1) / values.size
                ax.step(values * 1000.0, ys, where="post", label=label)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of completed requests" if key != "itl_s" else "fraction of token gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        slo_s = (curves[0][1].get("slo") or {}).get(key) if curves and key in ("ttft_s", "tpot_s") else None
        if slo_s:
            ax.axvline(slo_s * 1000.0, color="grey", linestyle="--", linewidth=1, label="objective")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small")
    fig.suptitle(f"latency CDFs {title}".strip())
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _save(fig, path)


def plot_rate_curves(sweeps: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """SLO attainment and goodput against rate, one line per sweep result."""
    paths = []
    for key, ylabel, filename in (
        ("slo_attainment", "SLO attainment", "attainment_vs_rate.png"),
        ("goodput", "goodput (req/s)", "goodput_vs_rate.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for sweep in sweeps:
            rates = [run["rate"] for run in sweep["runs"]]
            ax.plot(rates, [run[key] for run in sweep["runs"]], marker="o", label=str(sweep.get("label")))
        if key == "slo_attainment" and sweeps:
            ax.axhline(
                sweeps[0]["attainment_target"], color="grey", linestyle="--", linewidth=1, label="target"
            )
            ax.set_ylim(0, 1.05)
        if key == "goodput" and sweeps:
            rates = sorted({run["rate"] for s in sweeps for run in s["runs"]})
            ax.plot(rates, rates, color="grey", linestyle=":", linewidth=1, label="offered rate")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        scale = sweeps[0].get("length_scale") if sweeps else None
        ax.set_title(f"{ylabel} vs rate (length scale {scale})")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / filename))
    return paths


def _per_request_values(run: dict[str, Any], key: str) -> np.ndarray:
    values: list[float] = []
    for req in run.get("requests", ()):
        if key == "itl_s":
            values.extend(req.get("itl_s") or ())
        elif req.get(key) is not None:
            values.append(req[key])
    return np.sort(np.asarray(values, dtype=float))


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path
