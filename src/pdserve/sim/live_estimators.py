"""The estimators ``pdserve profile --live`` fits a live cluster's overheads with (``sim/live.py`` has the
method, term by term): step scales and contention, fixed and cold step costs, the join cost, the jitter and
its memory, the loop gaps and the KV copy time. Pure functions of numpy arrays."""
from __future__ import annotations

import math
from collections import namedtuple
from typing import NamedTuple

import numpy as np

from pdserve.sim.calibrated import nnls
from pdserve.sim.perf_model import BatchShape

CONTENTION_GRID = np.linspace(0.0, 1.0, 201)
MIN_PART = 0.1  # share of profiled step time the prefill part and the rest each need for two scales
FIXED_MIN_SPAN = 3.0  # a fixed cost per step is fitted where step sizes (10th-90th percentile) span this
COLD_MIN_SHARE = 0.1  # and a cold-step cost where cold and warm steps are each this share of the steps
MEMORY_MAX_LAG_S = 5.0  # the jitter's memory is measured over step pairs this close in time
MEMORY_LAG_EDGES_S = np.array([0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, MEMORY_MAX_LAG_S])
MEMORY_MIN_PAIRS = 30  # a lag bin with fewer step pairs is not used
MEMORY_TIME_GRID_S = np.geomspace(0.01, 10.0, 61)
MEMORY_MIN_SHARE = 0.05  # a smaller correlated share is no memory

_Chunk = namedtuple("_Chunk", "start num_tokens samples")  # a traced step's chunk


def step_shape(step: dict) -> BatchShape:
    return BatchShape.from_chunks(_Chunk(*c) for c in step["chunks"])


class StepFit(NamedTuple):
    """A role's fitted step model (before join and jitter): live ~ ``scale`` x rest + ``prefill_scale``
    (None: ``scale``) x prefill part + ``fixed`` + ``cold`` if the step is cold."""

    scale: float
    prefill_scale: float | None = None
    fixed: float = 0.0
    cold: float = 0.0

    def model(self, x: np.ndarray, xp: np.ndarray, cold: np.ndarray) -> np.ndarray:
        """Modelled live step times of profiled times ``x``, their prefill parts ``xp``, cold flags."""
        prefill_scale = self.scale if self.prefill_scale is None else self.prefill_scale
        return self.scale * (x - xp) + prefill_scale * xp + self.fixed + self.cold * cold


