"""Fault injection for the KV data plane, for tests (what networks and hardware do): ``PDSERVE_FAULTS``.

``PDSERVE_FAULTS="kv_drop=0.5,kv_delay_s=1.5,kv_corrupt=1,seed=3"`` in a worker's environment makes its
connectors drop a transfer's notice (the target waits for its deadline, then computes the prompt), delay a
send, or flip a byte of the data sent, each with the given probability (delay: always, by that many
seconds); ``kv_cut_layer=N`` cuts every layer-wise stream before layer N (the layers below it land, the rest
and the stream's end fail, as a connection lost mid-stream would). Unset, nothing is injected. Corruption is only detectable with checksums, so it turns them on
(``PDSERVE_KV_VERIFY=1`` turns them on without faults: every transfer carries a checksum of its data that
the target verifies before it uses the blocks; they cost a pass over the data on both sides, so they are off
by default: shared memory and TCP deliver what was written).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field


@dataclass
class KVFaults:
    kv_drop: float = 0.0
    kv_delay_s: float = 0.0
    kv_corrupt: float = 0.0
    kv_cut_layer: int = -1
    seed: int = 0
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_env(cls) -> KVFaults:
        text = os.environ.get("PDSERVE_FAULTS", "")
        faults = cls()
        for item in filter(None, (x.strip() for x in text.split(","))):
            name, _, value = item.partition("=")
            if name not in ("kv_drop", "kv_delay_s", "kv_corrupt", "kv_cut_layer", "seed"):
                raise ValueError(f"PDSERVE_FAULTS: unknown fault {name!r}")
            setattr(faults, name, type(getattr(faults, name))(value))
        faults.rng = random.Random(faults.seed)
        return faults

    @property
    def verify(self) -> bool:
        return self.kv_corrupt > 0 or os.environ.get("PDSERVE_KV_VERIFY") == "1"

    def drops(self) -> bool:
        return self.kv_drop > 0 and self.rng.random() < self.kv_drop

    def cuts(self, layer_end: int) -> bool:
        """Whether a layer job that ends at ``layer_end`` is past the cut."""
        return 0 <= self.kv_cut_layer < layer_end

    def corrupts(self) -> bool:
        return self.kv_corrupt > 0 and self.rng.random() < self.kv_corrupt
