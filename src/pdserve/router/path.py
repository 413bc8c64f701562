"""Path choice: compute a request's prompt on a prefill worker (remote) or on its decode worker (local). Pure.

For each path the router predicts the request's TTFT from what the workers report (``InstanceView``: the
prefill tokens queued ahead, the worker's learned time per prefill token, its decode step and step target)
and the prompt's cached prefix on each side:

- remote: (tokens queued on the prefill worker + the prompt's tokens it has not cached) x its time per
  token, plus the KV transfer of the tokens the decode worker has not cached;
- on either side, the blocks after a worker's cached prefix that it can load from the KV store (the
  cluster-wide store index) are not computed but loaded, at ``store_s_per_token``;
- local: the decode worker's queued prefill tokens + the prompt's uncached tokens, at the rate its steps
  leave to prefill: all of the step when nothing decodes or no step target is set, else the slack of the
  step target beside its decodes (stall-free chunking, ``engine.step_budget``). Without a step target, a
  local prefill stalls the running decodes for its whole length; when that stall would break the ITL
  objective, the local path is refused (if a remote one exists).

The faster path wins; a local path within ``local_preference`` of the remote one wins (no transfer, the
prefill worker stays free for long prompts). Workers that have not measured their steps yet fall back to
``default_token_s``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.router.instances import InstanceView, uncached_tokens


@dataclass(frozen=True)
class PathPrediction:
    is_remote: bool
    ttft_s: float  # predicted for the chosen path
    remote_ttft_s: float | None
    local_ttft_s: float


@dataclass(frozen=True)
class PathChooser:
    itl_bound_s: float | None = None  # the ITL objective a local prefill must not break (None: none)
    transfer_s_per_token: float = 2e-6  # KV transfer, per token (the frontend updates it from PrefillDone)
    default_token_s: float = 1e-3  # per prefill token, for a worker that has not measured its steps
    local_preference: float = 1.1
    store_s_per_token: float = 2e-6  # a KV store load, per token (host memory; a remote store is slower)

    def choose(self, num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int,
               prefill: InstanceView | None, decode: InstanceView) -> PathPrediction:
        local = self.local_ttft_s(num_prompt_tokens, block_hashes, block_size, decode)
        if prefill is None:
            return PathPrediction(False, local, None, local)
        remote = self.remote_ttft_s(num_prompt_tokens, block_hashes, block_size, prefill, decode)
        stalls = self._local_stall_s(num_prompt_tokens, block_hashes, block_size, decode)
        breaks_itl = self.itl_bound_s is not None and stalls > self.itl_bound_s
        if not breaks_itl and local <= remote * self.local_preference:
            return PathPrediction(False, local, remote, local)
        return PathPrediction(True, remote, remote, local)

    def remote_ttft_s(self, num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int,
                      prefill: InstanceView, decode: InstanceView) -> float:
        uncached_p, stored_p = _split(num_prompt_tokens, block_hashes, block_size, prefill)
        uncached_d = uncached_tokens(num_prompt_tokens, block_hashes, block_size, decode)
        token_s = prefill.prefill_token_s or self.default_token_s
        return (prefill.queued_prefill_tokens + uncached_p) * token_s + uncached_d * self.transfer_s_per_token + \
            stored_p * self.store_s_per_token

    def local_ttft_s(self, num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int,
                     decode: InstanceView) -> float:
        uncached, stored = _split(num_prompt_tokens, block_hashes, block_size, decode)
        tokens = decode.queued_prefill_tokens + uncached
        token_s = decode.prefill_token_s or self.default_token_s
        target, step = decode.step_target_s, decode.decode_step_s
        load_s = stored * self.store_s_per_token
        if decode.num_running == 0:
            return tokens * token_s + load_s
        if target is None or step <= 0:
            return tokens * token_s + step + load_s  # the prompt in as few steps as it takes, beside one decode step
        per_step = max(1.0, (target - step) / token_s)  # prefill tokens each step may carry
        return -(-tokens // per_step) * max(target, step) + load_s

    def _local_stall_s(self, num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int,
                       decode: InstanceView) -> float:
        """How long one step of the local prefill would hold the running decodes (0 with a step target)."""
        if decode.step_target_s is not None or decode.num_running == 0:
            return 0.0
        tokens = min(_split(num_prompt_tokens, block_hashes, block_size, decode)[0], decode.max_step_tokens)
        return tokens * (decode.prefill_token_s or self.default_token_s) + decode.decode_step_s


def _split(num_prompt_tokens: int, block_hashes: Sequence[int], block_size: int,
           view: InstanceView) -> tuple[int, int]:
    """(tokens the instance must compute, tokens it can load from the KV store) of the prompt."""
    hashes = list(block_hashes)
    cached = view.num_cached_prefix_blocks(hashes)
    stored = view.num_store_blocks(hashes, cached)
    max_blocks = (num_prompt_tokens - 1) // block_size  # the last prompt token is always computed
    stored = max(0, min(stored, max_blocks - cached))
    return max(1, num_prompt_tokens - (cached + stored) * block_size), stored * block_size
