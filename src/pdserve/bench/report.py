"""Result files and terminal tables.

A single run's JSON (``kind: "run"``) holds the metrics of ``metrics.BenchMetrics`` at the top level
(completed, failed, duration_s, request_throughput, output_throughput, ttft_s, tpot_s, itl_s, e2e_s,
slo_attainment, goodput, errors, ...), the settings it ran with (``workload``, ``slo``, endpoint), and a
``requests`` list with each request's latencies (for CDF plots and later analysis).

A sweep's JSON (``kind: "sweep"``) holds ``rates``, one run entry per rate under ``runs`` (each with its
``rate``), ``attainment_target`` and ``max_rate_meeting_attainment`` (None when no rate meets it).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pdserve.bench.loadgen import EndpointConfig, LoadResult
from pdserve.bench.metrics import BenchMetrics, RequestRecord, Slo, max_rate_meeting, request_latency

logger = logging.getLogger(__name__)

RESULT_VERSION = 1


def run_result(
    *,
    label: str,
    endpoint: EndpointConfig,
    workload: dict[str, object],
    slo: Slo,
    attainment_target: float,
    max_duration_s: float | None,
    load: LoadResult,
    metrics: BenchMetrics,
) -> dict[str, Any]:
    """The JSON-able result of one run."""
    result: dict[str, Any] = {
        "kind": "run",
        "version": RESULT_VERSION,
        "label": label,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_url": endpoint.base_url,
        "model": endpoint.model,
        "ignore_eos": endpoint.ignore_eos,
        "request_timeout_s": endpoint.request_timeout_s,
        "max_duration_s": max_duration_s,
        "workload": workload,
        "length_scale": workload.get("length_scale"),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "attainment_target": attainment_target,
        "num_not_sent": load.num_not_sent,
        # CLOCK_MONOTONIC seconds of send_s = 0 on the load generator's host (lines up with traces
        # written by `pdserve up --trace-dir` on the same host)
        "clock_origin_s": load.clock_origin_s,
    }
    result.update(metrics.to_dict())
    result["requests"] = [_request_entry(r) for r in load.records]
    return result


def sweep_result(
    *, label: str, rates: Sequence[float], runs: Sequence[dict[str, Any]], attainment_target: float
) -> dict[str, Any]:
    """The JSON-able result of a rate sweep; ``runs[i]`` ran at ``rates[i]``."""
    first = runs[0] if runs else {}
    workload = {k: v for k, v in first.get("workload", {}).items() if k != "rate"}
    attainments = [run["slo_attainment"] for run in runs]
    return {
        "kind": "sweep",
        "version": RESULT_VERSION,
        "label": label,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_url": first.get("base_url"),
        "model": first.get("model"),
        "workload": workload,
        "length_scale": first.get("length_scale"),
        "slo": first.get("slo"),
        "attainment_target": attainment_target,
        "rates": list(rates),
        "max_rate_meeting_attainment": max_rate_meeting(list(rates), attainments, attainment_target),
        "runs": [{"rate": rate, **run} for rate, run in zip(rates, runs, strict=True)],
    }


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


def load_result(path: str | Path) -> dict[str, Any]:
    """A result file written by ``write_json``; ValueError if it is not one."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read result file {path}: {e}") from e
    if not isinstance(result, dict) or result.get("kind") not in ("run", "sweep"):
        raise ValueError(f"{path} is not a pdserve bench result file")
    return result


