"""A step-time model fitted to measurements of the real engine (``pdserve profile``).

step_time = c0 + c1 * prefill_tokens + c2 * prefill_attention + c3 * decodes + c4 * decode_context
+ c5 * decodes x longest decode context (``BatchShape.features``: for attention that pads decodes to the
longest, as pdserve's PyTorch fallback does; with the CPU decode kernel, which reads each context at its
own length, the fit puts it near zero), coefficients >= 0 found by non-negative least squares on measured steps.
The file is JSON: {"kind": "calibrated", "version": 2, "features": [...], "coef": [...], "model",
"hardware", "tp", "fit": {"r2", "mape", "num_samples"}, "created_by", "overheads": {...} or absent}.
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


class CalibratedPerfModel(PerfModel):
    def __init__(self, coef: list[float], meta: dict | None = None, overheads: Overheads | None = None) -> None:
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
        return (c[0] + c[1] * shape.num_prefill_tokens + c[2] * shape.prefill_attn + c[3] * shape.num_decode
                + c[4] * shape.decode_ctx + c[5] * shape.decode_padded_ctx)

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
        return CalibratedPerfModel(self.coef, {**self.meta, **(meta or {})}, overheads)

    # -- files -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"kind": "calibrated", "version": FILE_VERSION, "features": list(FEATURES), "coef": self.coef,
               **self.meta}
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
        meta = {k: v for k, v in data.items() if k not in ("kind", "version", "features", "coef", "overheads")}
        coef = list(data["coef"]) + [0.0] * (len(FEATURES) - len(features))  # version 1: no padded term
        return cls(coef, meta, overheads)


def fit(shapes: list[BatchShape], times_s: list[float]) -> tuple[CalibratedPerfModel, dict]:
    """Non-negative least squares (active set: drop the most negative coefficient, refit), relative
    weighting so that short and long steps count alike. Returns the model and fit statistics."""
    x = np.array([s.features() for s in shapes], dtype=float)
    y = np.array(times_s, dtype=float)
    if len(y) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} measured steps, got {len(y)}")
    w = 1.0 / np.maximum(y, 1e-9)
    active = list(range(len(FEATURES)))
    coef = np.zeros(len(FEATURES))
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    pred = x @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    stats = {"r2": 1 - ss_res / ss_tot, "mape": float(np.mean(np.abs(pred - y) / y)), "num_samples": len(y)}
    return CalibratedPerfModel(coef.tolist(), {"fit": stats}), stats
