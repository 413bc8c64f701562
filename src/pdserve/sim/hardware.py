"""The hardware catalogue: accelerator cards the simulator and planner know, read from YAML.

The default catalogue is ``hardware.yaml`` next to this file; ``load_catalogue(path)`` reads another
one with the same shape (documented at the top of ``hardware.yaml`` and in docs/sim.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

DEFAULT_CATALOGUE = Path(__file__).with_name("hardware.yaml")
PRECISIONS = ("bf16", "fp8", "int8", "fp4")


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak used by the analytic performance model."""

    compute: float = 0.6
    memory: float = 0.8
    attention: float = 0.5
    network: float = 0.7

    def __post_init__(self) -> None:
        for name in ("compute", "memory", "attention", "network"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"efficiency {name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class Hardware:
    """One accelerator card. Units in the field names; see hardware.yaml for the meaning of each."""

    name: str
    description: str
    tflops: dict[str, float]
    memory_gb: float
    memory_bw_tbs: float
    intra_node_gbs: float
    inter_node_gbs: float
    power_w: float
    price_per_hour: float
    price_source: str = ""
    price_date: str = ""
    spec_source: str = ""
    node_size: int = 8
    intra_latency_us: float = 5.0
    inter_latency_us: float = 20.0
    efficiency: Efficiency = field(default_factory=Efficiency)
    step_overhead_ms: float = 1.0
    placeholder: bool = False
    calibrated: bool = False
    num_cores: int = 0  # a CPU entry: the cores that price_per_hour pays for (0: an accelerator card)
    match: tuple[str, ...] = ()  # device names this entry stands for (substrings, case-insensitive)

    def __post_init__(self) -> None:
        if "bf16" not in self.tflops:
            raise ValueError(f"hardware {self.name!r}: tflops needs at least a bf16 figure")
        for key in ("memory_gb", "memory_bw_tbs", "intra_node_gbs", "inter_node_gbs"):
            if not getattr(self, key) > 0:
                raise ValueError(f"hardware {self.name!r}: {key} must be > 0")
        if self.price_per_hour < 0 or self.power_w < 0:
            raise ValueError(f"hardware {self.name!r}: price and power must be >= 0")
        if self.num_cores < 0:
            raise ValueError(f"hardware {self.name!r}: num_cores must be >= 0")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def memory_bw(self) -> float:
        """Bytes per second."""
        return self.memory_bw_tbs * 1e12

    def flops(self, precision: str) -> float:
        """Peak dense FLOP/s for matrix products in ``precision``; bf16's when the card has none
        (weight-only quantisation: smaller weights, bf16 arithmetic)."""
        return self.tflops.get(precision, self.tflops["bf16"]) * 1e12

    def link_bw(self, inter_node: bool) -> float:
        """Bytes per second per card across a node boundary or inside one."""
        return (self.inter_node_gbs if inter_node else self.intra_node_gbs) * 1e9

    def link_latency_s(self, inter_node: bool) -> float:
        return (self.inter_latency_us if inter_node else self.intra_latency_us) * 1e-6


def load_catalogue(path: str | Path | None = None) -> dict[str, Hardware]:
    """Every entry of a catalogue file (default: the built-in one), by name."""
    return dict(_load(str(Path(path) if path else DEFAULT_CATALOGUE)))


def get_hardware(name: str, path: str | Path | None = None) -> Hardware:
    """One entry by name; ValueError listing the known names otherwise."""
    catalogue = load_catalogue(path)
    if name not in catalogue:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(sorted(catalogue))}")
    return catalogue[name]


def detect_hardware(device_type: str, device_name: str, catalogue: dict[str, Hardware] | None = None
                    ) -> Hardware | None:
    """The catalogue entry a running device stands for: the first whose ``match`` substrings occur in
    ``device_name`` (``torch.cuda.get_device_name``, the CPU's model name); for a CPU without a match, the
    first CPU entry (``num_cores`` > 0); None when nothing fits."""
    catalogue = load_catalogue() if catalogue is None else catalogue
    name = device_name.lower()
    for hw in catalogue.values():
        if any(m.lower() in name for m in hw.match):
            return hw
    if device_type == "cpu":
        return next((hw for hw in catalogue.values() if hw.num_cores > 0), None)
    return None


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[tuple[str, Hardware], ...]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read hardware catalogue {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("hardware"), dict):
        raise ValueError(f"{path}: a hardware catalogue needs a 'hardware:' mapping")
    defaults = data.get("defaults") or {}
    out = []
    for name, entry in data["hardware"].items():
        out.append((name, _entry(name, {**defaults, **entry}, path)))
    return tuple(out)


def _entry(name: str, e: dict, path: str) -> Hardware:
    try:
        latency = e.get("link_latency_us") or {}
        eff = Efficiency(**(e.get("efficiency") or {}))
        return Hardware(
            name=name,
            description=str(e.get("description", "")),
            tflops={str(k): float(v) for k, v in e["tflops"].items()},
            memory_gb=float(e["memory_gb"]),
            memory_bw_tbs=float(e["memory_bw_tbs"]),
            intra_node_gbs=float(e["intra_node_gbs"]),
            inter_node_gbs=float(e["inter_node_gbs"]),
            power_w=float(e.get("power_w", 0)),
            price_per_hour=float(e.get("price_per_hour", 0)),
            price_source=str(e.get("price_source", "")),
            price_date=str(e.get("price_date", "")),
            spec_source=str(e.get("spec_source", "")),
            node_size=int(e.get("node_size", 8)),
            intra_latency_us=float(latency.get("intra", 5)),
            inter_latency_us=float(latency.get("inter", 20)),
            efficiency=eff,
            step_overhead_ms=float(e.get("step_overhead_ms", 1.0)),
            placeholder=bool(e.get("placeholder", False)),
            calibrated=bool(e.get("calibrated", False)),
            num_cores=int(e.get("num_cores", 0)),
            match=tuple(str(m) for m in e.get("match") or ()),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad hardware entry {name!r}: {err}") from err