def format_run(result: dict[str, Any]) -> str:
    """The terminal summary of one run."""
    wl = result.get("workload", {})
    slo = result.get("slo") or {}
    lines = [
        f"==== pdserve bench: {result.get('label')} ({result.get('model')} at {result.get('base_url')}) ====",
        "workload: " + ", ".join(f"{k}={v}" for k, v in wl.items() if k not in ("trace_path", "vocab_size")),
        f"length scale: {result.get('length_scale')}"
        + (f", output length scale: {wl['output_length_scale']}" if "output_length_scale" in wl else "")
        + (f", time scale: {wl['time_scale']}" if "time_scale" in wl else ""),
        _row(
            "sent / completed / failed", f"{result['num_sent']} / {result['completed']} / {result['failed']}"
        ),
    ]
    if result.get("num_not_sent"):
        lines.append(_row("not sent (max duration)", result["num_not_sent"]))
    for name, count in (result.get("errors") or {}).items():
        lines.append(_row(f"  error: {name}", count))
    lines += [
        _row("duration (s)", _fmt(result["duration_s"])),
        _row("request throughput (req/s)", _fmt(result["request_throughput"])),
        _row("output throughput (tok/s)", _fmt(result["output_throughput"])),
        _row("total token throughput (tok/s)", _fmt(result["total_token_throughput"])),
        f"{'latency (ms)':<32}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        stats = result[key]
        cells = "".join(f"{_fmt(_ms(stats.get(p))):>10}" for p in ("mean", "p50", "p90", "p99"))
        lines.append(f"{name:<32}{cells}")
    lines += [
        _row("SLO TTFT / TPOT (s)", f"{slo.get('ttft_s')} / {slo.get('tpot_s')}"),
        _row("SLO attainment", f"{result['slo_attainment']:.1%}"),
        _row("goodput (req/s)", _fmt(result["goodput"])),
    ]
    return "\n".join(lines)


def format_sweep(result: dict[str, Any]) -> str:
    """The terminal summary of a rate sweep: one line per rate, then the max rate meeting attainment."""
    slo = result.get("slo") or {}
    wl = result["workload"]
    scale = f"{result.get('length_scale')}"
    if "output_length_scale" in wl:
        scale += f" (outputs {wl['output_length_scale']})"
    title = f"{result.get('label')} ({result.get('model')} at {result.get('base_url')})"
    objectives = f"SLO TTFT {slo.get('ttft_s')} s / TPOT {slo.get('tpot_s')} s"
    columns = ("rate", 8), ("done", 7), ("fail", 6), ("req/s", 9), ("tok/s", 10), ("TTFT p90", 10)
    columns += ("TPOT p90", 10), ("attain", 9), ("goodput", 9)
    lines = [
        f"==== pdserve bench sweep: {title} ====",
        f"dataset: {wl.get('dataset')}, length scale: {scale}, {objectives}",
        "".join(f"{name:>{width}}" for name, width in columns),
    ]
    for run in result["runs"]:
        lines.append(
            f"{_fmt(run['rate']):>8}{run['completed']:>7}{run['failed']:>6}{_fmt(run['request_throughput']):>9}"
            f"{_fmt(run['output_throughput']):>10}{_fmt(_ms(run['ttft_s']['p90'])):>10}"
            f"{_fmt(_ms(run['tpot_s']['p90'])):>10}{run['slo_attainment']:>9.1%}{_fmt(run['goodput']):>9}"
        )
    lines.append("(TTFT/TPOT p90 in ms)")
    lines.append(
        f"max rate with >= {result['attainment_target']:.0%} SLO attainment: "
        f"{result['max_rate_meeting_attainment']} req/s"
    )
    return "\n".join(lines)


def format_result(result: dict[str, Any]) -> str:
    return format_sweep(result) if result.get("kind") == "sweep" else format_run(result)


def format_compare(results: Sequence[dict[str, Any]]) -> str:
    """Side-by-side key figures of several results, with ratios to the first."""
    labels = [str(r.get("label")) for r in results]
    width = max(12, *(len(label) + 2 for label in labels))
    lines = [f"{'':<30}" + "".join(f"{label:>{width}}" for label in labels)]
    rows: list[tuple[str, list[float | None]]] = []
    if all(r.get("kind") == "sweep" for r in results):
        rows.append(("max rate meeting SLO (req/s)", [r.get("max_rate_meeting_attainment") for r in results]))
        rows.append(
            ("best goodput (req/s)", [max((x["goodput"] for x in r["runs"]), default=None) for r in results])
        )
    else:
        runs = [representative_run(r) for r in results]
        rows += [
            ("request throughput (req/s)", [r["request_throughput"] for r in runs]),
            ("output throughput (tok/s)", [r["output_throughput"] for r in runs]),
            ("TTFT p90 (ms)", [_ms(r["ttft_s"]["p90"]) for r in runs]),
            ("TPOT p90 (ms)", [_ms(r["tpot_s"]["p90"]) for r in runs]),
            ("SLO attainment", [r["slo_attainment"] for r in runs]),
            ("goodput (req/s)", [r["goodput"] for r in runs]),
        ]
    for name, values in rows:
        lines.append(f"{name:<30}" + "".join(f"{_fmt(v):>{width}}" for v in values))
        base = values[0]
        if len(values) > 1 and base:
            ratios = [None if v is None else v / base for v in values]
            lines.append(f"{'  ratio to the first':<30}" + "".join(f"{_fmt(v):>{width}}" for v in ratios))
    return "\n".join(lines)


def runs_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The run entries of a result: itself for a run, each rate's for a sweep."""
    return list(result["runs"]) if result.get("kind") == "sweep" else [result]


def representative_run(result: dict[str, Any]) -> dict[str, Any]:
    """A run's own entry; for a sweep, the run at its max rate meeting attainment (else its first)."""
    if result.get("kind") != "sweep":
        return result
    best = result.get("max_rate_meeting_attainment")
    for run in result["runs"]:
        if run["rate"] == best:
            return run
    return result["runs"][0]


# ---------------------------------------------------------------------------------------------------


def _request_entry(record: RequestRecord) -> dict[str, Any]:
    lat = request_latency(record)
    return {
        "index": record.index,
        "input_len": record.input_len,
        "output_len": record.output_len,
        "output_tokens": record.output_tokens,
        "send_s": round(record.send_s, 6),
        "ttft_s": None if lat is None else lat.ttft_s,
        "tpot_s": None if lat is None else lat.tpot_s,
        "e2e_s": None if lat is None else lat.e2e_s,
        "itl_s": [] if lat is None else [round(x, 6) for x in lat.itl_s],
        "error": record.error,
        "error_detail": record.error_detail,
    }


def _row(name: str, value: object) -> str:
    return f"{name:<32}{value!s:>20}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
