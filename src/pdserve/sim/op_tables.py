"""Measured operator tables: per card kind and dtype, the time of the operations an engine step runs.

A table holds published measurements (points), each table with its source (document, URL, date). Between
measured points the time is interpolated piecewise-linearly (exact at the points, monotone between
them); outside a table, ``lookup`` either clamps to the nearest point (below the range: the kernel's
latency floor) or scales the roofline by the efficiency the table measured at its edge (above it), and
says which. The performance model (``perf_model.AnalyticPerfModel``) uses a table where one covers the
operation and the plain roofline where none does; every lookup returns a ``Timing`` naming what it used.

Tables are measured on one card (``measured_on``, whose peak figures the file states); a card without
tables of its own may borrow another's (``hardware.yaml``: ``op_tables: {file, scale: true}``): each
measured time is then multiplied by the ratio of the two cards' rooflines for that operation (the same
achieved fraction of peak), and the source says so. File format: ``sim/op_data/README.md``.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

OP_DATA_DIR = Path(__file__).with_name("op_data")


@dataclass(frozen=True)
class Source:
    """Where a table's numbers come from."""

    document: str
    url: str = ""
    date: str = ""
    notes: str = ""

    def short(self) -> str:
        return self.document if not self.date else f"{self.document} ({self.date})"


@dataclass(frozen=True)
class Timing:
    """One operation's time and what gave it: ``table``, ``table-clamped`` (below the measured range:
    the smallest measured time), ``table-edge`` (beyond it: the roofline at the table's edge efficiency),
    ``roofline`` (no table), each optionally ``+scaled`` (a table of another card or dtype, scaled by
    the roofline ratio)."""

    seconds: float
    kind: str
    source: str = ""


@dataclass(frozen=True)
class Curve:
    """Measured (x, t) points, x strictly increasing, t non-decreasing."""

    xs: tuple[float, ...]
    ts: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.xs) != len(self.ts) or not self.xs:
            raise ValueError("a curve needs as many times as points, at least one")
        if any(b <= a for a, b in zip(self.xs, self.xs[1:])):
            raise ValueError(f"curve points must increase strictly: {self.xs}")
        if any(b < a for a, b in zip(self.ts, self.ts[1:])) or self.ts[0] < 0:
            raise ValueError(f"curve times must be >= 0 and non-decreasing: {self.ts}")

    def where(self, x: float) -> int:
        """-1 below the range, 1 above it, 0 inside."""
        return -1 if x < self.xs[0] else 1 if x > self.xs[-1] else 0

    def at(self, x: float) -> float:
        """Interpolated value at ``x`` clamped into the range."""
        xs, ts = self.xs, self.ts
        if x <= xs[0]:
            return ts[0]
        if x >= xs[-1]:
            return ts[-1]
        i = bisect.bisect_right(xs, x)
        x0, x1, t0, t1 = xs[i - 1], xs[i], ts[i - 1], ts[i]
        return t0 + (t1 - t0) * (x - x0) / (x1 - x0)


def lookup(curve: Curve, x: float, roofline: Callable[[float], float], source: str) -> Timing:
    """A curve's time at ``x``: interpolated inside, clamped below, the roofline at the edge's
    efficiency above (continuous at the edge, non-decreasing where the roofline is)."""
    side = curve.where(x)
    if side == 0:
        return Timing(curve.at(x), "table", source)
    if side < 0:
        return Timing(curve.ts[0], "table-clamped", source)
    edge = curve.xs[-1]
    ratio = curve.ts[-1] / max(roofline(edge), 1e-30)
    return Timing(roofline(x) * ratio, "table-edge", source)


