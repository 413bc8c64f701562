"""What a worker's device costs: which device it is, how long it has held how many cores, and how its time
inside engine steps divides between prefill and decode (``sim/cost.py`` says how the frontend turns that
into cost per token).

``DeviceInfo`` names the device (type, model name, cores for a CPU) and the hardware catalogue entry it
stands for (``sim.hardware.detect_hardware``). ``BusyMeter`` adds up the seconds of every step and, for a
step that mixes prefill chunks and decodes, the prefill part by ``sim.cost.step_prefill_share`` with the
analytic step-time model of that catalogue entry: the split the planner makes; a step of a prefill-role
worker is all prefill (``sim.cost.prefill_time``). Without a catalogue entry a mixed step is split by its
tokens. It also keeps the worker's uptime and core-seconds (its cores over
time: the elastic controller moves cores between workers and parks some; ``set_cores``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pdserve.sim.cost import prefill_time, step_prefill_share
from pdserve.sim.perf_model import BatchShape, PerfModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    device_type: str  # "cpu", "cuda", ...
    device_name: str  # "NVIDIA H100 80GB HBM3", "AMD EPYC 9R14", ...
    num_cores: int  # a CPU worker: the cores it may run on; 0 for an accelerator
    hardware: str  # the catalogue entry it stands for ("" when none fits)


def device_info(backend, device) -> DeviceInfo:
    """The device a worker's engine runs on: its backend (``pdserve.devices.DeviceBackend``) and the
    ``torch.device`` it gave."""
    from pdserve.sim.hardware import detect_hardware

    name, cores = backend.device_name(device), backend.num_cores()
    hw = detect_hardware(device.type, name)
    if hw is None:
        logger.warning("no hardware catalogue entry matches %s (%s): its price is 0 unless the frontend's "
                       "--price-per-hour sets one", name, backend.name)
    return DeviceInfo(device.type, name, cores, hw.name if hw else "")


class BusyMeter:
    """Seconds spent in engine steps, and the part of them spent on prefill (totals since start)."""

    def __init__(self, perf: PerfModel | None = None, num_cores: int = 0, now_s: float | None = None) -> None:
        self.perf = perf
        self.busy_s = 0.0
        self.prefill_busy_s = 0.0
        self.start_s = time.monotonic() if now_s is None else now_s
        self._num_cores = num_cores
        self._core_s = 0.0  # up to _cores_since_s
        self._cores_since_s = self.start_s

    @classmethod
    def for_engine(cls, arch, dtype, hardware: str, num_cores: int = 0) -> BusyMeter:
        """A meter that splits mixed steps with the analytic model of ``hardware`` (a catalogue name)
        for the model ``arch`` (``model.arch.ModelArch``) in ``dtype`` (a ``torch.dtype``); the worker
        runs on ``num_cores`` cores from now."""
        if not hardware:
            return cls(num_cores=num_cores)
        from pdserve.sim.hardware import get_hardware
        from pdserve.sim.models import ModelSpec, shared_expert_count
        from pdserve.sim.perf_model import AnalyticPerfModel

        spec = ModelSpec(arch.architecture, arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads,
                         arch.head_dim, arch.intermediate_size, arch.vocab_size,
                         tie_embeddings=arch.tie_word_embeddings, num_experts=arch.num_experts,
                         num_experts_per_token=arch.num_experts_per_tok,
                         moe_intermediate_size=arch.moe_intermediate_size,
                         num_shared_experts=shared_expert_count(arch.shared_expert_intermediate_size,
                                                                arch.moe_intermediate_size),
                         first_k_dense_layers=arch.num_layers - arch.num_moe_layers if arch.num_experts else 0)
        precision = "fp32" if dtype.itemsize == 4 else "bf16"
        return cls(AnalyticPerfModel(spec, get_hardware(hardware), precision=precision, kv_dtype=precision),
                   num_cores)

    def set_cores(self, num_cores: int, now_s: float | None = None) -> None:
        """From now on the worker runs on ``num_cores`` cores (0: parked, or an accelerator)."""
        now = time.monotonic() if now_s is None else now_s
        self._core_s = self.core_s(now)
        self._cores_since_s, self._num_cores = now, num_cores

    def uptime_s(self, now_s: float | None = None) -> float:
        return (time.monotonic() if now_s is None else now_s) - self.start_s

    def core_s(self, now_s: float | None = None) -> float:
        """Core-seconds since start: each core the worker held, times how long it held it."""
        now = time.monotonic() if now_s is None else now_s
        return self._core_s + self._num_cores * max(0.0, now - self._cores_since_s)

    def record(self, chunks, seconds: float, role: str = "both") -> None:
        """One step of ``seconds`` that ran ``chunks`` (the scheduler's chunks of that step) on a worker in
        ``role`` (``sim.cost.prefill_time``'s rule, applied step by step: the role may change)."""
        if seconds <= 0 or not chunks:
            return
        self.busy_s += seconds
        shape = BatchShape.from_chunks(chunks)
        share = 0.0
        if shape.num_prefill_tokens:
            share = step_prefill_share(self.perf, shape) if self.perf is not None else \
                shape.num_prefill_tokens / shape.num_tokens
        self.prefill_busy_s += prefill_time(role, seconds, seconds * share)