def fit_scales(samples: dict, grid=CONTENTION_GRID) -> tuple[float, dict[str, StepFit]]:
    """(contention, ``StepFit`` per role): see the module doc. ``samples[role]``: live and profiled step
    times, contended (0/1), the profiled prefill part, cold (0/1), whether to split."""
    best = None
    for c in grid:
        fits, sse = {}, 0.0
        for role, (live, pred, contended, prefill, cold, may_split) in samples.items():
            x, xp = contended_times(pred, prefill, contended, c)
            split = may_split and MIN_PART <= xp.sum() / max(x.sum(), 1e-12) <= 1 - MIN_PART
            fit = two_scales(live, x - xp, xp) if split else None
            if fit is None:
                fit = scale_fixed_cold(live, x, cold)
            fits[role] = fit
            sse += float(((live - fit.model(x, xp, cold)) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, float(c), fits)
    return best[1], best[2]


def scale_fixed_cold(live: np.ndarray, x: np.ndarray, cold: np.ndarray) -> StepFit:
    """live ~ scale x ``x`` (+ fixed, + cold x ``cold``, each only where the steps can tell it from the
    scale: sizes spanning ``FIXED_MIN_SPAN``, cold and warm steps each ``COLD_MIN_SHARE`` of them), by
    non-negative least squares; with neither, the ratio of sums (the role's total time kept)."""
    if not x.sum() > 0:
        return StepFit(1.0)
    columns = {"scale": x}
    lo, hi = np.percentile(x, [10, 90])
    if lo > 0 and hi / lo >= FIXED_MIN_SPAN:
        columns["fixed"] = np.ones_like(x)
    if COLD_MIN_SHARE <= cold.mean() <= 1 - COLD_MIN_SHARE:
        columns["cold"] = cold
    if len(columns) == 1:
        return StepFit(float(live.sum() / x.sum()))
    coef = dict(zip(columns, nnls(np.stack(list(columns.values()), axis=1), live), strict=True))
    if not coef["scale"] > 0:
        return StepFit(float(live.sum() / x.sum()))
    return StepFit(float(coef["scale"]), None, float(coef.get("fixed", 0.0)), float(coef.get("cold", 0.0)))


def fit_join(sample: tuple, joins: np.ndarray, fit: StepFit, contention: float) -> float:
    """Seconds per request taking its first decode in a step: least squares (with an intercept) of the
    steps' residuals under ``fit`` and ``contention`` on the number of such requests, >= 0."""
    live, pred, contended, prefill, cold, _ = sample
    if not joins.any() or joins.all():
        return 0.0
    residual = live - fit.model(*contended_times(pred, prefill, contended, contention), cold)
    slope = np.linalg.lstsq(np.stack([np.ones_like(joins), joins], axis=1), residual, rcond=None)[0][1]
    return max(0.0, float(slope))


class Jitter(NamedTuple):
    sd: float = 0.0
    corr_share: float = 0.0
    corr_s: float = 0.0


def fit_jitter(sample: tuple, joins: np.ndarray, segment: np.ndarray, starts: np.ndarray, fit: StepFit,
                contention: float, join: float) -> Jitter:
    """The standard deviation of log(live / modelled) step time, each worker window's mean taken out (the
    host's slower drift between runs is not a step's jitter), and its memory (``fit_memory``)."""
    live, pred, contended, prefill, cold, _ = sample
    model = fit.model(*contended_times(pred, prefill, contended, contention), cold) + join * joins
    ok = (live > 0) & (model > 0)
    r, seg, t = np.log(live[ok] / model[ok]), segment[ok], starts[ok]
    groups = np.unique(seg)
    if len(r) <= len(groups):
        return Jitter()
    for g in groups:
        r[seg == g] -= r[seg == g].mean()
    var = float((r ** 2).sum() / (len(r) - len(groups)))
    return Jitter(math.sqrt(var), *fit_memory([(t[seg == g], r[seg == g]) for g in groups], var))


def fit_memory(series: list[tuple[np.ndarray, np.ndarray]], var: float) -> tuple[float, float]:
    """(share, time constant) of residuals' autocorrelation ~ share x exp(-dt / time constant): pairs of
    steps of one worker ``dt`` apart (under ``MEMORY_MAX_LAG_S``) binned on ``MEMORY_LAG_EDGES_S``, each
    bin's mean product over ``var``; least squares weighted by the pairs in each bin, the time constant on
    ``MEMORY_TIME_GRID_S`` and the share in closed form, clipped to [0, 1]. (0, 0) without a share of
    ``MEMORY_MIN_SHARE``: no memory."""
    sums = np.zeros(len(MEMORY_LAG_EDGES_S) - 1)
    lags, counts = np.zeros_like(sums), np.zeros_like(sums)
    for t, r in series:
        order = np.argsort(t, kind="stable")
        t, r = t[order], r[order]
        for k in range(1, len(t)):
            dt = t[k:] - t[:-k]
            near = dt < MEMORY_MAX_LAG_S
            if not near.any():
                break
            bins = np.searchsorted(MEMORY_LAG_EDGES_S, dt[near], side="right") - 1
            np.add.at(sums, bins, (r[k:] * r[:-k])[near])
            np.add.at(lags, bins, dt[near])
            np.add.at(counts, bins, 1)
    used = counts >= MEMORY_MIN_PAIRS
    if var <= 0 or not used.any():
        return 0.0, 0.0
    rho, dt, w = sums[used] / counts[used] / var, lags[used] / counts[used], counts[used]
    best = (math.inf, 0.0, 0.0)
    for tau in MEMORY_TIME_GRID_S:
        e = np.exp(-dt / tau)
        share = float(np.clip((w * rho * e).sum() / (w * e * e).sum(), 0.0, 1.0))
        err = float((w * (rho - share * e) ** 2).sum())
        if err < best[0]:
            best = (err, share, float(tau))
    _, share, tau = best
    return (share, tau) if share >= MEMORY_MIN_SHARE else (0.0, 0.0)


def contended_times(pred: np.ndarray, prefill: np.ndarray, contended: np.ndarray, c: float):
    """Profiled step times and their prefill parts, each x (1 + c) where the step was contended."""
    factor = 1 + c * contended
    return pred * factor, prefill * factor


def two_scales(live: np.ndarray, rest: np.ndarray, prefill: np.ndarray) -> StepFit | None:
    """Least squares live ~ a x rest + b x prefill, both > 0; None if either comes out <= 0."""
    a, b = np.linalg.lstsq(np.stack([rest, prefill], axis=1), live, rcond=None)[0]
    return StepFit(float(a), float(b)) if a > 0 and b > 0 else None


def fit_kv(tokens: list[int], seconds: list[float]) -> tuple[float, float]:
    if len(set(tokens)) < 2:
        return 0.0, mean(seconds) / max(mean(tokens), 1.0)
    return nnls2(np.array(tokens, dtype=float), np.array(seconds))


def fit_gap(outputs: list[int], gaps: list[float]) -> tuple[float, float]:
    if not gaps:
        return 0.0, 0.0
    if len(set(outputs)) < 2:
        return max(0.0, mean(gaps)), 0.0
    return nnls2(np.array(outputs, dtype=float), np.array(gaps))


def nnls2(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y ~ a + b x with a, b >= 0 (least squares; a coefficient that comes out negative is dropped)."""
    a, b = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), y, rcond=None)[0]
    if a >= 0 and b >= 0:
        return float(a), float(b)
    if a < 0:
        return 0.0, max(0.0, float(np.dot(x, y) / np.dot(x, x)))
    return max(0.0, float(y.mean())), 0.0


def mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def ms(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": math.nan, "p90": math.nan}
    v = np.array(values) * 1e3
    return {"n": len(v), "mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p90": float(np.percentile(v, 90)), "max": float(v.max())}
