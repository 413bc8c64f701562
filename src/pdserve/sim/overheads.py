"""Time a live cluster spends outside engine steps, as the simulator applies it.

A profile (``pdserve profile``) times bare ``EngineCore.step()`` calls on an otherwise idle core. A live
cluster also runs a worker loop between steps (poll, messages, outputs to the frontend), an HTTP
frontend (parse, validate, hash, route; relay and detokenize every token) and, on the same host, the
load generator; a disaggregated request also waits for its decode reservation and its KV copy. These
are the terms ``pdserve profile --live`` fits from traces of a real run (``sim/live.py``), and where the
simulator applies them:

- ``admission_s``: client send → the request reaches its workers (the simulated arrival is delayed by it);
- ``return_s``: a token leaves its worker → the client has it (added to every token's time, so it adds
  to TTFT and end-to-end latency, not to TPOT);
- ``reservation_s``: a decode worker's reservation → the prefill worker (through the frontend);
- ``kv_fixed_s + kv_per_token_s x tokens``: one request's KV copy and notice (when fitted, it replaces
  the link model of ``perf_model.kv_transfer_s``);
- per worker role (``prefill``, ``decode``, ``both``), ``StepOverhead``: live step time = ``scale`` x
  profiled step time + ``gap_s`` + ``gap_per_output_s`` x outputs (the loop between steps, and the
  slow-down of steps by the frontend and the load generator sharing the host's cores), with
  ``scale_contended`` instead of ``scale`` for a step that starts while another worker of the host is
  in a step (workers on separate cores still share memory bandwidth and caches); a colocated worker's
  prefill part of a step (``PerfModel.prefill_part_s``) may have its own ``prefill_scale``; and
  ``join_s`` per request that takes its first decode in the step (its first token has just gone to the
  frontend, whose work on it — and the client's — shares the cores with that step: measured here 3-6 ms);
  ``fixed_s`` per step (time a live step spends beyond its profiled batch whatever its size; fitted only
  where the calibration's steps span sizes enough to tell it from the scale) and ``cold_s`` per step that
  starts after the worker sat idle for ``COLD_IDLE_S`` or more (caches and TLBs refilled after other
  processes ran: measured in process, one core, a 100-300-token prefill after 1 s idle took 8-14 ms
  more than back to back), unless a request takes its first decode in it (``join_s`` has that case);
  and ``jitter``: the spread of live step times around all that (the standard deviation of their
  logarithm; the host's hiccups, measured here 0.08-0.15): the simulator multiplies each step's time by
  a log-normal draw of mean 1 (seeded: ``SimOptions.seed``), so queueing tails see the spread that a
  deterministic step time hides. The spread has a memory: ``jitter_corr_share`` of its variance
  persists from step to step, fading with ``exp(-dt / jitter_corr_s)`` over the time between them (an
  Ornstein-Uhlenbeck process; fitted here: 45-75% of it, over 0.3-0.7 s), the rest is drawn afresh
  each step. A slow spell slows every step of the requests decoding through it, which widens the spread
  of their TPOT severalfold over independent draws (a request's 30 steps would average those out).

All zero (scale 1) means "as profiled": the simulator then behaves exactly as without overheads.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

ROLES = ("prefill", "decode", "both")
COLD_IDLE_S = 0.05  # a step that starts this long or more after the worker's previous one ended is cold


@dataclass(frozen=True, kw_only=True)
class StepOverhead:
    """One worker role's live step: ``scale`` (``scale_contended`` when another worker of the host is in
    a step) x profiled + ``fixed_s`` + ``cold_s`` if the step is cold (see ``COLD_IDLE_S``) + ``join_s`` x
    requests taking their first decode + ``gap_s`` + ``gap_per_output_s`` x outputs; the step part (all
    but the gaps) times a log-normal factor of mean 1 and log standard deviation ``jitter``."""

    scale: float = 1.0
    gap_s: float = 0.0
    gap_per_output_s: float = 0.0
    scale_contended: float | None = None  # None: as ``scale``
    prefill_scale: float | None = None  # for the prefill part of a step; None: as ``scale``
    join_s: float = 0.0  # per request whose first decode is in the step
    jitter: float = 0.0  # log standard deviation of a step's time around the model
    jitter_corr_share: float = 0.0  # of the jitter's variance: the share that persists between steps
    jitter_corr_s: float = 0.0  # how long it persists: correlation exp(-dt / jitter_corr_s)
    fixed_s: float = 0.0  # per step
    cold_s: float = 0.0  # per step after the worker sat idle (COLD_IDLE_S)

    def __post_init__(self) -> None:
        if not self.scale > 0 or \
                min(self.gap_s, self.gap_per_output_s, self.join_s, self.jitter, self.fixed_s, self.cold_s) < 0 or \
                any(s is not None and not s > 0 for s in (self.scale_contended, self.prefill_scale)):
            raise ValueError(f"step overhead needs scales > 0 and gaps, join, jitter, fixed and cold >= 0, "
                             f"got {self}")
        if not 0.0 <= self.jitter_corr_share <= 1.0 or self.jitter_corr_s < 0 or \
                (self.jitter_corr_share > 0) != (self.jitter_corr_s > 0):
            raise ValueError(f"step overhead needs 0 <= jitter_corr_share <= 1 and jitter_corr_s >= 0, both "
                             f"zero or both positive, got {self}")

    @property
    def is_contention_sensitive(self) -> bool:
        return self.scale_contended is not None and self.scale_contended != self.scale

    def time_s(self, profiled_s: float, num_outputs: int, contended: bool = False, prefill_part_s: float = 0.0,
               num_joining: int = 0, noise: float = 1.0, cold: bool = False) -> float:
        """The live time of a (non-empty) step the profiled model gives ``profiled_s``, of which
        ``prefill_part_s`` for its prefill tokens, with ``num_joining`` requests taking their first decode;
        ``noise``: this step's jitter factor (``StepNoise.factor``); ``cold``: the worker was idle before it."""
        factor = self.scale_contended / self.scale if contended and self.scale_contended is not None else 1.0
        rest = self.scale * (profiled_s - prefill_part_s)
        prefill = (self.scale if self.prefill_scale is None else self.prefill_scale) * prefill_part_s
        cold_s = self.cold_s if cold and not num_joining else 0.0
        step = factor * (rest + prefill) + self.fixed_s + cold_s + self.join_s * num_joining
        return noise * step + self.gap_s + self.gap_per_output_s * num_outputs


