"""Workloads: the stream of requests a benchmark (or the simulator) sends. Pure: no network, seeded.

Datasets (``WorkloadConfig.dataset``):

- ``random``: random token prompts of ``input_len`` tokens asking for ``output_len`` tokens, or lengths
  drawn uniformly from ``input_len_range`` / ``output_len_range`` (inclusive) when given;
- ``mix``: each request picks one component of ``mix`` (``(input_len, output_len, weight)`` triples) with
  probability proportional to its weight, e.g. long prompts with short outputs mixed with short prompts
  with long outputs; random token prompts;
- ``dist``: (input_len, output_len) pairs drawn with replacement from a trace's empirical distribution
  (``trace_format`` + ``trace_path``), random token prompts, arrivals from the arrival config;
- ``mooncake``: replay of a Mooncake JSONL trace (``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids``). Each hash id is one 512-token block with deterministic pseudo-random content (seeded by
  the id and ``seed``), so requests whose ``hash_ids`` share a leading run share exactly that token prefix;
  the last block is truncated to the input length;
- ``azure``: replay of an Azure LLM inference CSV (``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``);
  random token prompts, no shared prefixes.

``length_scale`` s multiplies every input and output length (``max(1, round(len * s))``) and, for
Mooncake, the block size (``max(1, round(512 * s))``), so prefix sharing keeps its shape on small models.
``output_length_scale``, when set, scales output lengths instead of ``length_scale`` (traces with short
outputs keep a measurable TPOT when prompts are scaled down hard).

Two entry points:

- ``build_shapes(config) -> list[RequestShape]``: lengths, arrival times and block ids, no token lists.
  Cheap enough for 100k requests; this is what the simulator replays.
- ``build_workload(config) -> list[RequestSpec]``: the same requests with ``prompt_token_ids``.
  ``PromptBuilder(config).prompt_token_ids(shape)`` builds one prompt on demand (the load generator
  uses it to avoid holding every prompt in memory). Prompts depend only on (seed, request index,
  hash ids), never on the order they are built in.

Token ids are drawn from ``[1000, vocab_size - 1000)`` to stay clear of special tokens.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from pdserve.bench.arrivals import ArrivalConfig, arrival_times

logger = logging.getLogger(__name__)

DATASETS = ("random", "mix", "dist", "mooncake", "azure")
TRACE_FORMATS = ("mooncake", "azure")
MOONCAKE_BLOCK_SIZE = 512
TOKEN_ID_MARGIN = 1000
DEFAULT_NUM_REQUESTS = 100


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything that decides the request stream. ``num_requests=None``: whole trace (or 100)."""

    dataset: str = "random"
    trace_path: str | None = None
    trace_format: str | None = None  # for dataset="dist": which parser reads trace_path
    num_requests: int | None = None
    input_len: int = 1024
    output_len: int = 128
    input_len_range: tuple[int, int] | None = None
    output_len_range: tuple[int, int] | None = None
    mix: tuple[tuple[int, int, float], ...] = ()
    length_scale: float = 1.0
    output_length_scale: float | None = None  # None: length_scale
    vocab_size: int = 49152
    seed: int = 0
    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset in TRACE_FORMATS and self.trace_format is None:
            object.__setattr__(self, "trace_format", self.dataset)
        if self.dataset in ("mooncake", "azure", "dist"):
            if not self.trace_path:
                raise ValueError(f"dataset {self.dataset!r} needs a trace_path")
            if self.trace_format not in TRACE_FORMATS:
                raise ValueError(f"trace_format must be one of {TRACE_FORMATS}, got {self.trace_format!r}")
        if self.dataset == "mix" and not self.mix:
            raise ValueError("dataset 'mix' needs at least one (input_len, output_len, weight) component")
        for in_len, out_len, weight in self.mix:
            if in_len < 1 or out_len < 1 or not weight > 0:
                raise ValueError(f"bad mix component {(in_len, out_len, weight)}: lengths >= 1, weight > 0")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be >= 1")
        for name in ("input_len_range", "output_len_range"):
            bounds = getattr(self, name)
            if bounds is not None and not 1 <= bounds[0] <= bounds[1]:
                raise ValueError(f"{name} must satisfy 1 <= LO <= HI, got {bounds}")
        for name in ("length_scale", "output_length_scale"):
            scale = getattr(self, name)
            if scale is not None and not (scale > 0 and math.isfinite(scale)):
                raise ValueError(f"{name} must be a finite number > 0, got {scale}")
        if self.vocab_size <= 2 * TOKEN_ID_MARGIN:
            raise ValueError(f"vocab_size must be > {2 * TOKEN_ID_MARGIN}, got {self.vocab_size}")
        if self.arrival.kind == "trace" and self.dataset not in TRACE_FORMATS:
            raise ValueError("trace-timestamp arrivals need a trace replay dataset (mooncake or azure)")

    @property
    def output_scale(self) -> float:
        return self.length_scale if self.output_length_scale is None else self.output_length_scale

    @property
    def block_size(self) -> int:
        """Tokens per hash id block after length scaling (Mooncake)."""
        return max(1, round(MOONCAKE_BLOCK_SIZE * self.length_scale))

    def describe(self) -> dict[str, object]:
        """The settings as plain JSON-able values, for result files and tables."""
        out: dict[str, object] = {
            "dataset": self.dataset,
            "seed": self.seed,
            "length_scale": self.length_scale,
        }
        if self.output_length_scale is not None:
            out["output_length_scale"] = self.output_length_scale
        if self.trace_path:
            out["trace_path"] = self.trace_path
            out["trace_format"] = self.trace_format
        if self.dataset == "random":
            out["input_len"] = list(self.input_len_range) if self.input_len_range else self.input_len
            out["output_len"] = list(self.output_len_range) if self.output_len_range else self.output_len
        if self.dataset == "mix":
            out["mix"] = [list(c) for c in self.mix]
        if self.dataset == "mooncake":
            out["block_size"] = self.block_size
        out["num_requests"] = self.num_requests
        out["vocab_size"] = self.vocab_size
        out.update(self.arrival.describe())
        return out


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace, lengths unscaled. ``hash_ids`` empty when the trace has none."""

    timestamp_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RequestShape:
    """A request without its tokens. ``arrival_s`` is None in closed loop.

    ``hash_ids``: one id per ``block_size``-token block of the prompt (Mooncake); equal leading ids
    mean an equal token prefix. Empty: the prompt shares nothing with other requests.
    """

    index: int
    arrival_s: float | None
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    block_size: int = MOONCAKE_BLOCK_SIZE


@dataclass(frozen=True)
class RequestSpec:
    """A request ready to send: a ``RequestShape`` plus its prompt token ids."""

    index: int
    arrival_s: float | None
    prompt_token_ids: list[int]
    output_len: int
    hash_ids: tuple[int, ...] = ()
    block_size: int = MOONCAKE_BLOCK_SIZE

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def build_shapes(config: WorkloadConfig) -> list[RequestShape]:
    """The request stream without token lists, in index order (arrival order for open loop)."""
    rows = _rows(config)
    rows_ts = [r.timestamp_s for r in rows] if config.dataset in TRACE_FORMATS else None
    times = arrival_times(config.arrival, len(rows), config.seed, rows_ts)
    block_size = config.block_size
    shapes = []
    for i, row in enumerate(rows):
        shapes.append(
            RequestShape(
                index=i,
                arrival_s=None if times is None else times[i],
                input_len=_scale(row.input_len, config.length_scale),
                output_len=_scale(row.output_len, config.output_scale),
                hash_ids=row.hash_ids,
                block_size=block_size,
            )
        )
    if times is not None:
        shapes.sort(key=lambda s: (s.arrival_s, s.index))
    return shapes


def build_workload(config: WorkloadConfig) -> list[RequestSpec]:
    """The request stream with prompts materialised (mind memory on long, unscaled traces)."""
    builder = PromptBuilder(config)
    return [builder.spec(shape) for shape in build_shapes(config)]


class PromptBuilder:
    """Builds prompt token ids for shapes; caches one token block per hash id. ``salt`` (0: none) draws other
    tokens for the same shapes and hash ids: a rate sweep's later rates get prompts of their own, so the
    server's prefix cache holds nothing from an earlier rate (the trace's own sharing stays within a rate)."""

    def __init__(self, config: WorkloadConfig, salt: int = 0) -> None:
        self._key = (config.seed,) if salt == 0 else (config.seed, salt)
        self._low = TOKEN_ID_MARGIN
        self._high = config.vocab_size - TOKEN_ID_MARGIN
        self._blocks: dict[int, np.ndarray] = {}

    def prompt_token_ids(self, shape: RequestShape) -> list[int]:
        """Blocks of ``shape.hash_ids`` truncated to ``input_len``; request-unique tokens otherwise.

        If ``input_len`` exceeds ``len(hash_ids) * block_size`` (rounding under length scale), the
        rest is filled with request-unique tokens.
        """
        if not shape.hash_ids:
            return self._unique_tokens(shape.index, shape.input_len).tolist()
        num_blocks = min(len(shape.hash_ids), -(-shape.input_len // shape.block_size))
        parts = [self._block(h, shape.block_size) for h in shape.hash_ids[:num_blocks]]
        missing = shape.input_len - num_blocks * shape.block_size
        if missing > 0:
            parts.append(self._unique_tokens(shape.index, missing))
        return np.concatenate(parts)[: shape.input_len].tolist()

    def spec(self, shape: RequestShape) -> RequestSpec:
        return RequestSpec(
            index=shape.index,
            arrival_s=shape.arrival_s,
            prompt_token_ids=self.prompt_token_ids(shape),
            output_len=shape.output_len,
            hash_ids=shape.hash_ids,
            block_size=shape.block_size,
        )

    def _block(self, hash_id: int, block_size: int) -> np.ndarray:
        block = self._blocks.get(hash_id)
        if block is None or len(block) != block_size:
            rng = np.random.default_rng([*self._key, 0xB10C, hash_id])
            block = rng.integers(self._low, self._high, size=block_size, dtype=np.int32)
            self._blocks[hash_id] = block
        return block

    def _unique_tokens(self, index: int, num_tokens: int) -> np.ndarray:
        rng = np.random.default_rng([*self._key, 0x7E57, index])
        return rng.integers(self._low, self._high, size=num_tokens, dtype=np.int32)


def load_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """Rows of a Mooncake JSONL trace (timestamps converted from ms to s)."""
    rows: list[TraceRow] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(
                    TraceRow(
                        timestamp_s=float(obj["timestamp"]) / 1000.0,
                        input_len=int(obj["input_length"]),
                        output_len=int(obj["output_length"]),
                        hash_ids=tuple(int(h) for h in obj.get("hash_ids", ())),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a Mooncake trace row ({e})") from e
    return rows


def load_azure(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """Rows of an Azure LLM inference CSV; timestamps in s from the first row's."""
    rows: list[TraceRow] = []
    origin: datetime | None = None
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace, missing columns {sorted(missing)}")
        for line_no, rec in enumerate(reader, start=2):
            if limit is not None and len(rows) >= limit:
                break
            try:
                ts = _parse_azure_time(rec["TIMESTAMP"])
                origin = ts if origin is None else origin
                rows.append(
                    TraceRow(
                        timestamp_s=(ts - origin).total_seconds(),
                        input_len=int(rec["ContextTokens"]),
                        output_len=int(rec["GeneratedTokens"]),
                    )
                )
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: bad Azure trace row ({e})") from e
    return rows


