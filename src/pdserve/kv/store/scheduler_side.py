"""The KV store's scheduler side (``kv.base.ExternalKV``). Pure: the lookups and the save queue's room are
functions the worker side provides.

At admission the scheduler asks how many prompt tokens after its own prefix hits the store can load: the
store is looked up for the request's next full blocks (never the block holding the last prompt token, whose
logits give the first output token), and the answer is kept for that request and start until it is used or
the request is forgotten (a request that waits for blocks is not looked up again every step). When the
scheduler has allocated the blocks, a load goes into the outbox (``take_loads``); a load that fails is not
tried again for that request (it computes the tokens). When a request finishes, its computed full blocks
(prompt and output) go into the outbox to be saved (``take_saves``) and its blocks stay until the save is
done, unless the save queue is full: then nothing is held and the save is dropped.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StoreLoad:
    request_id: str
    block_ids: list[int]
    block_hashes: list[int]


@dataclass(frozen=True)
class StoreSave:
    request_id: str
    block_ids: list[int]
    block_hashes: list[int]


SAVE_QUEUE_SHARE = 4  # kv_save_queue 0: the saves in flight may hold up to 1/this of the worker's KV cache


def save_queue_bytes(configured: int, cache_bytes: int) -> int:
    """A worker's save queue: ``kv_save_queue`` as configured, or (0) a share of its KV cache (``cache_bytes``):
    a fixed size would be a handful of prompts on a large model's card and most of a small one's cache."""
    return configured or cache_bytes // SAVE_QUEUE_SHARE


def num_fitting(num_blocks: int, queue_bytes: int, queued_bytes: int, block_bytes: int) -> int:
    """How many leading blocks of a save of ``num_blocks`` fit a save queue of ``queue_bytes`` that holds
    ``queued_bytes`` now (the live connector's and the simulator's ``num_savable``)."""
    return min(num_blocks, max(0, queue_bytes - queued_bytes) // block_bytes)


class StoreExternal:
    """``lookup(hashes) -> n``: how many leading blocks the store holds. ``num_savable(num_blocks) -> n``: how
    many leading blocks of a save of that many fit the save queue now (a prefix is what a later request can
    reuse, so a save too big for the queue keeps its first blocks). ``save``: save finished requests' blocks
    at all."""

    def __init__(self, block_size: int, lookup: Callable[[list[int]], int], num_savable: Callable[[int], int],
                 save: bool = True, min_load_blocks: int = 1) -> None:
        self.block_size = block_size
        self.lookup = lookup
        self.num_savable = num_savable
        self.save = save
        self.min_load_blocks = min_load_blocks
        self._failed: set[str] = set()
        self._answers: dict[str, tuple[int, list[int]]] = {}  # request id -> (first block, hashes the store has)
        self._loads: list[StoreLoad] = []
        self._saves: list[StoreSave] = []

    def take_loads(self) -> list[StoreLoad]:
        out, self._loads = self._loads, []
        return out

    def take_saves(self) -> list[StoreSave]:
        out, self._saves = self._saves, []
        return out

    def forget(self, request_ids) -> None:
        for rid in request_ids:
            self._failed.discard(rid)
            self._answers.pop(rid, None)

    # -- ExternalKV -----------------------------------------------------------------------------------------
    def has_external(self, request_id: str) -> bool:
        return request_id not in self._failed

    def num_external_tokens(self, request_id: str, num_prompt_tokens: int, num_local_hit_tokens: int,
                            block_hashes: Sequence[int] = ()) -> int:
        start = num_local_hit_tokens // self.block_size
        end = min((num_prompt_tokens - 1) // self.block_size, len(block_hashes))
        if end - start < self.min_load_blocks:
            return 0
        answer = self._answers.get(request_id)
        if answer is None or answer[0] != start:
            wanted = list(block_hashes[start:end])
            answer = (start, wanted[:self.lookup(wanted)])
            self._answers[request_id] = answer
        n = len(answer[1])
        return n * self.block_size if n >= self.min_load_blocks else 0

    def on_allocated(self, request_id: str, block_ids: list[int], num_local_hit_tokens: int,
                     num_external_tokens: int) -> None:
        start, hashes = self._answers.pop(request_id)
        n = num_external_tokens // self.block_size
        self._loads.append(StoreLoad(request_id, list(block_ids[start:start + n]), hashes[:n]))

    def on_load_failed(self, request_id: str) -> None:
        self._failed.add(request_id)

    def on_finished(self, request_id: str, block_ids: Sequence[int] = (), block_hashes: Sequence[int] = ()) -> bool:
        self.forget([request_id])
        n = self.num_savable(len(block_hashes)) if self.save and block_hashes else 0
        if n == 0:
            return False
        self._saves.append(StoreSave(request_id, list(block_ids[:n]), list(block_hashes[:n])))
        return True