@dataclass(frozen=True)
class ShapeTable:
    """Times by token count (``m``) for a family of shapes (GEMM weights N x K, or an element-wise
    layer's widths), each shape a ``Curve`` over ``m``. ``size(shape)`` orders shapes (a GEMM's weight
    elements). A measured shape is read from its own curve. Another is interpolated in time per size
    unit, linearly in log size, between the two nearest measured sizes (a convex combination of
    non-decreasing curves: still non-decreasing in ``m``); beyond the largest size, at the largest's
    time per unit (``table-edge``); below the smallest, the smallest's time (``table-clamped``)."""

    source: Source
    curves: dict[tuple[int, int], Curve]
    size: Callable[[tuple[int, int]], float]
    _sizes: tuple[float, ...] = field(init=False, repr=False)
    _groups: tuple[tuple[tuple[tuple[int, int], Curve], ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        groups: dict[float, list] = {}
        for shape, curve in self.curves.items():
            groups.setdefault(self.size(shape), []).append((shape, curve))
        sizes = sorted(groups)
        object.__setattr__(self, "_sizes", tuple(sizes))
        object.__setattr__(self, "_groups", tuple(tuple(groups[s]) for s in sizes))

    def covers(self, shape: tuple[int, int]) -> bool:
        """Whether ``shape`` was measured or lies between measured sizes."""
        return shape in self.curves or self._sizes[0] <= self.size(shape) <= self._sizes[-1]

    def time(self, m: float, shape: tuple[int, int], roofline: Callable[[float, tuple[int, int]], float],
             label: str) -> Timing:
        """Time of ``shape`` at ``m`` tokens (``roofline(m, shape)``: the measuring card's roofline)."""
        source = f"{label}: {self.source.short()}"
        curve = self.curves.get(shape)
        if curve is not None:
            return lookup(curve, m, lambda x: roofline(x, shape), source)
        s, sizes = self.size(shape), self._sizes
        if s <= sizes[0]:
            t, _ = self._per_unit(0, m, roofline)
            return Timing(t * sizes[0], "table-clamped", source)
        if s >= sizes[-1]:
            t, _ = self._per_unit(len(sizes) - 1, m, roofline)
            return Timing(t * s, "table-edge", source)
        hi = bisect.bisect_left(sizes, s)
        lo = hi - 1
        e_lo, k_lo = self._per_unit(lo, m, roofline)
        e_hi, k_hi = self._per_unit(hi, m, roofline)
        u = (math.log(s) - math.log(sizes[lo])) / (math.log(sizes[hi]) - math.log(sizes[lo]))
        kind = k_lo if k_lo == k_hi else "table-edge" if "table-edge" in (k_lo, k_hi) else "table-clamped"
        return Timing(((1 - u) * e_lo + u * e_hi) * s, kind, source)

    def _per_unit(self, k: int, m: float, roofline: Callable[[float, tuple[int, int]], float]) -> tuple[float, str]:
        """Mean time per size unit of the shapes measured at the k-th size, and the lookups' kind."""
        times = [lookup(c, m, lambda x, sh=sh: roofline(x, sh), "") for sh, c in self._groups[k]]
        return sum(t.seconds for t in times) / len(times) / self._sizes[k], times[0].kind


@dataclass(frozen=True)
class OpTables:
    """Every table of one file, by operation and dtype. ``peaks`` are the measuring card's figures
    (``memory_tbs``, ``tflops`` by dtype, ``nvlink_gbs``, ``network_gbs``) for roofline scaling."""

    name: str
    measured_on: str
    peaks: dict
    gemm: dict[str, ShapeTable]
    elementwise: dict[str, ShapeTable]
    attention_prefill: dict[str, tuple[Source, Curve]]  # x: mean context per query token; t: TFLOP/s
    attention_decode: dict[str, tuple[Source, Curve, float | None]]  # x: KV bytes per layer; t: s; ceiling B/s
    mla_decode: tuple[Source, float, float] | None  # achieved memory B/s, achieved FLOP/s
    all_reduce: dict[int, tuple[Source, Curve]]  # group size -> x: bytes; t: seconds (NVLink, one node)
    all_to_all: dict[int, tuple[Source, float, float, float]]  # EP -> (source, bytes, dispatch s, combine s)

    def sources(self) -> dict[str, str]:
        """Every table's source, by table name (for ``describe()``)."""
        out: dict[str, str] = {}
        for dtype, t in self.gemm.items():
            out[f"gemm/{dtype}"] = t.source.short()
        for dtype, t in self.elementwise.items():
            out[f"elementwise/{dtype}"] = t.source.short()
        for dtype, (s, _) in self.attention_prefill.items():
            out[f"attention_prefill/{dtype}"] = s.short()
        for dtype, (s, _, _) in self.attention_decode.items():
            out[f"attention_decode/{dtype}"] = s.short()
        if self.mla_decode:
            out["mla_decode"] = self.mla_decode[0].short()
        for g, (s, _) in self.all_reduce.items():
            out[f"all_reduce/{g}"] = s.short()
        for ep, (s, *_rest) in self.all_to_all.items():
            out[f"all_to_all/{ep}"] = s.short()
        return out


def gemm_size(shape: tuple[int, int]) -> float:
    return float(shape[0]) * shape[1]


def elementwise_size(shape: tuple[int, int]) -> float:
    return float(shape[0] + shape[1])


def load_op_tables(name_or_path: str | Path) -> OpTables:
    """A table file by name (in ``sim/op_data``) or path. ValueError on a malformed file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = OP_DATA_DIR / str(name_or_path)
    return _load(str(path))


@lru_cache(maxsize=16)
def _load(path: str) -> OpTables:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return _parse(Path(path).stem, data)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read operator tables {path}: {e}") from e


def _source(d: dict) -> Source:
    s = d["source"]
    return Source(str(s["document"]), str(s.get("url", "")), str(s.get("date", "")), str(s.get("notes", "")))


def _shapes(d: dict, size: Callable[[tuple[int, int]], float]) -> ShapeTable:
    ms = tuple(float(m) for m in d["m"])
    curves = {}
    for key, us in d["us"].items():
        n, k = (int(v) for v in str(key).split("x"))
        curves[(n, k)] = Curve(ms, tuple(float(u) * 1e-6 for u in us))
    return ShapeTable(_source(d), curves, size)


def _parse(name: str, data: dict) -> OpTables:
    measured = data["measured_on"]
    gemm = {dtype: _shapes(d, gemm_size) for dtype, d in (data.get("gemm") or {}).items()}
    elementwise = {dtype: _shapes(d, elementwise_size) for dtype, d in (data.get("elementwise") or {}).items()}
    prefill = {dtype: (_source(d), Curve(tuple(float(x) for x in d["context"]), tuple(float(t) for t in d["tflops"])))
               for dtype, d in (data.get("attention_prefill") or {}).items()}
    decode = {}
    for dtype, d in (data.get("attention_decode") or {}).items():
        curve = Curve(tuple(float(x) for x in d["kv_bytes"]), tuple(float(u) * 1e-6 for u in d["us"]))
        ceiling = d.get("ceiling")
        source = _source(d)
        if ceiling:
            source = Source(source.document + "; beyond: " + _source(ceiling).document, source.url,
                            source.date, source.notes)
        decode[dtype] = (source, curve, float(ceiling["memory_gbs"]) * 1e9 if ceiling else None)
    mla = data.get("mla_decode")
    mla_decode = (_source(mla), float(mla["memory_gbs"]) * 1e9, float(mla["tflops"]) * 1e12) if mla else None
    all_reduce: dict[int, tuple[Source, Curve]] = {}
    ar = data.get("all_reduce") or []
    for table in ar if isinstance(ar, list) else [ar]:  # in order of preference
        src = _source(table)
        for g, d in table["groups"].items():
            curve = Curve(tuple(float(b) for b in d["bytes"]), tuple(float(u) * 1e-6 for u in d["us"]))
            all_reduce.setdefault(int(g), (src, curve))
    all_to_all = {}
    a2a = data.get("all_to_all")
    if a2a:
        src = _source(a2a)
        nbytes = float(a2a["tokens_per_rank"]) * a2a["topk"] * a2a["hidden"]  # fp8 dispatch: one byte a value
        for ep, (d_us, c_us) in a2a["ep_us"].items():
            all_to_all[int(ep)] = (src, nbytes, float(d_us) * 1e-6, float(c_us) * 1e-6)
    return OpTables(name, str(measured["card"]), dict(measured), gemm, elementwise, prefill, decode, mla_decode,
                    all_reduce, all_to_all)