def load_trace(trace_format: str, path: str | Path, limit: int | None = None) -> list[TraceRow]:
    if trace_format == "mooncake":
        return load_mooncake(path, limit)
    if trace_format == "azure":
        return load_azure(path, limit)
    raise ValueError(f"unknown trace format {trace_format!r}")


def with_arrival(config: WorkloadConfig, arrival: ArrivalConfig) -> WorkloadConfig:
    """The same workload with other arrivals (used by rate sweeps)."""
    return replace(config, arrival=arrival)


# ---------------------------------------------------------------------------------------------------


def _rows(config: WorkloadConfig) -> list[TraceRow]:
    """Unscaled (timestamp, lengths, hash ids) per request, before arrivals are assigned."""
    if config.dataset in TRACE_FORMATS:
        rows = load_trace(config.trace_format or config.dataset, config.trace_path or "", config.num_requests)
        if not rows:
            raise ValueError(f"trace {config.trace_path} has no requests")
        return rows
    n = config.num_requests or DEFAULT_NUM_REQUESTS
    rng = np.random.default_rng([config.seed, 0x1E45])
    if config.dataset == "dist":
        pool = load_trace(config.trace_format or "", config.trace_path or "")
        if not pool:
            raise ValueError(f"trace {config.trace_path} has no requests")
        picks = rng.integers(0, len(pool), size=n)
        return [TraceRow(0.0, pool[p].input_len, pool[p].output_len) for p in picks]
    if config.dataset == "mix":
        weights = np.array([w for _, _, w in config.mix], dtype=float)
        picks = rng.choice(len(config.mix), size=n, p=weights / weights.sum())
        return [TraceRow(0.0, config.mix[p][0], config.mix[p][1]) for p in picks]
    input_lens = _lengths(rng, n, config.input_len, config.input_len_range)
    output_lens = _lengths(rng, n, config.output_len, config.output_len_range)
    return [TraceRow(0.0, i, o) for i, o in zip(input_lens, output_lens, strict=True)]


