"""Schemathesis hooks for the API fuzz (test_e2e_api_contract.py), loaded through SCHEMATHESIS_HOOKS.

JSON Schema cannot say that one field depends on another (top_logprobs needs logprobs: true, stream_options
needs stream: true, min_tokens at most max_tokens, best_of equal to n, prompt plus max_tokens within the
context), so a request the schema admits may still get a 400 for one of these rules. schemathesis.toml lets
``positive_data_acceptance`` take a 400; this check makes sure each such 400 names one of those rules and
nothing else, so a field the document describes too loosely still fails the fuzz.
"""
from __future__ import annotations

import schemathesis

CROSS_FIELD_PARAMS = frozenset({"top_logprobs", "stream_options", "min_tokens", "best_of", "max_tokens"})


@schemathesis.check
def only_cross_field_rules_reject_valid_data(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    param = response.json()["error"]["param"]
    if param not in CROSS_FIELD_PARAMS:
        raise AssertionError(f"a request the schema admits was refused on {param!r}, which is no cross-field "
                             f"rule: {response.text[:500]}")
    return None
