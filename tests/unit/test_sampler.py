"""The sampler on synthetic logits: greedy, filters, seeds, penalties, min_tokens, logprobs."""
from __future__ import annotations

import math

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.sampling_params import SamplingParams


def _req(rid="r", prompt=(1, 2, 3), outputs=(), **kw):
    r = Request(rid, list(prompt), SamplingParams(**kw), eos_token_ids=(0,))
    for t in outputs:
        r.append_output_token(t)
    return r


def _logits(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_takes_argmax_per_row():
    s = Sampler(torch.device("cpu"))
    out = s(_logits([0.0, 3.0, 1.0], [5.0, 0.0, 1.0]), [_req("a", temperature=0), _req("b", temperature=0)])
    assert out.token_ids == [1, 0]


def test_top_k_one_and_tiny_top_p_are_greedy_even_when_sampling():
    s = Sampler(torch.device("cpu"))
    logits = _logits([0.1, 2.0, 1.9, 0.0])
    for _ in range(20):
        assert s(logits.clone(), [_req(temperature=1.0, top_k=1)]).token_ids == [1]
        assert s(logits.clone(), [_req(temperature=1.0, top_p=0.01)]).token_ids == [1]


def test_min_p_removes_unlikely_tokens():
    s = Sampler(torch.device("cpu"))
    logits = _logits([5.0, 5.0, -5.0, -5.0])
    seen = {s(logits.clone(), [_req(temperature=1.0, min_p=0.5)]).token_ids[0] for _ in range(50)}
    assert seen <= {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    s = Sampler(torch.device("cpu"))
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None, :]
    seen = {s(logits.clone(), [_req(temperature=1.0, top_p=0.7)]).token_ids[0] for _ in range(200)}
    assert seen == {0, 1}


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.zeros(1, 1000)

    def draw(seed, n=8):
        s = Sampler(torch.device("cpu"))
        r = _req("x", temperature=1.0, seed=seed)
        return [s(logits.clone(), [r]).token_ids[0] for _ in range(n)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_seeded_request_unaffected_by_batch_neighbours():
    logits = torch.zeros(3, 500)
    s1 = Sampler(torch.device("cpu"))
    alone = s1(logits[:1].clone(), [_req("s", temperature=1.0, seed=3)]).token_ids[0]
    s2 = Sampler(torch.device("cpu"))
    batch = s2(logits.clone(), [_req("u1", temperature=1.0), _req("s", temperature=1.0, seed=3),
                                _req("u2", temperature=1.0)]).token_ids[1]
    assert alone == batch


def test_repetition_frequency_presence_penalties():
    s = Sampler(torch.device("cpu"))
    # Token 1 is in the prompt: repetition penalty 2 halves its positive logit below token 2's.
    out = s(_logits([0.0, 3.0, 2.0]), [_req(prompt=(1,), temperature=0, repetition_penalty=2.0)])
    assert out.token_ids == [2]
    # Token 1 was output twice: frequency penalty 1 takes 2 off; presence 0.5 takes 0.5 more.
    out = s(_logits([0.0, 3.0, 0.8]), [_req(prompt=(5,), outputs=(1, 1), temperature=0, frequency_penalty=1.0,
                                            presence_penalty=0.5)])
    assert out.token_ids == [2]


def test_min_tokens_blocks_eos_and_stop_tokens():
    s = Sampler(torch.device("cpu"))
    r = _req(temperature=0, min_tokens=2, stop_token_ids=[1])
    assert s(_logits([9.0, 8.0, 1.0]), [r]).token_ids == [2]
    r.append_output_token(2)
    r.append_output_token(2)
    assert s(_logits([9.0, 8.0, 1.0]), [r]).token_ids == [0]


def test_logprobs_report_the_sampled_token_rank_and_top_alternatives():
    s = Sampler(torch.device("cpu"))
    logits = _logits([1.0, 3.0, 2.0], [0.0, 0.0, 1.0])
    out = s(logits.clone(), [_req(temperature=0, logprobs=2), _req("b", temperature=0)])
    lp = out.logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 1 and lp.rank == 1 and math.isclose(lp.logprob, expected[1].item(), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [1, 2]
    assert out.logprobs[1] is None


def test_skip_draw_continues_a_seeded_stream_started_elsewhere():
    logits = torch.zeros(1, 300)
    whole = Sampler(torch.device("cpu"))
    r = _req("w", temperature=1.0, seed=11)
    expected = [whole(logits.clone(), [r]).token_ids[0] for _ in range(4)]
    # The first draw happened on another engine (a prefill worker); this one continues the stream.
    resumed = Sampler(torch.device("cpu"))
    r2 = _req("w2", temperature=1.0, seed=11)
    resumed.skip_draw(r2, vocab_size=300)
    assert [resumed(logits.clone(), [r2]).token_ids[0] for _ in range(3)] == expected[1:]