def _lengths(rng: np.random.Generator, n: int, fixed: int, bounds: Sequence[int] | None) -> list[int]:
    if bounds is None:
        return [fixed] * n
    return rng.integers(bounds[0], bounds[1] + 1, size=n).tolist()


def _scale(length: int, scale: float) -> int:
    return max(1, round(length * scale))


def _parse_azure_time(text: str) -> datetime:
    """'2023-11-16 18:17:03.9799600' (7 fractional digits) -> datetime, microseconds kept."""
    text = text.strip()
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6].ljust(6, '0')}"
    return datetime.fromisoformat(text)


def multi_turn_conversations(num_conversations: int, num_turns: int, first_len: int, turn_len: int, seed: int = 0,
                             vocab_size: int = 49152) -> list[list[list[int]]]:
    """Conversations of ``num_turns`` user messages: a first message of ``first_len`` tokens (a system prompt and
    a question), then ``turn_len`` tokens a turn. A turn's prompt is every earlier message and answer plus its own
    message (the caller appends the answers it gets), so each turn reuses all of the previous turn's KV, prompt
    and output. Random token ids in ``[TOKEN_ID_MARGIN, vocab_size - TOKEN_ID_MARGIN)``, seeded."""
    rng = np.random.default_rng(seed)
    low, high = TOKEN_ID_MARGIN, vocab_size - TOKEN_ID_MARGIN
    return [[rng.integers(low, high, first_len if t == 0 else turn_len).tolist() for t in range(num_turns)]
            for _ in range(num_conversations)]
