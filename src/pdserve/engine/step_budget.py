"""Time as a resource inside one engine: how many prefill tokens a step may carry so that the decodes running
beside them keep their time per output token (stall-free chunking, as Sarathi-Serve does). Pure Python.

``StepCosts`` learns this engine's step time online, by least squares with forgetting over its own recent
steps, on the features of a step: a constant, the decodes, their summed context, the prefill tokens and
the prefill attention work (sum over chunks of n*s + n(n+1)/2 for n tokens after s cached ones). When the
engine's cores change, what it learned is rescaled by the ratio of cores and weighs little beside the
steps that follow. ``PrefillBudget`` turns a target step time (set by the elastic controller
from the TPOT objective; None: no limit) into a token budget for the step being scheduled:
the prompt tokens that fit in ``target - overhead - predicted decode-only step`` (their linear cost and their
attention over the prompt's computed part, so a late chunk of a long prompt is smaller), at least
``min_tokens`` so that prompts always progress, and at most the step's token budget. The overhead
(``StepOverhead``) is the time between two forward passes of a busy engine (scheduling, outputs, the
worker's messages): every output token's interval pays it, so a target meant for the time per output token
leaves room for it.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

NUM_FEATURES = 5
FORGETTING = 0.98  # per observed step: a step ~50 steps ago weighs 1/e
RIDGE = 1e-6  # keeps the normal equations solvable before the steps span every feature


def step_features(num_decodes: int, decode_ctx: int, num_prefill_tokens: int, prefill_attn: float) -> list[float]:
    return [1.0, float(num_decodes), decode_ctx / 1e3, num_prefill_tokens / 1e2, prefill_attn / 1e5]


@dataclass
class StepCosts:
    """Online least squares of step seconds on ``step_features`` (exponential forgetting)."""

    forgetting: float = FORGETTING
    _xtx: list[list[float]] = field(default_factory=lambda: [[0.0] * NUM_FEATURES for _ in range(NUM_FEATURES)])
    _xty: list[float] = field(default_factory=lambda: [0.0] * NUM_FEATURES)
    _coef: list[float] | None = None
    num_observed: int = 0

    def observe(self, num_decodes: int, decode_ctx: int, num_prefill_tokens: int, prefill_attn: float,
                seconds: float) -> None:
        x = step_features(num_decodes, decode_ctx, num_prefill_tokens, prefill_attn)
        f = self.forgetting
        for i in range(NUM_FEATURES):
            row = self._xtx[i]
            for j in range(NUM_FEATURES):
                row[j] = f * row[j] + x[i] * x[j]
            self._xty[i] = f * self._xty[i] + x[i] * seconds
        self.num_observed += 1
        self._coef = None

    def reset(self) -> None:
        """Forget every step."""
        self.__init__(self.forgetting)

    def rescale(self, time_factor: float, weight: float = 0.05) -> None:
        """The engine's speed changed by a known factor (its cores did): every step seen so far counts as
        ``time_factor`` x as long, at ``weight`` of its old weight (so the next few real steps dominate).
        The fit stays usable meanwhile: forgetting it would leave the budget without a limit until enough
        new steps are seen, and a step of a whole prompt beside a large batch of decodes stalls them all."""
        if not time_factor > 0 or not 0 < weight <= 1:
            raise ValueError(f"rescale needs time_factor > 0 and weight in (0, 1], got {time_factor}, {weight}")
        self._xtx = [[v * weight for v in row] for row in self._xtx]
        self._xty = [v * weight * time_factor for v in self._xty]
        self._coef = None

    @property
    def coef(self) -> list[float]:
        """Seconds per unit of each feature (constant, decode, 1k decode context, 100 prefill tokens, 1e5
        attention units), each >= 0."""
        if self._coef is None:
            self._coef = _nonnegative_solve(self._xtx, self._xty)
        return self._coef

    def predict(self, num_decodes: int, decode_ctx: int, num_prefill_tokens: int = 0, prefill_attn: float = 0.0) -> float:
        x = step_features(num_decodes, decode_ctx, num_prefill_tokens, prefill_attn)
        return sum(c * v for c, v in zip(self.coef, x))

    def prefill_token_s(self, context: int = 0) -> float:
        """Marginal seconds of one more prefill token after ``context`` cached tokens."""
        c = self.coef
        return c[3] / 1e2 + c[4] * (context + 1) / 1e5

    def prefill_tokens_within(self, seconds: float, context: int = 0) -> int:
        """The most prompt tokens after ``context`` computed ones that take at most ``seconds``: their linear
        cost and their attention over the context and each other (n*s + n(n+1)/2), so a late chunk of a
        long prompt gets fewer tokens than an early one."""
        c = self.coef
        a = c[4] / 2e5  # seconds * n^2
        b = c[3] / 1e2 + c[4] * (context + 0.5) / 1e5  # seconds * n
        if seconds <= 0:
            return 0
        if a <= 0:
            return int(seconds / b) if b > 0 else 1 << 30
        return int((-b + math.sqrt(b * b + 4 * a * seconds)) / (2 * a))


@dataclass
class PrefillBudget:
    """The prefill tokens a step may carry beside its decodes. ``target_step_s`` None: no limit.

    When the decodes alone take the whole target (more decodes than the objective allows), prompts still
    get ``min_share`` of each step (and at least ``min_tokens``): starving them would only move the miss
    from TPOT to TTFT while the queue of new requests grows."""

    target_step_s: float | None = None
    min_tokens: int = 16
    min_share: float = 0.25
    min_observed: int = 20  # steps observed before the estimate is trusted (no limit until then)

    max_overhead_share: float = 0.5  # the overhead taken off the target, at most (a transient stall is not it)

    def tokens(self, costs: StepCosts, num_decodes: int, decode_ctx: int, step_budget: int,
               overhead_s: float = 0.0, prefill_ctx: int = 0) -> int:
        """The budget from this engine's learned step costs, for a chunk that starts after ``prefill_ctx``
        computed tokens of its prompt."""
        if self.target_step_s is None or num_decodes == 0 or costs.num_observed < self.min_observed:
            return step_budget
        slack = self._slack_s(costs.predict(num_decodes, decode_ctx), overhead_s)
        return self._bounded(costs.prefill_tokens_within(slack, prefill_ctx), step_budget)

    def tokens_for(self, decode_s: float, per_token_s: float, step_budget: int, overhead_s: float = 0.0) -> int:
        """The budget beside decodes that alone take ``decode_s``, prefill tokens taking ``per_token_s`` each
        (the simulator's performance model), when ``overhead_s`` passes between two steps' forward passes."""
        if self.target_step_s is None or per_token_s <= 0:
            return step_budget
        return self._bounded(int(self._slack_s(decode_s, overhead_s) / per_token_s), step_budget)

    def _slack_s(self, decode_s: float, overhead_s: float) -> float:
        """The time a step leaves to prompts: the target less the overhead and the decodes, at least the floor."""
        target = self.target_step_s - min(overhead_s, self.max_overhead_share * self.target_step_s)
        return max(target - decode_s, self.min_share * decode_s)

    def _bounded(self, tokens: int, step_budget: int) -> int:
        return max(self.min_tokens, min(step_budget, tokens))


@dataclass
class StepOverhead:
    """The time a busy engine spends between one forward pass's end and the next one's start (scheduling,
    outputs, the worker's messages): the median over its last ``window`` intervals. An interval counts only
    when the engine had work left after the first step (not while it waited for requests)."""

    window: int = 32
    _samples: deque[float] = field(default_factory=deque)
    _last_start: float | None = None
    _last_execute_s: float = 0.0
    _busy: bool = False

    def step_started(self, now: float) -> None:
        if self._busy and self._last_start is not None:
            self._samples.append(max(0.0, now - self._last_start - self._last_execute_s))
            if len(self._samples) > self.window:
                self._samples.popleft()
        self._last_start, self._busy = now, False

    def step_ended(self, execute_s: float, has_more_work: bool) -> None:
        self._last_execute_s, self._busy = execute_s, has_more_work

    @property
    def seconds(self) -> float:
        return statistics.median(self._samples) if self._samples else 0.0


def _nonnegative_solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Least squares from normal equations with every coefficient >= 0 (active set: drop the most negative
    one, solve again)."""
    active = list(range(len(b)))
    coef = [0.0] * len(b)
    while active:
        sol = _solve([[a[i][j] + (RIDGE if i == j else 0.0) for j in active] for i in active], [b[i] for i in active])
        if sol is None:
            return coef
        if min(sol) >= 0:
            for i, v in zip(active, sol):
                coef[i] = v
            return coef
        active.pop(min(range(len(sol)), key=sol.__getitem__))
    return coef


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-18:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            factor = m[r][col] / m[col][col]
            if factor:
                for c in range(col, n + 1):
                    m[r][c] -= factor * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x if all(math.isfinite(v) for v in x) else None
