"""Stall-free chunking's arithmetic: the online step-cost fit recovers a step model from noisy steps and
follows a change of speed; the prefill budget fills the slack beside the decodes, never below its floor."""
from __future__ import annotations

import random

import pytest

from pdserve.engine.step_budget import PrefillBudget, StepCosts, StepOverhead


def _true_step_s(num_decodes, decode_ctx, prefill, attn, speed=1.0):
    return speed * (0.010 + 0.0004 * num_decodes + 2e-6 * decode_ctx + 0.0005 * prefill + 3e-9 * attn)


def _feed(costs, rng, n=400, speed=1.0, noise=0.02):
    for _ in range(n):
        d = rng.randint(0, 16)
        ctx = sum(rng.randint(50, 900) for _ in range(d))
        p = rng.choice([0, 0, rng.randint(1, 512)])
        s = rng.randint(0, 512)
        attn = p * s + p * (p + 1) / 2
        costs.observe(d, ctx, p, attn, _true_step_s(d, ctx, p, attn, speed) * rng.lognormvariate(0, noise))


def test_step_costs_recover_the_model():
    costs = StepCosts()
    _feed(costs, random.Random(0))
    assert costs.predict(8, 4000) == pytest.approx(_true_step_s(8, 4000, 0, 0), rel=0.05)
    assert costs.prefill_token_s() == pytest.approx(0.0005, rel=0.1)
    assert all(c >= 0 for c in costs.coef)


def test_step_costs_follow_a_change_of_speed():
    costs = StepCosts()
    rng = random.Random(1)
    _feed(costs, rng)
    _feed(costs, rng, n=300, speed=2.0)  # the engine lost half its cores
    assert costs.predict(8, 4000) == pytest.approx(_true_step_s(8, 4000, 0, 0, 2.0), rel=0.08)


def test_step_costs_rescaled_when_cores_change_keep_a_budget():
    """Half the cores: what was learned counts twice as long at once, the budget keeps its limit (a fit
    forgotten would allow a whole prompt in the next step), and a few real steps then take over."""
    costs = StepCosts()
    rng = random.Random(3)
    _feed(costs, rng)
    costs.rescale(2.0)
    assert costs.predict(8, 4000) == pytest.approx(_true_step_s(8, 4000, 0, 0, 2.0), rel=0.05)
    budget = PrefillBudget(target_step_s=0.1)
    assert budget.tokens(costs, 4, 2000, 2048) < 2048
    _feed(costs, rng, n=40, speed=1.5)  # the truth was not quite 2x: a few steps correct it
    assert costs.predict(8, 4000) == pytest.approx(_true_step_s(8, 4000, 0, 0, 1.5), rel=0.08)
    with pytest.raises(ValueError):
        costs.rescale(0.0)


def test_prefill_budget_fills_the_slack():
    costs = StepCosts()
    _feed(costs, random.Random(2))
    decode_s = _true_step_s(4, 2000, 0, 0)
    budget = PrefillBudget(target_step_s=decode_s + 0.010)  # 10 ms of slack: ~20 tokens at 0.5 ms each
    assert 16 <= budget.tokens(costs, 4, 2000, 2048) <= 24
    # decodes alone past the target: prompts keep a quarter of each step (here ~10 tokens, the floor 16)
    assert PrefillBudget(target_step_s=decode_s / 2).tokens(costs, 4, 2000, 2048) == 16
    assert 20 <= PrefillBudget(target_step_s=0.02).tokens(costs, 16, 16000, 2048) <= 28  # 25% of ~49 ms
    assert PrefillBudget(target_step_s=10.0).tokens(costs, 4, 2000, 2048) == 2048  # the step's own budget
    assert PrefillBudget(None).tokens(costs, 4, 2000, 2048) == 2048  # no target: no limit
    assert budget.tokens(costs, 0, 0, 2048) == 2048  # no decodes to protect
    assert budget.tokens(StepCosts(), 4, 2000, 2048) == 2048  # not enough steps seen yet


def test_the_budget_leaves_room_for_the_time_between_forward_passes():
    budget = PrefillBudget(target_step_s=0.1)
    # decodes take 40 ms, a prefill token 1 ms: 60 tokens fill the target; 20 ms spent between passes leave 40
    assert budget.tokens_for(0.04, 0.001, 2048) == 60
    assert budget.tokens_for(0.04, 0.001, 2048, overhead_s=0.02) == 40
    # a stall is not the overhead: at most half the target is taken off
    assert budget.tokens_for(0.01, 0.001, 2048, overhead_s=1.0) == 40


def test_step_overhead_counts_only_intervals_of_a_busy_engine():
    o = StepOverhead(window=4)
    assert o.seconds == 0.0
    o.step_started(0.0)
    o.step_ended(0.080, has_more_work=True)
    o.step_started(0.095)  # 15 ms after an 80 ms forward pass
    o.step_ended(0.080, has_more_work=False)
    o.step_started(5.0)  # waited for requests: not overhead
    assert o.seconds == pytest.approx(0.015)
    for i in range(6):  # the window keeps the last 4
        o.step_ended(0.080, has_more_work=True)
        o.step_started(5.0 + (i + 1) * 0.085)
    assert o.seconds == pytest.approx(0.005)


def test_a_late_chunk_of_a_long_prompt_gets_fewer_tokens():
    rng = random.Random(3)
    costs = StepCosts()
    for _ in range(200):  # prompts' chunks at every context, beside a few decodes
        n, s, d = rng.randint(16, 512), rng.randint(0, 4000), rng.randint(0, 8)
        attn = n * s + n * (n + 1) / 2
        costs.observe(d, d * 500, n, attn, _true_step_s(d, d * 500, n, attn))
    budget = PrefillBudget(target_step_s=0.1)
    early, late = budget.tokens(costs, 4, 2000, 2048), budget.tokens(costs, 4, 2000, 2048, prefill_ctx=4000)
    assert late < early
    for ctx, n in ((0, early), (4000, late)):  # each fills the target, within the fit's error
        attn = n * ctx + n * (n + 1) / 2
        assert _true_step_s(4, 2000, n, attn) == pytest.approx(0.1, rel=0.05)
