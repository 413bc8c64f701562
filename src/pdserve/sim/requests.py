"""Requests as the simulator feeds them to the real scheduler: counts and block hashes, no token lists.

``SimRequest`` is an ``engine.request.Request`` whose prompt is a length plus a block-hash chain instead
of a token list, so a 100k-token prompt costs nothing to build. The KV manager only ever reads tokens
through ``Request.update_block_hashes``; ``SimRequest`` overrides it to chain keys derived from the
workload's ``hash_ids`` (Mooncake: one id per ``trace_block_size``-token block; two prompts whose ids
agree up to a position have the same tokens up to it, exactly as ``bench.workloads.PromptBuilder``
materialises them):

- the KV block covering tokens ``[i*B, (i+1)*B)`` is keyed by the trace blocks it overlaps, as
  ``(hash_id, first offset, last offset)`` triples, or ``(-1, request index, i)`` for tokens that are
  unique to the request (no hash ids, past the last hash id, or generated tokens: unless ``hashed_tokens``
  says the hash ids also cover the output, as a conversation's next turn repeats this turn's answer);
- block hashes chain as the engine's do: ``hash((parent_hash, key))``, starting from ``hashing.ROOT_HASH``.

Keys are tuples of ints, so Python's tuple hash is the same in every run (no string salting): the
simulation is deterministic. Generated tokens are the dummy id 0 and every request runs to its
``max_tokens`` (ignore_eos).
"""
from __future__ import annotations

from pdserve.engine.request import Request
from pdserve.hashing import ROOT_HASH
from pdserve.sampling_params import SamplingParams

DUMMY_TOKEN_ID = 0
_PARAMS = SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0)


class SimRequest(Request):
    """A request with ``num_prompt_tokens`` prompt tokens and an optional hash-id prefix structure."""

    def __init__(self, request_id: str, index: int, num_prompt_tokens: int, max_tokens: int,
                 arrival_time: float, hash_ids: tuple[int, ...] = (), trace_block_size: int = 512,
                 hashed_tokens: int = 0) -> None:
        super().__init__(request_id, [], _PARAMS, arrival_time=arrival_time, max_tokens=max_tokens)
        self.index = index
        self._num_prompt = num_prompt_tokens
        self._hash_ids = hash_ids
        self._trace_block_size = trace_block_size
        self._hashed_tokens = hashed_tokens or num_prompt_tokens  # tokens the hash ids describe

    @property
    def num_tokens(self) -> int:
        return self._num_prompt + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def append_output_tokens(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)

    def update_block_hashes(self, block_size: int) -> list[int]:
        hashes = self.block_hashes
        num_full = self.num_tokens // block_size
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), num_full):
            parent = hash((parent, self._block_key(i, block_size)))
            hashes.append(parent)
        return hashes

    def _block_key(self, i: int, block_size: int) -> tuple:
        start, end = i * block_size, (i + 1) * block_size
        tb = self._trace_block_size
        limit = min(len(self._hash_ids) * tb, self._hashed_tokens)
        if start >= limit:
            return (-1, self.index, i)
        parts = []
        pos = start
        while pos < min(end, limit):
            j, off = divmod(pos, tb)
            stop = min(end, limit, (j + 1) * tb)
            parts.append((self._hash_ids[j], off, stop - 1 - j * tb))
            pos = stop
        if pos < end:
            parts.append((-1, self.index, pos))
        return tuple(parts)
