"""A step-time model fitted to measurements of the real engine (``pdserve profile``).

step_time = c0 + c1 * prefill_tokens + c2 * prefill_attention + c3 * max(0, decodes - knee)
+ c4 * decode_context + c5 * decodes x longest decode context (``BatchShape.features``: for attention that
pads decodes to the longest, as pdserve's PyTorch fallback does; with the CPU decode kernel, which reads
each context at its own length, the fit puts it near zero), coefficients >= 0 found by non-negative least
squares on measured steps. ``knee`` (``decode_knee``, chosen by the fit from ``DECODE_KNEES``): small
decode batches cost what one decode costs while the GEMMs are bound by streaming the weights (measured
here: 1-4 decodes a step ~27-28 ms on one thread); 0 is the plain linear model.
The file is JSON: {"kind": "calibrated", "version": 2, "features": [...], "coef": [...], "decode_knee"
(absent: 0), "model", "hardware", "tp", "fit": {"r2", "mape", "num_samples"}, "created_by", "overheads":
{...} or absent}.
Version 2 added ``overheads`` (``sim.overheads.Overheads``, fitted by ``pdserve profile --live``) and the
sixth feature; files without a version are version 1 (five features: c5 = 0) and load with no overheads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pdserve.sim.overheads import Overheads
from pdserve.sim.perf_model import BatchShape, PerfModel

FEATURES = ("constant", "prefill_tokens", "prefill_attention", "decodes", "decode_context",
            "decode_padded_context")
FILE_VERSION = 2
DECODE_KNEES = (0, 1, 2, 3, 4, 6, 8)  # candidates the fit tries


class CalibratedPerfModel(PerfModel):
    def __init__(self, coef: list[float], meta: dict | None = None, overheads: Overheads | None = None,
                 decode_knee: int = 0) -> None:
        if decode_knee < 0:
            raise ValueError(f"decode_knee must be >= 0, got {decode_knee}")
        self.decode_knee = int(decode_knee)
        if len(coef) == len(FEATURES) - 1:
            coef = [*coef, 0.0]  # the five coefficients of version 1
        if len(coef) != len(FEATURES) or any(c < 0 for c in coef):
            raise ValueError(f"a calibrated model needs {len(FEATURES)} non-negative coefficients, got {coef}")
        self.coef = [float(c) for c in coef]
        self.meta = dict(meta or {})
        self.overheads = overheads

    def step_time_s(self, shape: BatchShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        c = self.coef
        return (c[0] + c[1] * shape.num_prefill_tokens + c[2] * shape.prefill_attn
                + c[3] * max(0, shape.num_decode - self.decode_knee) + c[4] * shape.decode_ctx
                + c[5] * shape.decode_padded_ctx)

    def prefill_part_s(self, shape: BatchShape) -> float:
        c = self.coef
        return c[1] * shape.num_prefill_tokens + c[2] * shape.prefill_attn

    def describe(self) -> dict[str, object]:
        out = {"kind": "calibrated", **{k: v for k, v in self.meta.items() if k not in ("samples", "live")}}
        if self.overheads is not None:
            out["overheads"] = self.overheads.to_dict()
        return out

    def with_overheads(self, overheads: Overheads | None, meta: dict | None = None) -> CalibratedPerfModel:
        """The same step model with other overheads (and extra metadata)."""
        return CalibratedPerfModel(self.coef, {**self.meta, **(meta or {})}, overheads, self.decode_knee)

    # -- files -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"kind": "calibrated", "version": FILE_VERSION, "features": list(FEATURES), "coef": self.coef,
               "decode_knee": self.decode_knee, **self.meta}
        if self.overheads is not None:
            out["overheads"] = self.overheads.to_dict()
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibratedPerfModel:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--perf-model: cannot read {path} (want 'analytic' or a `pdserve profile` file): {e}") \
                from e
        features = list(data.get("features", [])) if isinstance(data, dict) else []
        if not isinstance(data, dict) or data.get("kind") != "calibrated" or \
                features not in (list(FEATURES), list(FEATURES[:5])):
            raise ValueError(f"{path} is not a calibrated perf model written by `pdserve profile`")
        version = data.get("version", 1)
        if version not in (1, FILE_VERSION):
            raise ValueError(f"{path}: calibrated perf model version {version} is newer than this pdserve "
                             f"reads (up to {FILE_VERSION})")
        overheads = Overheads.from_dict(data["overheads"]) if data.get("overheads") is not None else None
        meta = {k: v for k, v in data.items()
                if k not in ("kind", "version", "features", "coef", "overheads", "decode_knee")}
        coef = list(data["coef"]) + [0.0] * (len(FEATURES) - len(features))  # version 1: no padded term
        return cls(coef, meta, overheads, int(data.get("decode_knee", 0)))


def fit(shapes: list[BatchShape], times_s: list[float]) -> tuple[CalibratedPerfModel, dict]:
    """Non-negative least squares (active set: drop the most negative coefficient, refit), relative
    weighting so that short and long steps count alike, for each knee in ``DECODE_KNEES``; the knee with
    the smallest weighted error wins (the first on ties: 0, the linear model, unless a knee fits better).
    Returns the model and fit statistics."""
    y = np.array(times_s, dtype=float)
    if len(y) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} measured steps, got {len(y)}")
    w = 1.0 / np.maximum(y, 1e-9)
    best: tuple[float, int, np.ndarray] | None = None
    for knee in DECODE_KNEES:
        x = np.array([s.features(knee) for s in shapes], dtype=float)
        coef = nnls(x * w[:, None], y * w)
        err = float((((x @ coef) - y) * w) @ (((x @ coef) - y) * w))
        if best is None or err < best[0] * (1 - 1e-9):
            best = (err, knee, coef)
    _, knee, coef = best
    pred = np.array([s.features(knee) for s in shapes], dtype=float) @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    stats = {"r2": 1 - ss_res / ss_tot, "mape": float(np.mean(np.abs(pred - y) / y)), "num_samples": len(y),
             "decode_knee": knee}
    return CalibratedPerfModel(coef.tolist(), {"fit": stats}, decode_knee=knee), stats


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (active set: drop the most negative one, refit)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef
