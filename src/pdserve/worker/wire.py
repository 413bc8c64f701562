"""Conversions between engine outputs and wire messages (``pdserve.protocol``)."""
from __future__ import annotations

from pdserve import protocol as p
from pdserve.engine.outputs import EngineOutput, TokenLogprobs


def output_to_wire(out: EngineOutput) -> p.TokenOutput:
    return p.TokenOutput(out.request_id, list(out.new_token_ids), out.finish_reason, out.stop_reason,
                         out.num_prompt_tokens, out.num_cached_tokens, logprobs_to_wire(out.new_logprobs))


def logprobs_to_wire(logprobs: list[TokenLogprobs] | None) -> list[p.LogprobEntry] | None:
    if logprobs is None:
        return None
    return [p.LogprobEntry(lp.token_id, lp.logprob, lp.rank, [t for t, _ in lp.top], [v for _, v in lp.top])
            for lp in logprobs]


def logprobs_from_wire(e: p.LogprobEntry) -> TokenLogprobs:
    return TokenLogprobs(e.token_id, e.logprob, e.rank, list(zip(e.top_ids, e.top_logprobs)))
