"""Times single operations on one card: from measured tables where they cover the operation, from the
roofline where none does (``op_tables`` has the tables and the interpolation rules).

Each method returns a ``Timing`` (seconds, what gave it, the table's source). A card's catalogue entry
lists its table files in order of preference (``hardware.yaml``: ``op_tables``); a file measured on
another card, or a table of another dtype, is scaled by the ratio of the two rooflines for that
operation (the same achieved fraction of peak). The plain roofline applies the card's efficiency
factors (``hardware.Efficiency``), as the analytic model always did.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.sim.hardware import Hardware
from pdserve.sim.op_tables import Curve, OpTables, ShapeTable, Timing, load_op_tables, lookup

BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5, "fp32": 4.0}
ACT_BYTES = 2.0  # activations stay in 16 bits


@dataclass(frozen=True)
class Peaks:
    """A card's peak figures, all in bytes/s or FLOP/s (no efficiency)."""

    memory_bw: float
    flops: dict[str, float]
    nvlink_bw: float
    network_bw: float
    intra_latency_s: float = 5e-6
    inter_latency_s: float = 20e-6

    def flop_rate(self, dtype: str) -> float:
        return self.flops.get(dtype, self.flops["bf16"])

    def link(self, inter_node: bool) -> tuple[float, float]:
        """(bandwidth, latency) of a card's link across nodes or inside one."""
        return (self.network_bw, self.inter_latency_s) if inter_node else (self.nvlink_bw, self.intra_latency_s)

    @classmethod
    def of(cls, hw: Hardware) -> Peaks:
        return cls(hw.memory_bw, {k: v * 1e12 for k, v in hw.tflops.items()}, hw.link_bw(False), hw.link_bw(True),
                   hw.link_latency_s(False), hw.link_latency_s(True))

    @classmethod
    def of_table(cls, tables: OpTables) -> Peaks:
        p = tables.peaks
        return cls(float(p["memory_tbs"]) * 1e12, {k: float(v) * 1e12 for k, v in p["tflops"].items()},
                   float(p["nvlink_gbs"]) * 1e9, float(p["network_gbs"]) * 1e9)


# -- rooflines (no efficiency): what a table's time is scaled by between cards and dtypes ----------------
def gemm_roofline(p: Peaks, m: float, n: int, k: int, dtype: str) -> float:
    wb = BYTES.get(dtype, 2.0)
    return max(2.0 * m * n * k / p.flop_rate(dtype), (n * k * wb + m * (n + k) * ACT_BYTES) / p.memory_bw)


def elementwise_roofline(p: Peaks, m: float, hidden: int, inter: int) -> float:
    """Norms, rotary, residual add (a few passes over the hidden state) and SiLU-and-mul (3 passes over
    the per-card intermediate width)."""
    return m * (6 * hidden + 3 * inter) * ACT_BYTES / p.memory_bw


def collective_roofline(p: Peaks, nbytes: float, wire_fraction: float, inter_node: bool) -> float:
    bw, latency = p.link(inter_node)
    return latency + wire_fraction * nbytes / bw