class StepNoise:
    """One worker's step jitter factors (``StepOverhead.jitter``): log-normal, mean 1; the log is a fresh
    draw plus a persistent part (``jitter_corr_share`` of the variance) that relaxes towards 0 with time
    constant ``jitter_corr_s`` between the steps it is read at (exact Ornstein-Uhlenbeck updates, so the
    draws do not depend on how steps are spaced). Seeded: the same seed gives the same factors."""

    def __init__(self, overhead: StepOverhead | None, seed: str) -> None:
        self.overhead = overhead
        self.rng = random.Random(seed)
        self.persistent = 0.0  # the persistent part of the log factor, as of ``self.at``
        self.at: float | None = None

    def factor(self, now: float) -> float:
        """The jitter factor of a step that starts at ``now`` (non-decreasing from call to call)."""
        o = self.overhead
        if o is None or not o.jitter:
            return 1.0
        var = o.jitter ** 2
        log = self.rng.gauss(0.0, math.sqrt((1.0 - o.jitter_corr_share) * var))
        if o.jitter_corr_share:
            keep = 0.0 if self.at is None else math.exp(-(now - self.at) / o.jitter_corr_s)
            self.persistent = self.persistent * keep + \
                self.rng.gauss(0.0, math.sqrt(o.jitter_corr_share * var * (1.0 - keep * keep)))
            self.at = now
            log += self.persistent
        return math.exp(log - var / 2)


@dataclass(frozen=True)
class Overheads:
    admission_s: float = 0.0
    return_s: float = 0.0
    reservation_s: float = 0.0
    kv_fixed_s: float | None = None  # None: not fitted (the simulator uses its link model)
    kv_per_token_s: float | None = None
    steps: dict[str, StepOverhead] = field(default_factory=dict)  # by worker role

    def __post_init__(self) -> None:
        for name in ("admission_s", "return_s", "reservation_s", "kv_fixed_s", "kv_per_token_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"overhead {name} must be >= 0, got {getattr(self, name)}")
        unknown = set(self.steps) - set(ROLES)
        if unknown:
            raise ValueError(f"step overheads for unknown roles {sorted(unknown)} (known: {ROLES})")

    def step(self, role: str) -> StepOverhead | None:
        return self.steps.get(role)

    def kv_transfer_s(self, num_tokens: int) -> float | None:
        """Seconds to copy ``num_tokens`` tokens of KV; None when the KV terms were not fitted."""
        if self.kv_fixed_s is None or self.kv_per_token_s is None:
            return None
        return self.kv_fixed_s + self.kv_per_token_s * num_tokens if num_tokens > 0 else 0.0

    # -- files -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = {role: asdict(s) for role, s in self.steps.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict) -> Overheads:
        if not isinstance(data, dict):
            raise ValueError(f"overheads must be a mapping, got {type(data).__name__}")
        known = {"admission_s", "return_s", "reservation_s", "kv_fixed_s", "kv_per_token_s"}
        unknown = set(data) - known - {"steps"}
        if unknown:
            raise ValueError(f"unknown overhead keys {sorted(unknown)}")
        steps = {role: StepOverhead(**s) for role, s in (data.get("steps") or {}).items()}
        return cls(steps=steps, **{k: v for k, v in data.items() if k in known})
