"""A worker's counters: the periodic ``Stats`` message (also the heartbeat) and the INFO stats line."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pdserve import protocol as p
from pdserve.kv.base import LoadDone, SaveDone
from pdserve.worker.busy import BusyMeter

logger = logging.getLogger(__name__)


@dataclass
class _Transfers:
    num_ok: int = 0
    num_failed: int = 0
    kv_bytes: int = 0
    seconds: float = 0.0


@dataclass
class WorkerStats:
    worker_id: str
    role: str
    log_interval_s: float = 10.0
    transfers: _Transfers = field(default_factory=_Transfers)
    _last_log_s: float = field(default_factory=time.monotonic)
    _last_prompt_tokens: int = 0
    _last_generation_tokens: int = 0
    store_loaded_tokens: int = 0

    def on_save(self, done: SaveDone) -> None:
        t = self.transfers
        t.num_ok += done.ok
        t.num_failed += not done.ok
        t.kv_bytes += done.kv_bytes
        t.seconds += done.seconds
        logger.debug("request %s: %d blocks, %d bytes to %s in %.2f ms (%s)", done.request_id, done.num_blocks,
                     done.kv_bytes, done.target_worker_id, done.seconds * 1e3, "ok" if done.ok else done.error)

    def on_store_load(self, load: LoadDone) -> None:
        if load.ok:
            self.store_loaded_tokens += max(0, load.num_tokens)

    def message(self, s, num_held_kv: int, role: str, cpus: list[int] | None, busy: BusyMeter,
                store=None) -> p.Stats:
        """The Stats message from the engine's ``EngineStats`` ``s``, the worker's ``busy`` meter and its KV store
        connector (``store``, None: none)."""
        msg = self._message(s, num_held_kv, role, cpus, busy)
        if store is not None:
            msg.kv_store = [p.KVStoreTierStats(**vars(t)) for t in store.tier_stats()]
            msg.kv_store_save_drops = store.queue.num_dropped
            msg.kv_store_queued_bytes = store.queue.queued_bytes
            msg.kv_store_loaded_tokens = self.store_loaded_tokens
        return msg

    def _message(self, s, num_held_kv: int, role: str, cpus: list[int] | None, busy: BusyMeter) -> p.Stats:
        t = self.transfers
        now = time.monotonic()
        return p.Stats(self.worker_id, role, time.time(), s.num_running, s.num_waiting, s.num_awaiting_kv,
                       s.kv_usage, s.num_blocks, s.num_free_blocks, s.prefix_query_tokens, s.prefix_hit_tokens,
                       s.num_preemptions, s.num_prompt_tokens, s.num_generation_tokens, num_held_kv, t.num_ok,
                       t.num_failed, t.kv_bytes, t.seconds, s.queued_prefill_tokens, s.prefill_token_s,
                       s.decode_step_s, s.step_target_s, cpus, busy.busy_s, busy.prefill_busy_s,
                       busy.uptime_s(now), busy.core_s(now), step_overhead_s=s.step_overhead_s)

    def maybe_log(self, s, num_held_kv: int, now: float) -> None:
        elapsed = now - self._last_log_s
        if elapsed < self.log_interval_s:
            return
        t = self.transfers
        hit = s.prefix_hit_tokens / s.prefix_query_tokens if s.prefix_query_tokens else 0.0
        logger.info("%s: running %d, waiting %d, awaiting KV %d, held KV %d, KV use %.1f%%, prefix hits %.1f%%, "
                    "prompt %.1f tok/s, generation %.1f tok/s, transfers %d (%d failed, %.1f MB, %.3f s)",
                    self.worker_id, s.num_running, s.num_waiting, s.num_awaiting_kv, num_held_kv,
                    100 * s.kv_usage, 100 * hit, (s.num_prompt_tokens - self._last_prompt_tokens) / elapsed,
                    (s.num_generation_tokens - self._last_generation_tokens) / elapsed, t.num_ok, t.num_failed,
                    t.kv_bytes / 1e6, t.seconds)
        self._last_log_s, self._last_prompt_tokens = now, s.num_prompt_tokens
        self._last_generation_tokens = s.num_generation_tokens