class OpTimer:
    """Operation times on ``hardware`` from its table files (``hardware.op_tables``) or the roofline."""

    def __init__(self, hardware: Hardware) -> None:
        self.hardware = hardware
        self.peaks = Peaks.of(hardware)
        self.refs: list[tuple[OpTables, Peaks, bool]] = []
        for ref in hardware.op_tables:
            tables = load_op_tables(ref.file)
            self.refs.append((tables, Peaks.of_table(tables), tables.measured_on != hardware.name))

    def sources(self) -> dict[str, str]:
        """Every table this card reads, by file/table name."""
        out: dict[str, str] = {}
        for tables, _, scaled in self.refs:
            for name, src in tables.sources().items():
                key = f"{tables.name}:{name}"
                out[key] = src + (f" (measured on {tables.measured_on}, scaled to {self.hardware.name})"
                                  if scaled else "")
        return out

    # -- GEMMs ----------------------------------------------------------------------------------------
    def gemm(self, m: float, n: int, k: int, dtype: str) -> Timing:
        """(m x k) @ (k x n) with weights in ``dtype``."""
        if m <= 0:
            return Timing(0.0, "none")
        cands = self._gemm_candidates(dtype)
        shape = (n, k)
        chosen = next(((t, p, s, d) for t, p, s, d in cands if t.covers(shape)), None)
        if chosen is None and cands:
            chosen = next(((t, p, s, d) for t, p, s, d in cands if d == dtype), cands[0])
        if chosen is None:
            eff = self.hardware.efficiency
            wb = BYTES.get(dtype, 2.0)
            t = max(2.0 * m * n * k / (self.peaks.flop_rate(dtype) * eff.compute),
                    (n * k * wb + m * (n + k) * ACT_BYTES) / (self.peaks.memory_bw * eff.memory))
            return Timing(t, "roofline")
        table, src_peaks, scaled, tdtype = chosen
        timing = table.time(m, shape, lambda x, sh: gemm_roofline(src_peaks, x, sh[0], sh[1], tdtype),
                            f"gemm/{tdtype}")
        if not scaled and tdtype == dtype:
            return timing
        ratio = gemm_roofline(self.peaks, m, n, k, dtype) / gemm_roofline(src_peaks, m, n, k, tdtype)
        return Timing(timing.seconds * ratio, timing.kind + "+scaled", timing.source)

    def _gemm_candidates(self, dtype: str) -> list[tuple[ShapeTable, Peaks, bool, str]]:
        """Tables in order: this dtype (own card first), then other dtypes (scaled)."""
        same = [(t.gemm[dtype], p, s, dtype) for t, p, s in self.refs if dtype in t.gemm]
        other = [(t.gemm[d], p, True, d) for t, p, _ in self.refs for d in t.gemm if d != dtype]
        return same + other

    def elementwise(self, m: float, hidden: int, inter: int) -> Timing:
        """One decoder layer's element-wise kernels for ``m`` tokens (intermediate width per card)."""
        if m <= 0:
            return Timing(0.0, "none")
        for tables, src, scaled in self.refs:
            table = tables.elementwise.get("bf16")
            if table is None:
                continue
            t = table.time(m, (hidden, inter), lambda x, sh: elementwise_roofline(src, x, sh[0], sh[1]),
                           "elementwise/bf16")
            if not scaled:
                return t
            ratio = elementwise_roofline(self.peaks, m, hidden, inter) / elementwise_roofline(src, m, hidden, inter)
            return Timing(t.seconds * ratio, t.kind + "+scaled", t.source)
        return Timing(elementwise_roofline(self.peaks, m, hidden, inter) / self.hardware.efficiency.memory, "roofline")

    # -- attention ------------------------------------------------------------------------------------
    def prefill_attention(self, flops: float, mean_context: float, kv_bytes: float) -> Timing:
        """Prefill attention of ``flops`` FLOPs at a mean context per query token of ``mean_context``,
        reading ``kv_bytes`` of KV."""
        if flops <= 0:
            return Timing(0.0, "none")
        memory = kv_bytes / (self.peaks.memory_bw * self.hardware.efficiency.memory)
        for tables, src, scaled in self.refs:
            entry = tables.attention_prefill.get("bf16")
            if entry is None:
                continue
            source, curve = entry
            side = curve.where(mean_context)
            rate = curve.at(mean_context) * 1e12 * (self.peaks.flop_rate("bf16") / src.flop_rate("bf16"))
            kind = "table" if side == 0 else "table-edge"
            return Timing(max(flops / rate, memory), kind + ("+scaled" if scaled else ""),
                          f"attention_prefill/bf16: {source.short()}")
        eff = self.hardware.efficiency
        return Timing(max(flops / (self.peaks.flop_rate("bf16") * eff.attention), memory), "roofline")

    def decode_attention(self, kv_bytes: float) -> Timing:
        """One layer's paged decode attention over ``kv_bytes`` of KV (GQA/MHA)."""
        if kv_bytes <= 0:
            return Timing(0.0, "none")
        for tables, src, scaled in self.refs:
            entry = tables.attention_decode.get("bf16")
            if entry is None:
                continue
            source, curve, ceiling = entry
            label = f"attention_decode/bf16: {source.short()}"
            if ceiling and curve.where(kv_bytes) > 0:  # the last measured time + further bytes at the ceiling
                t = Timing(curve.ts[-1] + (kv_bytes - curve.xs[-1]) / ceiling, "table-edge", label)
            else:
                t = lookup(curve, kv_bytes, lambda x: x / src.memory_bw, label)
            if not scaled:
                return t
            return Timing(t.seconds * src.memory_bw / self.peaks.memory_bw, t.kind + "+scaled", t.source)
        return Timing(kv_bytes / (self.peaks.memory_bw * self.hardware.efficiency.memory), "roofline")

    def mla_decode(self, flops: float, kv_bytes: float) -> Timing:
        """One layer's absorbed MLA decode attention: ``flops`` over ``kv_bytes`` of latent cache."""
        if kv_bytes <= 0:
            return Timing(0.0, "none")
        for tables, src, scaled in self.refs:
            if tables.mla_decode is None:
                continue
            source, mem_bw, rate = tables.mla_decode
            mem_bw *= self.peaks.memory_bw / src.memory_bw
            rate *= self.peaks.flop_rate("bf16") / src.flop_rate("bf16")
            return Timing(max(kv_bytes / mem_bw, flops / rate), "table" + ("+scaled" if scaled else ""),
                          f"mla_decode: {source.short()}")
        eff = self.hardware.efficiency
        return Timing(max(kv_bytes / (self.peaks.memory_bw * eff.memory),
                          flops / (self.peaks.flop_rate("bf16") * eff.attention)), "roofline")

    # -- collectives ----------------------------------------------------------------------------------
    def all_reduce(self, nbytes: float, group: int, inter_node: bool) -> Timing:
        """All-reduce of ``nbytes`` over ``group`` cards (NVLink tables apply inside a node only)."""
        if group <= 1 or nbytes <= 0:
            return Timing(0.0, "none")
        wire = 2.0 * (group - 1) / group
        if not inter_node:
            for tables, src, scaled in self.refs:
                entry = tables.all_reduce.get(group)
                if entry is None:
                    continue
                source, curve = entry
                t = lookup(curve, nbytes, lambda x: collective_roofline(src, x, wire, False),
                           f"all_reduce/{group}: {source.short()}")
                if not scaled:
                    return t
                ratio = (collective_roofline(self.peaks, nbytes, wire, False)
                         / collective_roofline(src, nbytes, wire, False))
                return Timing(t.seconds * ratio, t.kind + "+scaled", t.source)
        bw, latency = self.peaks.link(inter_node)
        return Timing(latency + wire * nbytes / (bw * self.hardware.efficiency.network), "roofline")

    def all_to_all(self, nbytes: float, ep: int, inter_node: bool, combine: bool) -> Timing:
        """An expert-parallel dispatch (or ``combine``) all-to-all: ``nbytes`` of token copies leave each
        rank (``moe.all_to_all_bytes``), of which (ep - 1)/ep cross to other ranks."""
        if ep <= 1 or nbytes <= 0:
            return Timing(0.0, "none")
        wire = (ep - 1) / ep
        for tables, src, scaled in self.refs:
            entry = tables.all_to_all.get(ep)
            if entry is None:
                continue
            source, measured_bytes, t_dispatch, t_combine = entry
            x0 = measured_bytes * (2.0 if combine else 1.0)
            curve = Curve((x0,), (t_combine if combine else t_dispatch,))
            # DeepEP's low-latency kernels send over RDMA even inside a node
            t = lookup(curve, nbytes, lambda x: collective_roofline(src, x, wire, True),
                       f"all_to_all/{ep}: {source.short()}")
            if not scaled:
                return t
            ratio = collective_roofline(self.peaks, nbytes, wire, True) / collective_roofline(src, nbytes, wire, True)
            return Timing(t.seconds * ratio, t.kind + "+scaled", t.source)
        bw, latency = self.peaks.link(inter_node)
        return Timing(latency + wire * nbytes / (bw * self.hardware.efficiency.network), "roofline")
